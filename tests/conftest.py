"""Test-session settings: compile fast, and compile each program once.

On the CPU, XLA's compilation takes most of the suite's time: the tests build many small models, each with
programs of its own, and the command-line tests start processes that compile the same programs again.
So the session (this process and the scripts it starts) compiles without LLVM's optimisation passes, which
changes no result a test checks beyond float rounding, and shares one persistent compilation cache."""

import os

# Before JAX starts its backend. A level the caller chose is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", cache)  # for subprocesses
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
