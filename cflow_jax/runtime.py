"""Where the work runs, with JAX's own runtime: data parallelism over a mesh, or decoders side by side.

The one module that places work (docs/design.md section 12): meshes, the CPU split into several devices,
batches split over devices and gathered back, short batches padded. The math (`model`, `flow`,
`anomaly_map`, `step`) never imports it; the loops (`train`, `multi`, `api`) call it.

Data parallelism (accelerators, several hosts): one mesh axis over every device, image batches and fiber
chunks split along it, decoder parameters and optimiser states replicated; XLA inserts the gradient
all-reduce. The same code runs on one CPU, eight GPUs or a TPU slice. On several hosts, call
`jax.distributed.initialize()` first (the scripts' --distributed flag); each host then feeds its own slice
of every image batch.

Decoders side by side (one host's CPU split into several devices, `JAX_NUM_CPU_DEVICES` or the scripts'
--cpu_devices): XLA runs one operation at a time per device, and the decoders' small matmuls (N rows) keep
two cores barely busier than one. The decoders are independent, so each trains its whole chunk loop on
a device of its own, the layers spread over the devices by cost, and the devices work concurrently.
"""

import functools
from typing import NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from cflow_jax import model as model_lib

AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def replicate_computed(tree, mesh: Mesh):
  """Arrays computed on the mesh (split over it) gathered onto every device: on several processes, the
  only way each process can read all of them."""
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)


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


def per_device(fn, mesh: Mesh | None, batch_size: int):
  """fn(*replicated, batch), each device computing on its own slice of the batch (`shard_map`), so that
  what fn does per image (a loop on the CPU, see `model.encode_images`) stays local to a device. fn itself for
  one device, or a batch that does not divide over the devices (replicated, see `shard_batch`)."""
  if mesh is None or mesh.size == 1 or batch_size % mesh.size:
    return fn

  def sharded(*args):
    specs = (P(),) * (len(args) - 1) + (P(AXIS),)
    # fn is purely per device (no collectives): nothing for the varying-axis checks to find.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)(*args)

  return sharded


class Layout(NamedTuple):
  """Where training runs. Image batches are always split over the whole mesh, each device encoding its
  own share (`encode` with `mesh`).

  mesh: the data mesh; with `decoders` None each step's fibers are split over it (data parallelism).
  decoders: with the decoders side by side, the device of each decoder; else None.
  """
  mesh: Mesh
  decoders: tuple | None = None

  @property
  def split_mesh(self) -> Mesh | None:
    """The mesh that fiber chunks are split over (data parallelism), if any."""
    return None if self.decoders is not None or self.mesh.size == 1 else self.mesh

  def put_images(self, images):
    return shard_batch(images, self.mesh)

  def put_decoder(self, layer: int, tree):
    """A decoder's parameters, optimiser state or permutations, where it trains: replicated over the
    mesh, or on its own device."""
    if self.decoders is None:
      return replicate(tree, self.mesh)
    return jax.device_put(tree, self.decoders[layer])

  def put_step_input(self, layer: int, tree):
    """A layer's features for its step: as they are for data parallelism (split over the mesh by the
    encoder), else moved to the decoder's device."""
    if self.decoders is None:
      return tree
    return jax.device_put(tree, self.decoders[layer])


def train_layout(layer_costs: Sequence[float], mesh: Mesh | None = None) -> Layout:
  """Decoders side by side when the mesh (default: all devices) is several CPU devices of one process,
  the layers spread greedily, costliest first, over the least loaded device; data parallelism over the
  mesh otherwise (accelerators, several hosts, one device). The encoder runs on every device either way:
  on one device beside the decoders it would load that device with as much work again as a decoder (the
  encoder's FLOPs per image are close to a decoder's), and the others would wait for it."""
  mesh = data_mesh() if mesh is None else mesh
  devices = list(mesh.devices.flat)
  if len(devices) == 1 or jax.process_count() > 1 or any(d.platform != "cpu" for d in devices):
    return Layout(mesh)
  load, decoders = [0.0] * len(devices), [None] * len(layer_costs)
  for layer in sorted(range(len(layer_costs)), key=lambda l: -layer_costs[l]):
    i = int(np.argmin(load))
    decoders[layer], load[i] = SingleDeviceSharding(devices[i]), load[i] + layer_costs[layer]
  return Layout(mesh, tuple(decoders))


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """A short batch (n, ...) padded with zeros to `size` rows, so that it runs the program compiled for
  full batches instead of compiling one of its own; the caller keeps only the first n results."""
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < size else x


def place_state(state, layout: Layout):
  """A `train.TrainState` where the layout trains it: each decoder's parameters, optimiser state and
  permutations on its device (or replicated), the normalisation replicated over the mesh."""
  per_layer = lambda trees: tuple(layout.put_decoder(l, t) for l, t in enumerate(trees))
  return state._replace(params=per_layer(state.params), opt_states=per_layer(state.opt_states),
                        permutations=per_layer(state.permutations),
                        normalization=replicate(state.normalization, layout.mesh))


@functools.partial(jax.jit, static_argnums=0, static_argnames="mesh")
def encode(model, encoder_variables, images, mesh=None):
  """`model.encode` with the images (B, S, S, 3) split over the `mesh`'s devices (`shard_batch`), each
  device encoding its own share."""
  run = per_device(functools.partial(model_lib.encode_images, model), mesh, images.shape[0])
  return run(encoder_variables, images)


@functools.partial(jax.jit, static_argnums=0, static_argnames="mesh")
def image_log_probs(model, encoder_variables, params, permutations, images, mesh=None):
  """`model.image_log_probs` with the images split over the `mesh`'s devices and the rest replicated,
  each device scoring its own."""
  run = per_device(functools.partial(model_lib.local_log_probs, model), mesh, images.shape[0])
  return run(encoder_variables, params, permutations, images)


def batch_log_probs(model, replicated, images, mesh):
  """`image_log_probs` of a host batch, split over the mesh; `replicated` = (encoder_variables, params,
  permutations), placed on all of its devices by `replicate`.

  On a CPU split into several devices the result is gathered onto the first device. Each of them works
  through its own queue there, at its own pace; a maximum over a batch split across them is a collective,
  and one that waits more than 40 s for the slowest queue aborts the process (XLA:CPU's rendezvous
  timeout, hit after minutes of scoring). A copy to one device just waits.
  On several processes they are gathered onto every device instead, so that each process can read them
  (each computed only its own share of the batch)."""
  log_probs = image_log_probs(model, *replicated, shard_batch(images, mesh), mesh=mesh)
  if jax.process_count() > 1:
    return replicate_computed(log_probs, mesh)
  return jax.device_put(log_probs, mesh.devices.flat[0]) if _gathered(mesh) else log_probs


def _gathered(mesh) -> bool:
  """Whether scores are gathered onto one device: a CPU (where each device loops over its own images)
  split into several devices, in one process."""
  return jax.default_backend() == "cpu" and mesh.size > 1 and jax.process_count() == 1


def beside_log_probs(tree, mesh):
  """`tree` (normalisation constants) placed where `batch_log_probs` leaves its results: on their one
  device on a split CPU, else replicated over the mesh."""
  return jax.device_put(tree, mesh.devices.flat[0]) if _gathered(mesh) else replicate(tree, mesh)
