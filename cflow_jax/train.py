"""Training the decoders (docs/design.md section 6): the schedule, the epoch loop, checkpoints, normalisation.

Per image batch the frozen encoder runs once; then each tapped layer's decoder takes its chunk loop
(`train_step`, pure), compiled once per feature shape (`make_train_layer`), so Python runs once per image
batch and layer rather than once per optimiser step. The layers' loops are dispatched one after the other
and run concurrently where their decoders sit on different devices (`runtime.train_layout`).

The learning rates of an image batch's steps are an argument of its call, taken from the schedule on the
host (`chunk_rates`): new rates do not recompile.
"""

import functools
import time
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cflow_jax import checkpoint, flow, runtime
from cflow_jax.train_step import (DecoderState, chunks_per_batch, init_decoders, layer_keys, per_layer,
                                  train_layer_fn)
from cflow_jax.anomaly_map import Normalization, compiled_maps, layer_constant
from cflow_jax.config import Config
from cflow_jax.errors import UserError


class TrainingDiverged(UserError):
  """A loss became NaN or Inf."""


def learning_rate(config: Config) -> Callable[[np.ndarray], np.ndarray]:
  """The learning rate at points of the run given as its progress, fractions in [0, 1).

  "cosine": cosine decay from lr to lr * 1e-3 over the whole run, after a linear warm-up over its first
  `warmup` fraction from lr / 10 to the cosine's value there (the original code's curve, made a function
  of progress instead of meta-epochs, so that every budget warms up, reaches the peak and ends at the
  floor; the original's own formula never passes the floor at 1 or 2 meta-epochs). At the original's
  25 x 8 epochs it differs from the original's curve, which holds the cosine constant within each
  meta-epoch, by at most 6.2% of lr (tests/test_train.py).
  "constant" (anomalib): lr throughout.

  Plain numpy, evaluated on the host: rates made on a device would wait there behind its training steps.
  """
  lr = config.lr
  if config.schedule == "constant":
    return lambda progress: np.full(np.shape(progress), lr, np.float32)
  floor = lr * 1e-3
  cosine = lambda t: floor + (lr - floor) * (1 + np.cos(np.pi * t)) / 2
  warmup = config.warmup

  def schedule(progress):
    t = np.asarray(progress, np.float64)
    if not warmup:
      return cosine(t).astype(np.float32)
    ramp = lr / 10 + (cosine(warmup) - lr / 10) * t / warmup
    return np.where(t < warmup, ramp, cosine(t)).astype(np.float32)

  return schedule


def chunk_rates(schedule, batch: int, total_batches: int, steps: int, compiled_steps: int) -> np.ndarray:
  """The learning rate of each optimiser step of one image batch, (compiled_steps,) float32: the batch
  spans the progress [batch, batch + 1) / total_batches, its `steps` real steps evenly; the steps of a
  padded short batch past its real ones get zeros (they are skipped)."""
  rates = schedule((batch + np.arange(steps) / steps) / total_batches)
  return np.pad(rates, (0, compiled_steps - steps))


@functools.lru_cache(maxsize=8)
def make_train_layer(model, mesh=None):
  """`train_step.train_layer_fn` jitted, with the decoder's state donated and the key passed as its raw
  data (see `layer_key_data`): compiled once per layer shape (and device). With a `mesh` of several
  devices each chunk's fibers are split over them (data parallelism; XLA all-reduces the gradients).
  Cached, so runs with the same config share the compilations."""
  train_layer = train_layer_fn(model.config, lambda x: runtime.constrain_fibers(x, mesh))

  def from_key_data(decoder, features, key_data, lr, valid_images):
    return train_layer(decoder, features, jax.random.wrap_key_data(key_data), lr, valid_images)

  return jax.jit(from_key_data, donate_argnums=0)


def layer_key_data(key, layers: int) -> np.ndarray:
  """`layer_keys` as host data, (layers, 2) uint32. A key made on a device is a computation queued there
  behind whatever that device is doing; host data goes straight to the device that needs it."""
  return np.asarray(jax.random.key_data(layer_keys(key, layers)))


def train_batch(model, layout: runtime.Layout, decoders, features, key_data, lr,
                valid_images: int | None = None):
  """One image batch for every decoder: (decoders, losses), tuples over layers of `DecoderState`s (used up:
  donated) and of each chunk's loss; `key_data` from
  `layer_key_data`, `lr` host data as `per_layer` takes it; `valid_images`: how many of the batch's images
  are real (a short batch padded to the compiled shape, `padded_chunks`; default all). Losses of skipped
  steps are zeros after the real ones.

  Each layer's step is dispatched where the layout puts its decoder and returns at once (JAX's
  asynchronous dispatch), so decoders on different devices train concurrently; reading a result waits.
  """
  step = make_train_layer(model, layout.split_mesh)
  valid = np.int32(features[0].shape[0] if valid_images is None else valid_images)
  out = []
  rates = per_layer(lr, len(features))
  for layer, (d, f, k, r) in enumerate(zip(decoders, features, key_data, rates)):
    out.append(step(d, layout.put_step_input(layer, f), k, r, valid))
  return tuple(o[0] for o in out), tuple(o[1] for o in out)


def padded_chunks(model, valid_images: int, batch_size: int) -> tuple[int, ...] | None:
  """The steps each layer takes on a short batch of `valid_images` padded to `batch_size` images, or None
  where padding would not train as the batch alone would (then it compiles its own programs): each layer's
  real fibers must fill at least one chunk and, where the last chunk would take a remainder
  (`drop_remainder` False), leave none, and a full batch must not be one chunk longer than N
  (whose fibers a padded batch cannot tell apart)."""
  config, steps = model.config, []
  for h in model.feature_sizes():
    full, real = batch_size * h * h, valid_images * h * h
    size = min(config.fiber_batch, full)
    one_long_chunk = size < full < 2 * size
    if real < size or (not config.drop_remainder and (real % size or one_long_chunk)):
      return None
    steps.append(real // size)
  return tuple(steps)


def layer_costs(model) -> tuple[float, ...]:
  """Each decoder's share of a training step's work: fibers per image times FLOPs per fiber."""
  config = model.config
  return tuple(h * h * flow.train_flops(c, config.condition_dim, config.coupling_blocks)
               for h, c in zip(model.feature_sizes(), model.channels))


class TrainState(NamedTuple):
  """Everything a run saves and resumes from: the decoders' states (`decoders`), kept as one tuple over
  layers per field, the layout of every checkpoint written so far, and the normalisation."""
  params: tuple
  opt_states: tuple
  permutations: tuple
  normalization: Normalization

  @property
  def decoders(self) -> tuple[DecoderState, ...]:
    return tuple(DecoderState(*d) for d in zip(self.params, self.opt_states, self.permutations))

  def with_decoders(self, decoders) -> "TrainState":
    return self._replace(params=tuple(d.params for d in decoders),
                         opt_states=tuple(d.opt_state for d in decoders),
                         permutations=tuple(d.permutations for d in decoders))


def init_state(model, key) -> TrainState:
  decoders = init_decoders(model, key)
  layers = len(decoders)
  return TrainState((), (), (), Normalization(jnp.zeros((layers,)), jnp.zeros(()))).with_decoders(decoders)


def batch_key(seed: int, epoch: int, batch: int):
  """The shuffle key of one image batch: a pure function of (seed, epoch, batch), so a resumed run
  shuffles exactly as an uninterrupted one."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed + 1), epoch), batch)


def fit(model, encoder_variables, train_batches: Callable[[int], Iterable[np.ndarray]],
        batches_per_epoch: int, *, workdir=None, meta: dict | None = None,
        progress: bool = True, log: Callable[[str], None] = print,
        layout: runtime.Layout | None = None) -> tuple[TrainState, dict]:
  """Trains the decoders; returns (state, history).

  Args:
    train_batches: epoch -> iterable of image batches (B, S, S, 3), uint8 or float32 in [0, 1], or of
      already encoded feature tuples (cached features); a pure function of the epoch (same order and
      augmentation each time it is asked), which is what makes resuming exact.
    batches_per_epoch: how many batches `train_batches` yields per epoch (the learning-rate schedule
      counts image batches); the last may be shorter than the others.
    workdir: if given, a checkpoint is written after every epoch and an existing one is resumed.
    meta: JSON-able identity saved with each checkpoint (encoder weights, dataset).
    layout: where the work runs (default `runtime.train_layout`: the decoders side by side on a CPU split
      into several devices, else data parallelism over all devices); `runtime.Layout(mesh)` is data
      parallelism over that mesh.
  """
  config = model.config
  schedule, total_batches = learning_rate(config), config.epochs * batches_per_epoch
  state = init_state(model, jax.random.key(config.seed))
  history = {"epoch_loss": [], "epoch_seconds": [], "fibers_per_epoch": 0}
  start = 0
  if workdir is not None and checkpoint.latest_step(workdir) is not None:
    resumable = lambda step: _resumable(workdir, step, state, config, meta)
    state, saved_meta = checkpoint.newest_intact(workdir, resumable, log)
    state = TrainState(*state)
    start, history = saved_meta["epoch"], saved_meta["history"]
    if start:
      log(f"resuming from the checkpoint after epoch {start} in {workdir}")

  layout = runtime.train_layout(layer_costs(model)) if layout is None else layout
  state = runtime.place_state(state, layout)
  encoder_variables = runtime.replicate(encoder_variables, layout.mesh)
  layers, keys, full = len(model.channels), [], None

  def dispatch(epoch, b, images):
    nonlocal state, keys, full
    if b == 0:
      # Every batch's keys on the host, made while the devices are idle: made later on a device, they
      # would wait there behind the previous batch's steps and hold back the other devices.
      keys = [layer_key_data(batch_key(config.seed, epoch, i), layers) for i in range(batches_per_epoch)]
    cached = isinstance(images, tuple)  # features
    valid = len(images[0] if cached else images)
    full = valid if b == 0 else full  # the epoch's batches' size (only the last may be shorter)
    real = padded_chunks(model, valid, full) if valid < full else None
    if real is not None:
      # A short last batch, padded with zeros to the others' size, reuses their compiled programs.
      pad = lambda x: runtime.pad_batch(x, full)
      images = tuple(map(pad, images)) if cached else pad(images)
    else:
      real = (None,) * layers  # every loss is real
    steps = [chunks_per_batch(len(images[0] if cached else images) * h * h, config)
             for h in model.feature_sizes()]
    rates = tuple(chunk_rates(schedule, epoch * batches_per_epoch + b, total_batches, k or n, n)
                  for k, n in zip(real, steps))
    if cached:
      features = tuple(layout.put_images(f) for f in images)
    else:
      features = runtime.encode(model, encoder_variables, layout.put_images(images), mesh=layout.mesh)
    decoders, layer_losses = train_batch(model, layout, state.decoders, features, keys[b], rates, valid)
    state = state.with_decoders(decoders)
    return layer_losses, valid * sum(f.shape[1] * f.shape[2] for f in features), real

  def end_epoch(epoch, history):
    if workdir is not None:
      checkpoint.save(workdir, state, _meta(config, meta, epoch + 1, history))

  history = epoch_loop(model, train_batches, dispatch, batches_per_epoch, start=start, history=history,
                       end_epoch=end_epoch, workdir=workdir, progress=progress)
  # Scoring splits image batches over the data mesh, with every decoder on all of its devices.
  return runtime.replicate(state, layout.mesh), history


def epoch_loop(model, batches: Callable[[int], Iterable], dispatch: Callable, batches_per_epoch: int, *,
               start: int = 0, history: dict | None = None, end_epoch: Callable | None = None, workdir=None,
               progress: bool = True, categories: list | None = None) -> dict:
  """The epoch loop that `fit` and `multi.fit_many` share: epochs from `start` (a resumed run's), the
  progress bar, each batch's losses checked for NaN, the history; returns the history.

  Args:
    batches: epoch -> iterable of batches, handed to `dispatch` as they come.
    dispatch: (epoch, index, batch) -> (losses per layer, fibers trained, real steps per layer or None
      each): queues the batch's steps and returns at once; its losses are read only once the next batch
      is queued, so that the devices do not idle on Python between batches.
    history: a resumed run's, continued.
    end_epoch: (epoch, history) after each epoch (where `fit` writes its checkpoint).
    workdir: named in the message of a run stopped by a NaN loss.
    categories: with decoders stacked over categories (losses (K, steps)), their names, for that message.
  """
  config = model.config
  history = history or {"epoch_loss": [], "epoch_seconds": [], "fibers_per_epoch": 0}
  bar = tqdm(total=config.epochs * batches_per_epoch, initial=start * batches_per_epoch, desc="training",
             disable=not progress, unit="batch", dynamic_ncols=True)
  finish = lambda pending, losses, epoch: _finish(pending, losses, model, epoch, workdir, categories)
  for epoch in range(start, config.epochs):
    began, losses, fibers, pending = time.perf_counter(), [], 0, None
    for b, batch in enumerate(batches(epoch)):
      dispatched = (b,) + tuple(dispatch(epoch, b, batch))
      if pending is not None:
        fibers += finish(pending, losses, epoch)
        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}",
                        fibers_s=f"{fibers / max(time.perf_counter() - began, 1e-9):,.0f}")
      pending = dispatched
      bar.update()
    if pending is not None:
      fibers += finish(pending, losses, epoch)
    history["epoch_loss"].append(float(np.mean(losses)) if losses else float("nan"))
    history["epoch_seconds"].append(time.perf_counter() - began)
    history["fibers_per_epoch"] = fibers
    if end_epoch is not None:
      end_epoch(epoch, history)
  bar.close()
  return history


def _resumable(workdir, step, like_state, config, meta):
  """(state, meta) of checkpoint `step`, once its run is known to be this one continued."""
  saved_meta = checkpoint.read_meta(workdir, step)
  checkpoint.check_same_run(saved_meta, config, meta, workdir)
  return checkpoint.restore(workdir, like_state, step)


def _finish(pending, losses: list, model, epoch, workdir, categories=None) -> int:
  """Waits for a dispatched image batch (index, per-layer losses, fibers, real steps), appends its mean
  loss to `losses` and returns its fiber count; stops the run if any loss is not finite."""
  batch, layer_losses, fibers, real = pending
  layer_losses = [np.asarray(l)[..., :k] for l, k in zip(layer_losses, real)]
  _check_finite(layer_losses, model, epoch, batch, workdir, categories)
  losses.append(float(np.mean([l.mean() for l in layer_losses])))
  return fibers


def _meta(config, meta, epoch, history, normalized=False):
  return {"config": config.to_json(), "identity": meta or {}, "epoch": epoch, "history": history,
          "normalized": normalized}


def _check_finite(layer_losses, model, epoch, batch, workdir, categories=None):
  """A TrainingDiverged naming the first non-finite loss: its chunk (the last axis) and layer, and its
  category where `categories` name the leading axis of stacked decoders."""
  for layer, losses in enumerate(layer_losses):
    bad = np.argwhere(~np.isfinite(losses))
    if len(bad):
      first = tuple(bad[0])
      kept = (f"the last good checkpoint in {workdir} is kept" if workdir is not None
              else "no checkpoint was being written")
      category = f", category {categories[first[0]]}" if categories else ""
      raise TrainingDiverged(
          f"loss became {losses[first]} at epoch {epoch + 1}, image batch {batch + 1}, "
          f"chunk {first[-1] + 1}, layer {model.spec.taps[layer]}{category}; {kept}. "
          "Try a lower --lr or check the input data.")


def unset_normalization(layers: int) -> Normalization:
  """The normalisation of a run that fixed none (its config normalises by the test set or each batch):
  NaN, so that scoring with training maxima it does not have is refused (`api.score_batches`)."""
  return Normalization(jnp.full((layers,), jnp.nan), jnp.asarray(jnp.nan))


def fit_normalization(model, encoder_variables, params, permutations, batches: Iterable[np.ndarray],
                      mesh=None, batch_size: int | None = None) -> Normalization:
  """Fixed normalisation constants from (training) images, so that later scores do not depend on which
  images are scored together: per layer, `anomaly_map.layer_constant` of all the images' fibers, then the
  max of the likelihood map. The batches are split over the `mesh` (default: all devices). A batch shorter than `batch_size` (default: the first
  batch's size) is padded to it: give the size the test set is scored at (`api.score_batches` pads to
  it too) and the pass runs the very programs scoring runs next (log-likelihoods, then maps), instead of
  compiling its own."""
  mesh = runtime.data_mesh() if mesh is None else mesh
  replicated = runtime.replicate((encoder_variables, params, permutations), mesh)
  padded_log_probs, counts, full = [], [], batch_size
  for images in batches:
    n, full = len(images), full or len(images)
    padded_log_probs.append(runtime.batch_log_probs(model, replicated, runtime.pad_batch(images, full), mesh))
    counts.append(n)
    if len(padded_log_probs) > 1:
      # One batch in flight at a time: a progress bar over `batches` then counts finished work, and the
      # device still never waits for the host.
      jax.block_until_ready(padded_log_probs[-2])
  real = [lp if n == full else tuple(layer[:n] for layer in lp)  # the padding is dropped
          for lp, n in zip(padded_log_probs, counts)]
  config = model.config
  # On the host: jnp.quantile would compile a sort for each layer's size (0.2-0.3 s each on a CPU).
  constants = jnp.asarray([layer_constant(np.concatenate([np.asarray(lp[layer]).ravel() for lp in real]),
                                          config.likelihood, config.floor_quantile)
                           for layer in range(len(real[0]))], jnp.float32)
  # Scoring's map program with a map maximum of 0 gives -likelihood: its minimum is the maximum sought.
  provisional = runtime.beside_log_probs(Normalization(constants, jnp.zeros((), jnp.float32)), mesh)
  map_max = max(-float(jnp.min(compiled_maps(lp, config.image_size, provisional, config.blur_sigma,
                                             config.likelihood)[0][:n]))
                for lp, n in zip(padded_log_probs, counts))
  return Normalization(constants, jnp.asarray(map_max, jnp.float32))


def save_final(workdir, state: TrainState, config: Config, meta: dict, history: dict):
  """The finished run, with its normalisation, as the step after the last epoch's (`checkpoint.save`:
  written beside it, switched to by orbax's atomic rename)."""
  checkpoint.save(workdir, state, _meta(config, meta, config.epochs, history, True))
