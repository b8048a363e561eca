"""What the benchmarks share: the command line's CPU split and one-line exit (cflow_jax/cli/common.py), and
timing image batches streamed as training streams them."""

import time

import jax
import numpy as np

from cflow_jax import train
from cflow_jax.cli.common import exit_on_user_error, split_cpu

__all__ = ["exit_on_user_error", "split_cpu", "streamed_seconds"]


def streamed_seconds(model, layout, placed, encode, key_data, lr, batches: int) -> float:
  """Seconds per image batch run as `train.fit` runs them: each encoded (`encode()`), then its decoder
  steps, dispatched without waiting, so that the devices' queues overlap one batch's encoding with another's
  steps. `placed`: (params, opt_states, permutations) as `train._place` puts them (donated, used up)."""
  params, opt_states, permutations = placed
  began = time.perf_counter()
  for _ in range(batches):
    params, opt_states, losses = train.train_batch(model, layout, params, opt_states, permutations, encode(),
                                                   key_data, np.float32(lr))
  jax.block_until_ready((params, losses))
  return (time.perf_counter() - began) / batches
