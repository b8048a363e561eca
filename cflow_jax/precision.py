"""The input type of the flows' matmuls, from a Config field: "float32", "bfloat16" or "auto".

bfloat16 inputs with float32 sums pay only where the hardware multiplies bfloat16 natively: GPU tensor
cores, TPU matrix units, a CPU with AMX. A CPU without it converts every operand to float32 first, so
there bfloat16 scores and trains slower than float32 (docs/results.md). "auto" therefore picks bfloat16
only where it is native: on a CPU, where it lists AMX and Linux lets this process use AMX's tiles.
"""

import ctypes
import functools
import platform as _platform
import sys

import jax
import jax.numpy as jnp

from cflow_jax import platforms

CPUINFO = "/proc/cpuinfo"


def matmul_dtype(name: str, platform: str | None = None):
  """The jnp dtype a Config dtype field names; "auto" resolves for `platform` (default: JAX's backend)."""
  if name == "auto":
    name = "bfloat16" if has_native_bfloat16(platform or jax.default_backend()) else "float32"
  return jnp.dtype(name)


def with_matmul_dtype(fn, name: str, *args):
  """fn(dtype, *args) with the dtype `name` resolves to on the platform the program runs on: "auto" is
  resolved when the program is lowered (`platforms`), so that one exported for several platforms takes
  bfloat16 on a GPU or TPU even where it was traced on a CPU without it. "auto" on the CPU is this CPU's
  choice."""
  cpu, accelerator = matmul_dtype(name, "cpu"), matmul_dtype(name, "accelerator")
  if cpu == accelerator:
    return fn(cpu, *args)
  return platforms.cpu_or_accelerator(functools.partial(fn, cpu), functools.partial(fn, accelerator), *args)


def has_native_bfloat16(platform: str) -> bool:
  if platform != "cpu":
    return True  # GPU and TPU matrix units
  # XLA:CPU runs bfloat16 dots on AMX tiles (via its ynn kernels). Where the kernel refuses this process
  # the tiles, XLA's kernels fall back to a path slower than float32's: on the AMX Xeon, 2 threads, a
  # 2048^2 matmul ran at 204 GFLOP/s in bfloat16 against 258 in float32 (1,119 with the tiles), and
  # decoder training at 0.92x float32 (experiments/bench/without_amx.py, docs/results.md). AVX-512 BF16
  # alone (Zen 4) was not measured.
  return "amx_bf16" in cpu_flags() and amx_permitted()


# Linux x86-64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
_NR_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def amx_permitted() -> bool:
  """Whether Linux lets this process use AMX's tile data. A process must ask before its first tile
  instruction (the matmul libraries XLA calls ask at start-up, and so does this: asking twice is
  harmless); a container's seccomp policy may refuse, and a CPU without AMX always does."""
  if sys.platform != "linux" or _platform.machine() != "x86_64":
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  return libc.syscall(ctypes.c_long(_NR_ARCH_PRCTL), ctypes.c_ulong(_ARCH_REQ_XCOMP_PERM),
                      ctypes.c_ulong(_XFEATURE_XTILEDATA)) == 0


@functools.cache
def cpu_flags() -> frozenset:
  """The CPU's feature flags from Linux's /proc/cpuinfo; empty elsewhere (macOS, Windows)."""
  try:
    with open(CPUINFO) as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.partition(":")[2].split())
  except OSError:
    pass
  return frozenset()
