"""The flow's speed pieces (`flow_speed`) against the plain math they replace: the bfloat16 matmul's
hand-written backward pass against the rounded operands' products and float32 autodiff, and the chunk
loop's split layout against the block-stacked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import flow, flow_speed
from test_flow import _moved_off_decoder, _perturbed_decoder


def _rounded(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("shape", [(64, 48), (6, 5, 48)])
def test_mixed_matmul_gradients_are_the_rounded_operands_products(shape):
  """`flow_speed.mixed_matmul`'s backward pass: dx = g w^T and dw = x^T g, each from the bfloat16-rounded
  operands and cotangent, summed in float32 (here against float64), for a chunk and for rows in a leading
  batch."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, shape), jax.random.normal(kw, (48, 40))
  g = jax.random.normal(kg, shape[:-1] + (40,))
  y, vjp = jax.vjp(lambda x, w: flow_speed.mixed_matmul(x, w, jnp.dtype(jnp.bfloat16)), x, w)
  dx, dw = jax.jit(vjp)(g)
  xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
  np.testing.assert_allclose(y, xr @ wr, rtol=0, atol=1e-5 * np.abs(xr @ wr).max())
  np.testing.assert_allclose(dx, gr @ wr.T, rtol=0, atol=1e-5 * np.abs(gr @ wr.T).max())
  expected_dw = xr.reshape(-1, 48).T @ gr.reshape(-1, 40)
  np.testing.assert_allclose(dw, expected_dw, rtol=0, atol=1e-5 * np.abs(expected_dw).max())


def test_bfloat16_training_gradients_follow_float32s():
  """`Config.train_dtype` bfloat16: the loss and its gradient on a chunk of N = 64 fibers of a moved-off
  decoder, against float32 autodiff. Rounding every matmul input to ~3 digits moves each parameter's
  gradient by ~1% of its size: the step direction stays (cosine > 0.999)."""
  params, permutations = _moved_off_decoder(256)
  x = jax.random.normal(jax.random.key(2), (64, 256))
  c = jax.random.normal(jax.random.key(3), (64, 128))
  loss = lambda p, dtype: flow.nll_loss(flow.log_prob(p, permutations, x, c, dtype=dtype), 256)
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (exact, exact_grads), (mixed, mixed_grads) = grad(params, jnp.float32), grad(params, jnp.bfloat16)
  assert float(mixed) == pytest.approx(float(exact), rel=1e-3)
  flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
  a, b = flat(exact_grads), flat(mixed_grads)
  assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
  for name in exact_grads:  # every parameter, the first Linear's and the global affine's alike
    e, m = np.asarray(exact_grads[name]), np.asarray(mixed_grads[name])
    assert 0 < np.linalg.norm(m - e) < 0.05 * np.linalg.norm(e), name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="which matmuls run in bfloat16 is XLA:CPU's choice")
def test_bfloat16_training_step_has_no_float32_matmul():
  """Every matmul of a bfloat16 training step (forward and backward) reads bfloat16 operands. A transpose
  that XLA folds into its matmul makes XLA:CPU run that matmul in float32
  (`flow_speed._row_major_transpose`)."""
  params, permutations = flow.init_decoder(jax.random.key(0), 16, 8, 2)
  x, c = jax.random.normal(jax.random.key(1), (32, 16)), jax.random.normal(jax.random.key(2), (32, 8))
  loss = lambda p, x, c: flow.nll_loss(flow.log_prob(p, permutations, x, c, dtype=jnp.bfloat16), 16)
  hlo = jax.jit(jax.grad(loss)).lower(params, x, c).compile().as_text()
  operands = {}
  for line in hlo.splitlines():
    if "parameter(" in line and "=" in line:
      name, _, rest = line.strip().partition(" = ")
      operands[name] = rest.split("[")[0]
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  # Per block 3 forward and 3 weight-gradient matmuls and the hidden layer's gradient, and the fibers'
  # half's gradient in every block but the first (whose input is the data).
  assert len(dots) == 2 * 7 + 1
  for line in dots:
    args = line.split(" dot(")[1].split(")")[0].split(", ")
    assert [operands.get(a, "?") for a in args] == ["bf16", "bf16"], line


def test_training_layout_round_trips_and_gives_the_same_log_likelihoods_and_gradients():
  # The chunk loop carries decoders split into blocks and w1 into its rows (flow_speed.split_blocks): that
  # layout must be exact, and the flow on it must be the same function of the same parameters.
  channels, condition_dim = 7, 6
  params, permutations = _perturbed_decoder(channels, condition_dim, "hard", seed=7)
  split = flow_speed.split_blocks(params, condition_dim)
  fiber_rows, condition_rows = split["w1"]
  assert fiber_rows[0].shape == ((channels + 1) // 2, params["w1"].shape[-1])
  assert condition_rows[0].shape == (condition_dim, params["w1"].shape[-1])
  for a, b in zip(jax.tree.leaves(flow_speed.stack_blocks(split)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.key(8), (5, channels))
  c = jax.random.normal(jax.random.key(9), (5, condition_dim))
  loss = lambda p: jnp.mean(flow.log_prob(p, permutations, x, c))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  split_value, split_grads = jax.jit(jax.value_and_grad(loss))(split)
  np.testing.assert_allclose(split_value, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(flow_speed.stack_blocks(split_grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grads["w1"][:, -condition_dim:]).max()) > 0  # the condition's rows train too
