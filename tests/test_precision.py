"""Which input type the flows' matmuls get (`cflow_jax.precision`)."""

import os
import pathlib
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import model as model_lib, precision, train, train_step
from cflow_jax.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
# /proc/cpuinfo's layout: one "flags" line per core among other fields.
CPUINFO = "processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"


@pytest.fixture(autouse=True)
def fresh_cpu_flags():
  """The flags are read once per process: read them again in each test, and after the last one."""
  precision.cpu_flags.cache_clear()
  yield
  precision.cpu_flags.cache_clear()


def _cpu(monkeypatch, tmp_path, model, flags, amx_permitted=True):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO.format(model=model, flags=flags))
  monkeypatch.setattr(precision, "CPUINFO", str(path))
  monkeypatch.setattr(precision, "amx_permitted", lambda: amx_permitted)


@pytest.mark.parametrize("model, flags, expected", [
    ("Intel(R) Xeon(R) Platinum 8480+", "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", jnp.bfloat16),
    ("AMD EPYC", "fpu sse2 fma avx avx2", jnp.float32),
])
def test_auto_picks_bfloat16_only_on_a_cpu_with_amx(monkeypatch, tmp_path, model, flags, expected):
  _cpu(monkeypatch, tmp_path, model, flags)
  assert precision.matmul_dtype("auto", "cpu") == jnp.dtype(expected)


def test_auto_is_float32_where_the_kernel_withholds_amx(monkeypatch, tmp_path):
  _cpu(monkeypatch, tmp_path, "Intel(R) Xeon(R) Platinum 8480+", "fpu avx512f avx512_bf16 amx_bf16 amx_tile",
       amx_permitted=False)
  assert precision.matmul_dtype("auto", "cpu") == jnp.float32


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Linux x86-64's AMX")
def test_the_amx_probe_sees_a_process_refused_the_tiles(tmp_path):
  """experiments/bench/without_amx.py refuses the command AMX's tiles (seccomp); `amx_permitted` asks the
  kernel and is told no, so "auto" is float32 even on a CPU whose flags list AMX."""
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(CPUINFO.format(model="Intel(R) Xeon(R)", flags="fpu avx512f amx_bf16 amx_tile"))
  probe = ("from cflow_jax import precision; precision.CPUINFO = {!r}; "
           "print(precision.amx_permitted(), precision.matmul_dtype('auto', 'cpu'))").format(str(cpuinfo))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  refused = subprocess.run([sys.executable, str(REPO / "experiments" / "bench" / "without_amx.py"), "--",
                            sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
  assert refused.stdout.split() == ["False", "float32"]


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
  with pytest.raises(ValueError, match="train_dtype"):
    Config(train_dtype="float16")


def test_training_with_auto_takes_the_type_auto_resolves_to(monkeypatch, tmp_path):
  """train_dtype="auto" trains as the type `matmul_dtype` picks for this CPU: the same losses."""
  losses = {}
  for flags in ("fpu sse2 fma avx avx2", "fpu avx2 avx512f amx_bf16 amx_tile"):
    _cpu(monkeypatch, tmp_path, "cpu", flags)
    precision.cpu_flags.cache_clear()
    picked = precision.matmul_dtype("auto", "cpu")
    for name in ("auto", picked.name):
      config = Config(backbone="resnet18", image_size=32, fiber_batch=8, coupling_blocks=2, train_dtype=name)
      model = model_lib.build(config)
      state = train.init_state(model, jax.random.key(0))
      layer = len(model.channels) - 1
      size, channels = model.feature_sizes()[layer], model.channels[layer]
      features = jax.random.normal(jax.random.key(1), (1, size, size, channels))
      step = jax.jit(train_step.train_layer_fn(config))  # "auto" resolves when this traces
      _, layer_losses = step(state.decoders[layer], features, jax.random.key(2), np.float32(1e-3))
      losses[name] = np.asarray(layer_losses)
    np.testing.assert_array_equal(losses["auto"], losses[picked.name])
  assert not np.array_equal(losses["float32"], losses["bfloat16"])  # the two CPUs trained differently
