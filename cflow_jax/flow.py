"""Conditional normalizing flows over fibers: the CFLOW decoder (docs/design.md sections 4-5).

One decoder per tapped encoder layer. A decoder is `coupling_blocks` identical blocks, each the composition
(FrEIA's AllInOneBlock, as both references use it)

    block = Permutation o GlobalAffine o ConditionalAffineCoupling

written as distrax bijectors on fibers (events of C channels), applied to a chunk of fibers at once. Block
parameters are stacked along a leading axis (or split into per-block tuples while training, see
`flow_speed.split_blocks`) and the blocks are applied in an unrolled loop. The subnet is one function,
`subnet`; the forms of its matmuls that only run faster live beside this file, in `flow_speed`.

Parameters are split in two pytrees: `params` (trained) and `permutations` (fixed at construction, never
trained), both with a leading block axis.
"""

import functools
import math

import distrax
import jax
import jax.numpy as jnp

from cflow_jax.flow_speed import block, dense, first_linear_rows

# -C/2 ln(2 pi) per channel of the standard normal base distribution.
_LOG_NORMALIZER = -0.5 * math.log(2.0 * math.pi)
# sigma(g) = 0.2 ln(1 + exp(g / 2)) is 1 at this g (FrEIA's "SOFTPLUS" global affine, init 1.0).
_GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(5.0) - 1.0)


def split_sizes(channels: int) -> tuple[int, int]:
  """(untouched, transformed) channel counts: the first ceil(C/2) channels condition the rest."""
  return (channels + 1) // 2, channels // 2


def global_scale(g):
  """FrEIA's SOFTPLUS activation: 0.1 * softplus with beta 0.5."""
  return 0.2 * jax.nn.softplus(0.5 * g)


class Permutation(distrax.Bijector):
  """A fixed channel permutation: hard (index array, (C,)) or soft (rotation matrix, (C, C)).

  Both have |det| = 1, so the log-det is zero.
  """

  def __init__(self, permutation):
    super().__init__(event_ndims_in=1)
    self._permutation = permutation

  def forward_and_log_det(self, x):
    if self._permutation.ndim == 1:
      y = jnp.take(x, self._permutation, axis=-1)
    else:
      y = x @ self._permutation.T
    return y, jnp.zeros(x.shape[:-1], x.dtype)

  def inverse_and_log_det(self, y):
    if self._permutation.ndim == 1:
      x = jnp.take(y, jnp.argsort(self._permutation), axis=-1)
    else:
      x = y @ self._permutation  # a rotation's inverse is its transpose
    return x, jnp.zeros(y.shape[:-1], y.dtype)


def subnet(block, x1, condition, dtype=jnp.float32):
  """The coupling's subnet, the one place to change it: the coefficients (2 c2,) of the transformed half
  from the untouched half x1 (c1,) and the fiber's condition (P,), Linear - ReLU - Linear.

  [x1, c] @ w1 is computed as two matmuls: the condition is a constant, so the backward pass never forms
  its gradient, and a condition shared by several fibers (vmapped over them) is projected only once.
  `dense` and `first_linear_rows` are the plain matmul and row split of w1 unless `dtype` or the
  parameters' layout opts into their faster forms (`flow_speed`).
  """
  w1_fiber, w1_condition = first_linear_rows(block["w1"], condition.shape[-1])
  h = jax.nn.relu(dense(x1, w1_fiber, dtype) + dense(condition, w1_condition, dtype) + block["b1"])
  # The whole coefficient vector is scaled by 0.1 for a gentle start (FrEIA).
  return 0.1 * (dense(h, block["w2"], dtype) + block["b2"])


def coupling_block(block, permutation, condition, clamp, dtype=jnp.float32):
  """One AllInOneBlock on one fiber as a distrax bijector.

  Args:
    block: one block's parameters, {w1 (d_in, 2 d_in), b1, w2 (2 d_in, 2 c2), b2, global_scale (C,),
      global_offset (C,)} with d_in = c1 + P.
    permutation: (C,) indices or (C, C) rotation.
    condition: (P,) positional code of the fiber; it enters the subnet of every block.
    clamp: alpha of the soft clamp j = alpha * tanh(s).
    dtype: the subnet matmuls' input type (float32, or bfloat16 with float32 sums; see `flow_speed.dense`).
  """
  c1, _ = split_sizes(block["global_offset"].shape[-1])

  def conditioner(x1):
    s, t = jnp.split(subnet(block, x1, condition, dtype), 2, axis=-1)
    return clamp * jnp.tanh(s), t

  def affine(coefficients):
    log_scale, shift = coefficients
    return distrax.ScalarAffine(shift=shift, log_scale=log_scale)

  coupling = distrax.SplitCoupling(split_index=c1, event_ndims=1, conditioner=conditioner, bijector=affine)
  global_affine = distrax.Block(
      distrax.ScalarAffine(shift=block["global_offset"], scale=global_scale(block["global_scale"])), 1)
  return distrax.Chain([Permutation(permutation), global_affine, coupling])  # applied right to left


def _flow(params, permutations, x, condition, clamp, inverse, dtype):
  """Runs all blocks on fibers x (..., C) with conditions (..., P); returns (output, log-det (...))."""
  # A Python loop (an unrolled scan): the blocks compile as one straight-line program that XLA fuses
  # across block borders, which pays on the CPU, where training at small N is overhead-bound.
  order = range(num_blocks(params))
  log_det = jnp.zeros((), x.dtype)
  for i in (reversed(order) if inverse else order):
    bijector = coupling_block(block(params, i), block(permutations, i), condition, clamp, dtype)
    apply = bijector.inverse_and_log_det if inverse else bijector.forward_and_log_det
    x, block_log_det = apply(x)
    log_det = log_det + block_log_det
  return x, log_det


def num_blocks(params) -> int:
  return len(params["global_offset"])


def _over_fibers(params, permutations, x, condition, clamp, inverse, dtype):
  """The flow on fibers x (N, C) with conditions (N, P), as matrices: each subnet Linear is one matmul
  over the chunk, and so is its weight gradient (`flow_speed.mixed_matmul`). Or on x (N, K, C) whose K
  fibers share one condition (N, P): vmapped over N and K, where the inner vmap leaves the condition
  unbatched, so its projection in every block is computed once per condition instead of once per fiber."""
  if x.ndim == 3:
    one = lambda x, c: _flow(params, permutations, x, c, clamp, inverse, dtype)
    return jax.vmap(jax.vmap(one, in_axes=(0, None)))(x, condition)
  return _flow(params, permutations, x, condition, clamp, inverse, dtype)


def forward(params, permutations, fibers, condition, clamp=1.9, dtype=jnp.float32):
  """z = f(x | c) for a batch of fibers.

  Args:
    fibers: (N, C) features, or (N, K, C): K fibers for each condition (e.g. one position in K images).
    condition: (N, P) positional codes.
    dtype: the subnet matmuls' input type (`coupling_block`).
  Returns:
    z, shaped as `fibers`, and log|det df/dx|, (N,) or (N, K).
  """
  return _over_fibers(params, permutations, fibers, condition, clamp, False, dtype)


def inverse(params, permutations, z, condition, clamp=1.9, dtype=jnp.float32):
  """x = f^-1(z | c), shaped as z ((N, C) or (N, K, C)), and log|det df^-1/dz|."""
  return _over_fibers(params, permutations, z, condition, clamp, True, dtype)


def log_prob(params, permutations, fibers, condition, clamp=1.9, dtype=jnp.float32):
  """log p(x | c) under a standard normal base, (N,) or (N, K): -C/2 ln 2pi - |z|^2 / 2 + log|det J|."""
  z, log_det = forward(params, permutations, fibers, condition, clamp, dtype)
  channels = fibers.shape[-1]
  return channels * _LOG_NORMALIZER - 0.5 * jnp.sum(z * z, axis=-1) + log_det


def nll_loss(log_probs, channels):
  """The reference's training loss: mean over fibers of -logsigmoid(log p / C)."""
  return -jnp.mean(jax.nn.log_sigmoid(log_probs / channels))


# Compiled as one program: drawn op by op, the draws compiled a dozen small programs per decoder shape.
@functools.partial(jax.jit, static_argnames=("channels", "condition_dim", "coupling_blocks", "permutation"))
def init_decoder(key, channels, condition_dim=128, coupling_blocks=8, permutation="hard"):
  """Initial (params, permutations) of one decoder, blocks stacked along axis 0.

  Subnet Linears follow PyTorch's default initialisation (uniform in +-1/sqrt(fan_in) for weights and
  biases), the global affine starts as the identity, the permutations are drawn once here and never trained.
  """
  c1, c2 = split_sizes(channels)
  d_in = c1 + condition_dim

  def uniform(k, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

  def one_block(k):
    k1, k2, k3, k4, k_perm = jax.random.split(k, 5)
    params = {
        "w1": uniform(k1, (d_in, 2 * d_in), d_in),
        "b1": uniform(k2, (2 * d_in,), d_in),
        "w2": uniform(k3, (2 * d_in, 2 * c2), 2 * d_in),
        "b2": uniform(k4, (2 * c2,), 2 * d_in),
        "global_scale": jnp.full((channels,), _GLOBAL_SCALE_INIT, jnp.float32),
        "global_offset": jnp.zeros((channels,), jnp.float32),
    }
    if permutation == "hard":
      perm = jax.random.permutation(k_perm, channels).astype(jnp.int32)
    elif permutation == "soft":
      perm = random_rotation(k_perm, channels)
    else:
      raise ValueError(f"permutation must be 'hard' or 'soft', got {permutation!r}")
    return params, perm

  return jax.vmap(one_block)(jax.random.split(key, coupling_blocks))


def random_rotation(key, n):
  """A Haar-random rotation (det +1), as scipy's special_ortho_group draws for O's soft permutation."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
  q = q * jnp.sign(jnp.diag(r))[None, :]
  # Flip one column if needed so that det = +1 (a rotation, not a reflection).
  sign = jnp.sign(jnp.linalg.det(q))
  return q.at[:, 0].multiply(sign)


def _matmul_flops(channels: int, condition_dim: int) -> tuple[int, int, int]:
  """One block's subnet matmuls for one fiber, in FLOPs: the fiber's half and the condition's part of the
  first Linear, and the second Linear."""
  c1, c2 = split_sizes(channels)
  hidden = 2 * (c1 + condition_dim)
  return 2 * c1 * hidden, 2 * condition_dim * hidden, 2 * hidden * 2 * c2


def forward_flops(channels: int, condition_dim: int = 128, coupling_blocks: int = 8,
                  fibers_per_condition: int = 1) -> float:
  """FLOPs of one fiber's forward pass (the subnet matmuls; everything else is O(C)), where each
  condition's projection is shared by `fibers_per_condition` fibers (scoring: the batch's images)."""
  fibers, condition, second = _matmul_flops(channels, condition_dim)
  return coupling_blocks * (fibers + condition / fibers_per_condition + second)


def train_flops(channels: int, condition_dim: int = 128, coupling_blocks: int = 8) -> int:
  """FLOPs of one fiber's training step: the forward pass, the weight gradients (as much again), and the
  gradients of the hidden layer and of the fibers' half of each block's input (the condition is a constant;
  the first block's input is the data)."""
  fibers, condition, second = _matmul_flops(channels, condition_dim)
  return coupling_blocks * (2 * (fibers + condition + second) + second) + (coupling_blocks - 1) * fibers

