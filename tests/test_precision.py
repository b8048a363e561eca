"""Which input type the flows' matmuls get (`cflow_jax.precision`)."""

import jax.numpy as jnp
import pytest

from cflow_jax import precision
from cflow_jax.config import Config

# /proc/cpuinfo's layout: one "flags" line per core among other fields.
CPUINFO = "processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"


@pytest.fixture(autouse=True)
def fresh_cpu_flags():
  """The flags are read once per process: read them again in each test, and after the last one."""
  precision.cpu_flags.cache_clear()
  yield
  precision.cpu_flags.cache_clear()


def _cpu(monkeypatch, tmp_path, model, flags):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO.format(model=model, flags=flags))
  monkeypatch.setattr(precision, "CPUINFO", str(path))


@pytest.mark.parametrize("model, flags, expected", [
    ("Intel(R) Xeon(R) Platinum 8480+", "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", jnp.bfloat16),
    ("AMD EPYC", "fpu sse2 fma avx avx2", jnp.float32),
])
def test_auto_picks_bfloat16_only_on_a_cpu_with_amx(monkeypatch, tmp_path, model, flags, expected):
  _cpu(monkeypatch, tmp_path, model, flags)
  assert precision.matmul_dtype("auto", "cpu") == jnp.dtype(expected)


def test_auto_is_float32_on_a_cpu_whose_flags_cannot_be_read(monkeypatch, tmp_path):
  monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "missing"))
  assert precision.matmul_dtype("auto", "cpu") == jnp.float32


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_is_bfloat16_on_accelerators_and_explicit_names_are_kept(platform):
  assert precision.matmul_dtype("auto", platform) == jnp.bfloat16
  for name in ("float32", "bfloat16"):
    assert precision.matmul_dtype(name, platform) == jnp.dtype(name)
    assert precision.matmul_dtype(name, "cpu") == jnp.dtype(name)


def test_config_refuses_an_unknown_dtype():
  with pytest.raises(ValueError, match="score_dtype"):
    Config(score_dtype="float16")
