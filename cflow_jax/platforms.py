"""Code that differs between the CPU and accelerators, chosen when a program is lowered, not traced.

A Python `if jax.default_backend() == "cpu"` decides while tracing, on the machine that traces: a program
exported (`jax.export`) on a CPU for CUDA or TPU would carry the CPU's path. `jax.lax.platform_dependent`
stages both paths and keeps, at lowering, the one of the platform the program is lowered for: an ordinary
jit on one platform compiles that path alone, and a program exported for several platforms carries each
platform's path, picked when it is compiled where it runs.
"""

import jax


def cpu_or_accelerator(cpu, accelerator, *args):
  """cpu(*args) where the program runs on a CPU, accelerator(*args) on a GPU or TPU (both traced: they
  must return the same shapes and types)."""
  return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)
