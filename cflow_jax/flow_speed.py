"""Faster forms of the flow's own math (`flow`), each opted into and each the same function as the plain
form (docs/design.md section 12.7; tests/test_flow_speed.py compares them).

- `dense` with a bfloat16 `dtype`: the subnet's matmuls with bfloat16 inputs and float32 sums, through a
  hand-written backward pass (`mixed_matmul`); with float32 it is the plain `x @ w`.
- `split_blocks` / `stack_blocks`: a decoder (and its Adam moments) carried through the chunk loop as
  per-block arrays (`Blocks`), the first Linear's weight as its fibers' and its condition's rows (`Rows`);
  `block` and `first_linear_rows` read parameters stored either way.

The encoder's own speed piece, Winograd convolutions, is `winograd.py` beside `encoders.py`.
"""

import functools

import jax
import jax.numpy as jnp


def dense(x, w, dtype=jnp.float32):
  """x @ w with its inputs rounded to `dtype` and the products summed in float32: bfloat16 keeps ~3
  significant digits per input and runs on the matrix units of AMX CPUs, GPUs and TPUs, faster than
  float32 (docs/results.md). Its gradients are bfloat16 matmuls too (`mixed_matmul`)."""
  if jnp.dtype(dtype) == jnp.float32:
    return x @ w
  return mixed_matmul(x, w, jnp.dtype(dtype))


def _row_major_transpose(a):
  """a.T of a matrix, written out. XLA folds a plain transpose into the matmul that reads it, and the
  CPU's bfloat16 matmuls (AMX) take only untransposed row-major operands: a folded one is run in float32
  on Eigen instead, far slower. A transpose through a unit axis is not folded."""
  m, n = a.shape
  return a.reshape(m, n, 1).transpose(1, 0, 2).reshape(n, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x, w, dtype):
  """x (..., a) @ w (a, b) with inputs in `dtype` and float32 sums, forward and backward.

  Autodiff would transpose the product into matmuls of a float32 cotangent with the rounded operands,
  which XLA runs in float32 after casting every weight once more; here each weight is rounded once per
  step, and the cotangent is rounded too (as mixed-precision training does), so all three matmuls of a
  step take the fast path. The weight's gradient is one matmul over all rows of x: apply this to whole
  chunks of fibers (vmapped per fiber, the per-fiber gradients would be formed and summed).
  """
  return _mixed_matmul_fwd(x, w, dtype)[0]


def _mixed_matmul_fwd(x, w, dtype):
  x, w = x.astype(dtype), w.astype(dtype)
  return jnp.matmul(x, w, preferred_element_type=jnp.float32), (x, w)


def _mixed_matmul_bwd(dtype, residuals, g):
  x, w = residuals
  rows = lambda a: a.reshape(-1, a.shape[-1])
  g = rows(g).astype(dtype)
  # dx = g w^T as (w g^T)^T: transposing the chunk's cotangent is cheaper than transposing the weight
  # (N = 64 rows against a weight's hundreds).
  dx = _row_major_transpose(jnp.matmul(w, _row_major_transpose(g), preferred_element_type=jnp.float32))
  dw = jnp.matmul(_row_major_transpose(rows(x)), g, preferred_element_type=jnp.float32)
  return dx.reshape(x.shape), dw


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


class Blocks(tuple):
  """One parameter's per-block arrays (`split_blocks`): a pytree node of its own, so that it is told apart
  from the tuples a tree is built of."""


class Rows(tuple):
  """A first Linear's weight `w1` as (its fibers' rows, its condition's rows) (`split_blocks`)."""


for _node in (Blocks, Rows):
  jax.tree_util.register_pytree_node(_node, lambda b: (tuple(b), None),
                                     lambda _, arrays, node=_node: node(arrays))
_is_split = lambda a: isinstance(a, Blocks)


def first_linear_rows(w1, condition_dim: int):
  """(fiber rows, condition rows) of one block's first Linear, stored whole or as `Rows`."""
  if isinstance(w1, Rows):
    return tuple(w1)
  c1 = w1.shape[-2] - condition_dim
  return w1[..., :c1, :], w1[..., c1:, :]


def split_blocks(tree, condition_dim: int | None = None):
  """Block-stacked arrays (leading block axis) as `Blocks` of per-block arrays; scalars are left alone.
  With `condition_dim`, every `w1` (parameters and Adam moments alike) is also split into its fibers' and
  its condition's rows (`Rows`).

  The training loop carries a decoder and its Adam moments so: indexing a stacked array inside a
  compiled step copies the block out every step, and stacking the blocks' gradients copies them back,
  two passes over every parameter per optimiser step; slicing w1's rows apart copies them every step too,
  and their gradients are padded back to w1's shape and summed (docs/results.md has what each cost).
  """
  def split(path, a):
    if not jnp.ndim(a):
      return a
    if condition_dim is not None and path and getattr(path[-1], "key", None) == "w1":
      return Rows(Blocks(rows) for rows in first_linear_rows(a, condition_dim))
    return Blocks(a)

  return jax.tree_util.tree_map_with_path(split, tree)


def stack_blocks(tree):
  """The inverse of `split_blocks`."""
  def stack(a):
    if isinstance(a, Rows):
      return jnp.concatenate([stack(rows) for rows in a], axis=-2)
    return jnp.stack(a) if _is_split(a) else a

  return jax.tree.map(stack, tree, is_leaf=lambda a: isinstance(a, (Blocks, Rows)))


def block(tree, i: int):
  """Block i of parameters that are block-stacked or split (`split_blocks`)."""
  return jax.tree.map(lambda a: a[i], tree, is_leaf=_is_split)
