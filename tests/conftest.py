"""Test-session settings: compile fast, and compile each program once.

On the CPU, XLA's compilation takes most of the suite's time: the tests build many small models, each with
programs of its own, and the command-line tests start processes that compile the same programs again.
So the session (this process and the scripts it starts) compiles without LLVM's optimisation passes, which
changes no result a test checks beyond float rounding, and shares one persistent compilation cache: one
per session, made empty, shared by pytest-xdist's workers (`-n 2`) and every process they start, so no
program is compiled twice and no earlier session's programs are found. Tests of the cache itself use a
directory of their own."""

import os
import shutil
import tempfile

# Before JAX starts its backend. A level the caller chose is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Set by the process that made the session's cache (pytest, or xdist's controller); its workers inherit it.
SESSION_CACHE = "CFLOW_JAX_TEST_SESSION_CACHE"


def pytest_configure(config):
  """Before any test compiles and before xdist starts its workers (which inherit this environment)."""
  if SESSION_CACHE not in os.environ:
    os.environ[SESSION_CACHE] = tempfile.mkdtemp(prefix="cflow_jax_test_xla_")
    config._cflow_jax_cache_owner = True  # this process removes it at the end
  cache = os.environ[SESSION_CACHE]
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # for the processes the tests start
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
    prepare_demo()


def prepare_demo():
  """xdist's workers would otherwise both build the demo's TFDS records into ~/tensorflow_datasets on a
  fresh machine, each renaming its copy into the same place: built once here, before they start."""
  from cflow_jax import data
  for texture in data.demo.TEXTURES:
    data.load("demo", "train", texture)


def pytest_unconfigure(config):
  if getattr(config, "_cflow_jax_cache_owner", False):
    shutil.rmtree(os.environ.pop(SESSION_CACHE), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Modules with more slow tests first, each module's tests in their order. Under xdist (`--dist
  loadscope --no-loadscope-reorder`, pyproject.toml) a worker takes a whole module at a time, so the long
  ones start first and the short ones fill the end."""
  slow = {}
  for item in items:
    module = getattr(item, "module", None)
    slow[module] = slow.get(module, 0) + (item.get_closest_marker("slow") is not None)
  order = {module: i for i, module in enumerate(slow)}
  items.sort(key=lambda item: (-slow[getattr(item, "module", None)], order[getattr(item, "module", None)]))
