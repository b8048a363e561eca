"""Data parallelism with JAX's own runtime: one mesh axis over every device, parameters replicated.

The same code runs on one CPU, eight GPUs or a TPU slice: image batches and fiber chunks are split along
the "data" axis, decoder parameters and optimiser states are replicated, and XLA inserts the gradient
all-reduce. On several hosts, call `jax.distributed.initialize()` first (the scripts' --distributed flag);
each host then feeds its own slice of every image batch.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x: np.ndarray, mesh: Mesh):
  """Splits a host batch along its first axis over the mesh.

  Every host holds the same global batch (the data order is a pure function of seed and epoch) and
  contributes its contiguous slice. A batch that does not divide evenly is replicated instead.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  if x.shape[0] % mesh.size:
    return jax.device_put(x, NamedSharding(mesh, P()))
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  per_host = x.shape[0] // jax.process_count()
  local = x[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
  return jax.make_array_from_process_local_data(sharding, local, x.shape)


def constrain_fibers(x, mesh: Mesh | None):
  """Inside jit: keep a chunk's fibers (N, ...) split over the data axis, so each device computes the
  loss and gradient of its own N / devices fibers."""
  if mesh is None or mesh.size == 1 or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(AXIS)))
