"""The conditional flow: parity with anomalib's FrEIA decoder, invertibility, log-det vs autodiff, size."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import flow, positional

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures" / "flow_reference.npz")
# Compiled once per shape: op-by-op dispatch of the distrax blocks is what made these tests slow.
forward = jax.jit(flow.forward, static_argnames="clamp")
inverse = jax.jit(flow.inverse, static_argnames="clamp")
log_prob = jax.jit(flow.log_prob, static_argnames="clamp")


def _reference_decoder(prefix):
  get = lambda k: jnp.asarray(FIXTURE[f"{prefix}/{k}"], jnp.float32)
  params = {k: get(k) for k in ("w1", "b1", "w2", "b2", "global_scale", "global_offset")}
  matrices = FIXTURE[f"{prefix}/permutation"]
  if prefix == "hard":  # one 1 per row: keep its column index
    permutations = jnp.asarray(np.argmax(matrices, axis=-1), jnp.int32)
  else:
    permutations = jnp.asarray(matrices, jnp.float32)
  return params, permutations, get("x"), get("c")


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("prefix", ["hard", "soft"])
def test_matches_anomalib_allinoneblock(prefix):
  params, permutations, x, c = _reference_decoder(prefix)
  z, log_det = forward(params, permutations, x, c, clamp=1.9)
  assert _rel_err(z, FIXTURE[f"{prefix}/z"]) < 1e-5
  assert _rel_err(log_det, FIXTURE[f"{prefix}/log_det"]) < 1e-5
  log_p = log_prob(params, permutations, x, c, clamp=1.9)
  assert _rel_err(log_p, FIXTURE[f"{prefix}/log_prob"]) < 1e-5


@pytest.mark.parametrize("height,width,dim", [(5, 7, 128), (3, 4, 16)])
def test_positional_code_matches_anomalib(height, width, dim):
  ours = positional.positional_encoding(height, width, dim)  # (H, W, P)
  reference = FIXTURE[f"positional/{dim}x{height}x{width}"].transpose(1, 2, 0)  # (P, H, W) -> (H, W, P)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def _perturbed_decoder(channels, condition_dim, permutation, seed=0):
  """A decoder moved away from its (near-identity) initialisation so that every term matters."""
  params, permutations = flow.init_decoder(jax.random.key(seed), channels, condition_dim, 4, permutation)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves), permutations


@pytest.mark.parametrize("permutation", ["hard", "soft"])
@pytest.mark.parametrize("channels", [7, 12])
def test_inverse_recovers_input(permutation, channels):
  params, permutations = _perturbed_decoder(channels, 8, permutation)
  x = jax.random.normal(jax.random.key(2), (64, channels))
  c = jax.random.normal(jax.random.key(3), (64, 8))
  z, log_det = forward(params, permutations, x, c)
  x_back, inverse_log_det = inverse(params, permutations, z, c)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(inverse_log_det, -log_det, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(z - x))) > 0.1  # the flow is not the identity


@pytest.mark.parametrize("permutation", ["hard", "soft"])
def test_fibers_sharing_a_condition_flow_as_if_each_had_its_own(permutation):
  """(N, K, C) fibers with one condition per row of K (how scoring passes a batch, position by position)
  give what (N * K, C) fibers with the condition repeated give, forwards and backwards."""
  params, permutations = _perturbed_decoder(11, 8, permutation, seed=7)
  x = jax.random.normal(jax.random.key(8), (5, 3, 11))
  c = jax.random.normal(jax.random.key(9), (5, 8))
  repeated = jnp.repeat(c, 3, axis=0)
  z, log_det = forward(params, permutations, x, c)
  z_each, log_det_each = forward(params, permutations, x.reshape(15, 11), repeated)
  assert z.shape == x.shape and log_det.shape == (5, 3)
  np.testing.assert_allclose(z.reshape(15, 11), z_each, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(log_det.reshape(15), log_det_each, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(log_prob(params, permutations, x, c).reshape(15),
                             log_prob(params, permutations, x.reshape(15, 11), repeated), atol=1e-4, rtol=1e-5)
  x_back, _ = inverse(params, permutations, z, c)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("permutation", ["hard", "soft"])
def test_log_det_equals_autodiff_jacobian(permutation):
  channels = 9
  params, permutations = _perturbed_decoder(channels, 8, permutation, seed=4)
  x = jax.random.normal(jax.random.key(5), (6, channels))
  c = jax.random.normal(jax.random.key(6), (6, 8))
  _, log_det = forward(params, permutations, x, c)

  def one_fiber(xi, ci):
    return flow.forward(params, permutations, xi[None], ci[None])[0][0]

  jacobians = jax.jit(jax.vmap(jax.jacfwd(one_fiber)))(x, c)  # (N, C, C)
  _, log_abs_det = jnp.linalg.slogdet(jacobians)
  np.testing.assert_allclose(log_det, log_abs_det, atol=1e-4, rtol=1e-5)


def test_initial_global_affine_is_identity_and_weights_follow_torch_default():
  params, permutations = flow.init_decoder(jax.random.key(0), 10, 8, 3, "hard")
  np.testing.assert_allclose(flow.global_scale(params["global_scale"]), 1.0, rtol=1e-6)
  d_in = 5 + 8
  assert params["w1"].shape == (3, d_in, 2 * d_in) and params["w2"].shape == (3, 2 * d_in, 10)
  assert float(jnp.max(jnp.abs(params["w1"]))) <= 1 / np.sqrt(d_in)
  assert float(jnp.max(jnp.abs(params["w2"]))) <= 1 / np.sqrt(2 * d_in)
  for p in np.asarray(permutations):  # each block draws its own true permutation
    assert sorted(p.tolist()) == list(range(10))
  assert not np.array_equal(permutations[0], permutations[1])


def test_soft_permutation_is_a_rotation():
  r = flow.random_rotation(jax.random.key(0), 16)
  np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-5)
  assert float(jnp.linalg.det(r)) == pytest.approx(1.0, abs=1e-4)


def test_wide_resnet_decoders_hold_81_6_million_parameters():
  total = 0
  for channels in (512, 1024, 2048):  # WRN-50-2 layer2/3/4
    shapes = jax.eval_shape(lambda k, ch=channels: flow.init_decoder(k, ch)[0], jax.random.key(0))
    total += sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert total == 81_647_616  # docs/design.md section 4.5


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_flop_counts_match_what_xla_compiles():
  """forward_flops / train_flops (the speed benchmark's denominators) against XLA's own count of the
  compiled computations, within the elementwise work they leave out: a training step that formed the
  condition's gradient would cost 9% more here, and sharing each condition over 8 fibers saves 22%."""
  channels, condition_dim, blocks, n = 64, 32, 4, 256
  params, permutations = flow.init_decoder(jax.random.key(0), channels, condition_dim, blocks)
  x, c = jnp.ones((n, channels)), jnp.ones((n, condition_dim))
  loss = lambda p: flow.nll_loss(flow.log_prob(p, permutations, x, c), channels)
  forward = _xla_flops(lambda p: flow.log_prob(p, permutations, x, c), params) / n
  step = _xla_flops(jax.grad(loss), params) / n
  shared = _xla_flops(lambda p: flow.log_prob(p, permutations, x.reshape(n // 8, 8, channels),
                                              c[:n // 8]), params) / n
  assert forward == pytest.approx(flow.forward_flops(channels, condition_dim, blocks), rel=0.05)
  assert step == pytest.approx(flow.train_flops(channels, condition_dim, blocks), rel=0.02)
  assert shared == pytest.approx(flow.forward_flops(channels, condition_dim, blocks, 8), rel=0.05)
  # bfloat16 training's hand-written backward pass (flow_speed.mixed_matmul) forms no more than autodiff's.
  mixed = lambda p: flow.nll_loss(flow.log_prob(p, permutations, x, c, dtype=jnp.bfloat16), channels)
  mixed_step = _xla_flops(jax.grad(mixed), params) / n
  assert mixed_step == pytest.approx(flow.train_flops(channels, condition_dim, blocks), rel=0.02)


def test_loss_is_mean_negative_logsigmoid_of_per_channel_log_prob():
  log_p = jnp.array([-300.0, 10.0, 0.0])
  expected = np.mean(np.log1p(np.exp(-np.asarray(log_p) / 10.0)))
  assert float(flow.nll_loss(log_p, 10)) == pytest.approx(expected, rel=1e-6)


def _moved_off_decoder(channels):
  """A decoder moved off its initialisation by about its own scale in every parameter, the global affines
  (the identity at initialisation) included, as a trained decoder is."""
  params, permutations = flow.init_decoder(jax.random.key(0), channels)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [a + 0.3 * jax.random.normal(k, a.shape) / np.sqrt(a.shape[-1]) for a, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves), permutations


def test_bfloat16_matmuls_keep_the_log_likelihoods_order():
  """Scoring's default (`Config.score_dtype`): the subnet matmuls' inputs rounded to bfloat16, summed in
  float32. On a decoder moved off its initialisation by about its own scale, log p / C moves by under 1%
  of its spread over fibers and the fibers' ranking (what AUROC sees) stays."""
  params, permutations = _moved_off_decoder(256)
  x = jax.random.normal(jax.random.key(2), (512, 256))
  c = jax.random.normal(jax.random.key(3), (512, 128))
  exact = np.asarray(log_prob(params, permutations, x, c)) / 256
  rounded = np.asarray(jax.jit(flow.log_prob, static_argnames=("clamp", "dtype"))(
      params, permutations, x, c, dtype=jnp.bfloat16)) / 256
  difference = np.abs(rounded - exact)
  assert 0 < difference.max() < 0.01 * exact.std()  # really rounded, and by little
  ranks = lambda a: np.argsort(np.argsort(a))
  assert np.corrcoef(ranks(exact), ranks(rounded))[0, 1] > 0.9999  # Spearman's rank correlation
