"""The one exception type for mistakes a user can fix (a missing file, a typo'd name, bad data).

Scripts catch it and print its message as one line with a non-zero exit code; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input, whose message says what to do about it."""


class ConfigError(UserError, ValueError):
  """A Config field's value refused (`cflow_jax.config`): a UserError for the scripts, and a ValueError, as
  any refused argument value is to Python code."""
