"""Several categories in one program: the decoders of K categories stacked and trained with `jax.vmap`.

The frozen encoder is shared: each step encodes the K categories' image batches as one batch of K*B
images, then one compiled, vmapped step trains the K sets of decoders on their own fibers. The categories
advance in lockstep, so an epoch has as many image batches as the smallest category gives; a larger
category sees a different random subset of its images every epoch (full batches only: `drop_last_batch`
does not apply, since a stacked step needs the same batch shape for every category). No checkpoints are
written: use `fit` per category for long, resumable runs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cflow_jax import api, model as model_lib, train, train_step
from cflow_jax.config import Config
from cflow_jax.errors import UserError


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree, k):
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(k)]


def fit_many(config: Config, train_sets: dict, *, encoder_variables=None, progress=True) -> dict:
  """Trains one detector per entry of `train_sets` ({category: image set}); returns {category: Detector}.

  Each category starts from the same initial decoders a separate `fit` would use (the config's seed).
  """
  names = list(train_sets)
  if not names:
    raise UserError("fit_many needs at least one training set")
  model, encoder_variables = api.create(config, encoder_variables)
  train_sets = {n: api.resized(config, s) for n, s in train_sets.items()}
  batch_size = min(config.batch_size, *(len(s) for s in train_sets.values()))
  batches_per_epoch = min(len(s) for s in train_sets.values()) // batch_size
  if batches_per_epoch == 0:
    raise UserError("a training set is empty: each category needs defect-free images in train/good")
  k = len(names)
  schedule, total_batches = train.learning_rate(config), config.epochs * batches_per_epoch
  steps = [train_step.chunks_per_batch(batch_size * h * h, config) for h in model.feature_sizes()]
  decoders = _stack([train_step.init_decoders(model, jax.random.key(config.seed))] * k)
  step = jax.jit(jax.vmap(train_step.train_batch_fn(config), in_axes=(0, 0, 0, None)), donate_argnums=0)

  fibers = k * batch_size * sum(h * h for h in model.feature_sizes())

  def batches(epoch):
    streams = [api.input_batches(config, train_sets[n], batch_size, seed=config.seed, epoch=epoch,
                                 rotation=config.rotation, drop_remainder=True) for n in names]
    try:
      for _ in range(batches_per_epoch):
        yield np.concatenate([next(s)["image"] for s in streams])  # (K*B, S, S, 3)
    finally:
      for s in streams:
        s.close()

  def dispatch(epoch, b, images):
    nonlocal decoders
    features = model_lib.encode(model, encoder_variables, images)
    features = tuple(f.reshape((k, batch_size) + f.shape[1:]) for f in features)
    keys = jnp.stack([train.batch_key(config.seed, epoch, b)] * k)
    done = epoch * batches_per_epoch + b
    lr = tuple(train.chunk_rates(schedule, done, total_batches, n, n) for n in steps)
    decoders, layer_losses = step(decoders, features, keys, lr)
    return layer_losses, fibers, (None,) * len(steps)

  history = train.epoch_loop(model, batches, dispatch, batches_per_epoch, progress=progress, categories=names)

  detectors = {}
  for name, ds in zip(names, _unstack(decoders, k)):
    p, q = tuple(d.params for d in ds), tuple(d.permutations for d in ds)
    normalization = api.fixed_normalization(model, encoder_variables, p, q, train_sets[name])
    detectors[name] = api.Detector(model, encoder_variables, p, q, normalization, dict(history))
  return detectors
