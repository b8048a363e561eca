"""The commands' doors: every console script pyproject.toml names resolves to a callable (a typo there fails
here, not in a user's shell), and every Config field gets a flag of its type with its help."""

import dataclasses
import importlib
import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

from cflow_jax.config import Config
from cflow_jax.errors import UserError

REPO = pathlib.Path(__file__).parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_are_all_declared():
  assert set(SCRIPTS) == {"cflow-train", "cflow-predict", "cflow-benchmark", "cflow-export"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_resolves_to_a_callable(script):
  module, _, attribute = SCRIPTS[script].partition(":")
  assert callable(getattr(importlib.import_module(module), attribute))


def test_every_config_field_has_a_help_text():
  for field in dataclasses.fields(Config):
    assert field.metadata["help"].endswith("."), field.name


def test_a_refused_config_value_is_a_user_error_and_a_value_error():
  for bad in (dict(image_size=100), dict(backbone="alexnet"), dict(lr=float("nan"))):
    with pytest.raises(UserError):
      Config(**bad)
    with pytest.raises(ValueError):
      Config(**bad)


def test_every_config_field_is_a_flag_of_its_type():
  """In a fresh process (absl's flags are global): each field's flag parses a value of the field's type."""
  code = ("from absl import flags; from cflow_jax.cli import config_flags; config_flags.define_config_flags(); "
          "import dataclasses, json; from cflow_jax.config import Config; "
          "print(json.dumps({f.name: [flags.FLAGS[f.name].flag_type(), flags.FLAGS[f.name].help, "
          "flags.FLAGS[f.name].default] for f in dataclasses.fields(Config)}))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  made = json.loads(result.stdout)
  for field in dataclasses.fields(Config):
    kind, help, default = made[field.name]
    assert default is None, field.name  # the Config's value (or the recipe's) unless given
    assert field.metadata["help"] in help, field.name
    expected = {bool: "bool", int: "int", float: "float"}.get(field.type, "string")
    assert kind == ("string enum" if field.metadata["choices"] else expected), field.name
