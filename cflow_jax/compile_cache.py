"""JAX's persistent compilation cache, kept per kind of machine: compiled programs reused between runs.

A run compiles a dozen programs (the encoder, each decoder's chunk loop, the short last batch's, scoring),
which on a CPU takes a noticeable part of a short run (README); a later run with the same shapes and flags
loads them from disk. XLA:CPU compiles for the host's instruction set, so each kind of CPU gets a directory
of its own: a home directory shared by machines with different CPUs (a cluster, a CI fleet) then keeps one
set of programs per kind instead of each machine replacing the others' entries. (JAX itself checks that a
loaded CPU program suits the host, and compiles afresh if not.)
"""

import hashlib
import pathlib
import platform

import jax

from cflow_jax import precision, weights


def machine_key() -> str:
  """A short fingerprint of this machine's processor: its architecture and CPU feature flags."""
  text = " ".join([platform.machine(), *sorted(precision.cpu_flags())])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def enable(directory: str | None = None) -> pathlib.Path | None:
  """Turns the cache on in <directory>/<machine_key()> and returns that path.

  directory: default <cflow_jax's cache>/xla (`weights.cache_path`: $CFLOW_JAX_CACHE or ~/.cache/cflow_jax);
    "" leaves the cache off (returns None). A cache directory already set for JAX (its
    JAX_COMPILATION_CACHE_DIR, or jax.config) is kept and returned.
  """
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  if directory == "":
    return None
  root = pathlib.Path(directory).expanduser() if directory is not None else weights.cache_path() / "xla"
  path = root / machine_key()
  # No size limit: JAX's needs the filelock package. A run's programs take a few MB; delete at will.
  jax.config.update("jax_compilation_cache_dir", str(path))
  return path
