"""One decoder's training step as pure functions (docs/design.md section 6): fibers, chunks, optax Adam.

A decoder's training state is one pytree, `DecoderState`: its parameters, its Adam state and its fixed
permutations. `train_layer_fn` gives the pure function that trains it on one image batch's features of
its layer: all B*h*w fibers and their positional codes shuffled jointly with an explicit key and cut into
chunks of N, one Adam step per chunk, the whole chunk loop one `lax.scan`. Nothing here places work or
reads the host: where a step runs, and the loop over epochs and batches, are `runtime`'s and `train`'s.

Each decoder has its own Adam state (PyTorch 2's behaviour for one optimiser over all decoders: a decoder
that got no gradient this step does not move).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cflow_jax import flow, flow_speed, model as model_lib, precision
from cflow_jax.config import Config


class DecoderState(NamedTuple):
  """One decoder's training state: `params` (trained), `opt_state` (Adam's), `permutations` (fixed at
  construction, never trained), each with a leading block axis (`flow.init_decoder`)."""
  params: dict
  opt_state: object
  permutations: jax.Array


def init_decoders(model, key) -> tuple[DecoderState, ...]:
  """The initial `DecoderState` of every tapped layer's decoder."""
  params, permutations = model_lib.init_decoders(model, key)
  return tuple(DecoderState(p, make_optimizer().init(p), q) for p, q in zip(params, permutations))


def chunks_per_batch(n_fibers: int, config: Config) -> int:
  """Optimiser steps a layer takes per image batch of n_fibers fibers."""
  return max(n_fibers // config.fiber_batch, 1)


def make_optimizer() -> optax.GradientTransformation:
  """Adam's scaling of the gradients (the learning rate is given to each step, see `train_layer_fn`);
  its moments and step count advance per chunk, as PyTorch's Adam does per `step()`."""
  return optax.scale_by_adam()


def _chunk_indices(key, n: int, config: Config, valid=None):
  """A joint shuffle of n fibers cut into chunks: (main (K, N), last or None).

  With `drop_remainder` the n mod N leftover fibers are skipped (the original); otherwise the last chunk
  takes them (anomalib), so it is longer than N and gets its own step. With `valid` (traced) only the
  first `valid` fibers are real (a short batch padded to the compiled shape, see `train.padded_chunks`): the
  shuffle puts them first, in the order it gives them, and the steps past them are skipped.
  """
  order = jax.random.permutation(key, n)
  if valid is not None:
    order = order[jnp.argsort(order >= valid, stable=True)]
  size = min(config.fiber_batch, n)
  k = chunks_per_batch(n, config)
  if config.drop_remainder or n % size == 0:
    return order[:k * size].reshape(k, size), None
  return order[:(k - 1) * size].reshape(k - 1, size), order[(k - 1) * size:]


def train_layer_fn(config: Config, constrain=None):
  """The pure function train_layer(decoder, features, key, lr, valid_images=None) -> (decoder, losses):
  one decoder's chunk loop (a `DecoderState`) over one image batch's features (B, h, w, C) of its layer;
  `losses` holds the loss of every chunk. `lr` is the learning rate of each chunk's step, (chunks,) as
  `train.chunk_rates` gives them, or one scalar for all (traced: new values do not recompile).
  `valid_images` (traced): how many of the batch's images are real (a short batch padded to the compiled
  shape, `train.padded_chunks`; default all).

  `constrain` (default none) is applied to each chunk's fibers and conditions (N, ...) before the flow:
  the runtime's hook for splitting them over devices (`runtime.constrain_fibers`).
  """
  optimizer = make_optimizer()
  constrain = constrain or (lambda x: x)

  def train_layer(decoder: DecoderState, features, key, lr, valid_images=None):
    params, opt_state, permutations = decoder
    fibers, condition = model_lib.fibers_and_condition(features, config.condition_dim)
    b, h, w, _ = features.shape
    channels = fibers.shape[-1]
    # The chunk loop carries every block's arrays separately (see flow_speed.split_blocks).
    split_permutations = flow_speed.split_blocks(permutations)

    def loss_fn(p, idx):
      x = constrain(fibers[idx])
      c = constrain(condition[idx])
      log_p = precision.with_matmul_dtype(
          lambda dtype, x, c: flow.log_prob(p, split_permutations, x, c, config.clamp, dtype),
          config.train_dtype, x, c)
      return flow.nll_loss(log_p, channels)

    loss_and_grads = jax.value_and_grad(loss_fn)

    def update(p, s, grads, rate):
      updates, s = optimizer.update(grads, s, p)
      return optax.apply_updates(p, jax.tree.map(lambda u: -rate * u, updates)), s

    # Each step in the loop applies the previous step's gradient (at that step's rate), then takes its
    # own, so the weights its matmuls read are written only by the next step's update. Updating after the
    # backward pass made XLA copy every weight at the start of each step (an in-place update is not
    # ordered after the backward matmuls that read the weight without feeding its own gradient). The
    # first gradient is taken before the loop and the last one applied after it.
    def step(carry, chunk):
      p, s, grads, rate = carry
      idx, next_rate = chunk
      p, s = update(p, s, grads, rate)
      loss, grads = loss_and_grads(p, idx)
      return (p, s, grads, next_rate), loss

    p, s = flow_speed.split_blocks((params, opt_state), config.condition_dim)
    # With a traced count of real images, full and padded short batches share one compiled program.
    valid = None if valid_images is None else valid_images * h * w
    main, last = _chunk_indices(key, fibers.shape[0], config, valid)
    if not len(main):  # a single chunk, longer than N (never padded: `padded_chunks`)
      main, last = last[None], None
    rates = jnp.broadcast_to(jnp.asarray(lr, jnp.float32), (len(main) + (last is not None),))
    first_loss, grads = loss_and_grads(p, main[0])
    carry = (p, s, grads, rates[0])
    if valid is None:
      carry, losses = jax.lax.scan(step, carry, (main[1:], rates[1:len(main)]))
      losses = jnp.concatenate([first_loss[None], losses])
    else:
      def body(i, loop):
        carry, losses = loop
        carry, loss = step(carry, (main[i], rates[i]))
        return carry, losses.at[i].set(loss)

      steps = jnp.maximum(valid // main.shape[1], 1)
      losses = jnp.zeros(len(main)).at[0].set(first_loss)
      carry, losses = jax.lax.fori_loop(1, steps, body, (carry, losses))
    if last is not None:
      full = True if valid_images is None else valid_images == b
      carry, last_loss = jax.lax.cond(full, step, lambda c, _: (c, jnp.zeros(())), carry,
                                      (last, rates[-1]))
      losses = jnp.concatenate([losses, last_loss[None]])
    params, opt_state = flow_speed.stack_blocks(update(*carry))
    return DecoderState(params, opt_state, permutations), losses

  return train_layer


def layer_keys(key, layers: int):
  """The shuffle key of each layer's fibers, from an image batch's key."""
  return jax.random.split(key, layers)


def per_layer(lr, layers: int) -> tuple:
  """Learning rates as a tuple over layers: `lr` already is one (each layer's `chunk_rates`), or one
  scalar for every step of every layer."""
  return lr if isinstance(lr, tuple) else (lr,) * layers


def train_batch_fn(config: Config):
  """The pure function train_batch(decoders, features, key, lr) -> (decoders, losses): `train_layer_fn`
  for every layer, as one function (tuples over layers; `lr` as `per_layer` takes it)."""
  train_layer = train_layer_fn(config)

  def train_batch(decoders, features, key, lr):
    keys = layer_keys(key, len(features))
    out = [train_layer(*args) for args in zip(decoders, features, keys, per_layer(lr, len(features)))]
    return tuple(o[0] for o in out), tuple(o[1] for o in out)

  return train_batch
