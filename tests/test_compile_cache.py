"""Where the scripts keep JAX's persistent compilation cache (`cflow_jax.compile_cache`)."""

import jax
import pytest

from cflow_jax import compile_cache, precision


@pytest.fixture
def no_cache_set():
  """The test session sets a cache directory (conftest); these tests start without one and restore it."""
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", saved)


def _cpu(monkeypatch, tmp_path, flags):
  path = tmp_path / f"cpuinfo_{len(flags)}"
  path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
  monkeypatch.setattr(precision, "CPUINFO", str(path))
  precision.cpu_flags.cache_clear()


@pytest.fixture(autouse=True)
def fresh_cpu_flags():
  precision.cpu_flags.cache_clear()
  yield
  precision.cpu_flags.cache_clear()


def test_each_kind_of_cpu_gets_its_own_directory(monkeypatch, tmp_path):
  _cpu(monkeypatch, tmp_path, "fpu sse2 fma avx avx2")
  avx2 = compile_cache.machine_key()
  _cpu(monkeypatch, tmp_path, "avx2 fpu sse2 fma avx")  # the same flags in another order
  assert compile_cache.machine_key() == avx2
  _cpu(monkeypatch, tmp_path, "fpu sse2 fma avx avx2 avx512f amx_bf16 amx_tile")
  assert compile_cache.machine_key() != avx2


def test_enable_sets_the_directory_for_this_cpu_and_empty_turns_it_off(no_cache_set, tmp_path):
  assert compile_cache.enable("") is None
  assert not jax.config.jax_compilation_cache_dir
  path = compile_cache.enable(str(tmp_path))
  assert path == tmp_path / compile_cache.machine_key()
  assert jax.config.jax_compilation_cache_dir == str(path)


def test_a_directory_jax_already_has_is_kept(tmp_path):
  # The test session's (conftest), as JAX_COMPILATION_CACHE_DIR would set it.
  given = jax.config.jax_compilation_cache_dir
  assert given
  assert str(compile_cache.enable(str(tmp_path))) == given
  assert jax.config.jax_compilation_cache_dir == given
