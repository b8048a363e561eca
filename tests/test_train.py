"""Training: schedule, parity with anomalib's loop, compile-once chunk loop, determinism, exact resume,
divergence and config checks."""

import contextlib
import dataclasses
import math
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cflow_jax import checkpoint, encoders, flow, model as model_lib, runtime, train, train_step
from cflow_jax.train_step import DecoderState
from cflow_jax.config import Config
from cflow_jax.errors import UserError

# float32 training throughout: the steps are compared with float32 autodiff and optax at float32 tolerances
# (the default, "auto", trains in bfloat16 where the CPU has AMX).
SMALL = Config(backbone="resnet18", image_size=64, coupling_blocks=2, fiber_batch=32, batch_size=4,
               meta_epochs=2, sub_epochs=1, warmup=0.5, lr=1e-3, train_dtype="float32")
IMAGES = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def encoder_variables():
  module, _ = encoders.create_encoder("resnet18")
  return encoders.init_variables(module, jax.random.key(0), 64)


def _batches(images, batch_size):
  def per_epoch(epoch):
    order = np.random.default_rng(epoch).permutation(len(images))
    for i in range(len(images) // batch_size):
      yield images[order[i * batch_size:(i + 1) * batch_size]]
  return per_epoch


def _fit(config, encoder_variables, workdir=None, batches=None):
  model = model_lib.build(config)
  batches = batches or _batches(IMAGES, config.batch_size)
  return train.fit(model, encoder_variables, batches, len(IMAGES) // config.batch_size, workdir=workdir,
                   progress=False, log=lambda s: None)


def _leaves(state):
  return [np.asarray(a) for a in jax.tree.leaves((state.params, state.opt_states))]


@contextlib.contextmanager
def _lowered():
  """The names of the functions JAX lowers to compile meanwhile (each program then compiles, or loads
  from the persistent cache), from jax.monitoring's public events: a call that reuses a compiled
  program lowers nothing."""
  names = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      names.append(kwargs.get("fun_name", ""))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _compilations(names, jitted) -> int:
  return sum(jitted.__name__ in name for name in names)


def _original_rates(lr, meta_epochs, sub_epochs, batches_per_epoch, warmup_epochs=2):
  """The original code's learning rate per image batch: linear warm-up over the first meta-epochs from
  lr / 10 to the cosine's value there, then the cosine of the meta-epoch, held for all its batches."""
  floor = lr * 1e-3
  cosine = lambda e: floor + (lr - floor) * (1 + math.cos(math.pi * e / meta_epochs)) / 2
  per_meta, rates = sub_epochs * batches_per_epoch, []
  for e in range(meta_epochs):
    for i in range(per_meta):
      if e < warmup_epochs:
        progress = (i + e * per_meta) / (warmup_epochs * per_meta)
        rates.append(lr / 10 + progress * (cosine(warmup_epochs) - lr / 10))
      else:
        rates.append(cosine(e))
  return np.array(rates)


def _run_rates(config, batches_per_epoch, steps):
  """Every step's rate over a whole run of image batches of `steps` optimiser steps each."""
  schedule, total = train.learning_rate(config), config.epochs * batches_per_epoch
  return np.concatenate([train.chunk_rates(schedule, b, total, steps, steps) for b in range(total)])


def test_schedule_follows_the_original_curve_at_its_25_by_8_epochs():
  config = Config(lr=2e-4, meta_epochs=25, sub_epochs=8)
  original = _original_rates(2e-4, 25, 8, batches_per_epoch=5)
  ours = _run_rates(config, 5, steps=1)  # one step per batch: the original's rate is per batch
  assert ours[0] == pytest.approx(2e-5)  # warm-up starts at lr / 10
  warm = 2 * 8 * 5
  np.testing.assert_allclose(ours[:warm], original[:warm], rtol=1e-5)  # the warm-up is the original's
  # after it, a smooth cosine where the original holds each meta-epoch's value: at most 6.2% of lr apart
  assert np.abs(ours - original).max() <= 0.062 * 2e-4
  assert np.abs(ours - original).max() > 0.05 * 2e-4  # the bound is tight, not loose


@pytest.mark.parametrize("epochs", [1, 2, 3, 8, 200])
def test_schedule_warms_up_reaches_the_peak_and_ends_at_the_floor_at_every_budget(epochs):
  lr, floor = 2e-4, 2e-7
  config = Config(lr=lr, meta_epochs=epochs, sub_epochs=1)
  rates = _run_rates(config, batches_per_epoch=4, steps=50)
  top = int(np.argmax(rates))
  assert rates[0] == pytest.approx(lr / 10)
  assert rates.max() >= 0.98 * lr  # the cosine's value at the end of an 8% warm-up: 0.984 lr
  assert top == pytest.approx(0.08 * len(rates), abs=1)
  assert np.all(np.diff(rates[:top + 1]) > 0)  # warming up ...
  assert np.all(np.diff(rates[top:]) <= 0)  # ... then never rising
  assert floor < rates[-1] < floor + 1e-4 * lr  # the last of 200 steps starts 1/200 of the run before its end


def test_constant_schedule_and_a_padded_batch_rates():
  assert np.all(_run_rates(Config(schedule="constant", lr=1e-4, meta_epochs=3, sub_epochs=1), 2, 7) ==
                np.float32(1e-4))
  no_warmup = train.learning_rate(Config(lr=2e-4, warmup=0.0))
  assert no_warmup(np.array([0.0]))[0] == np.float32(2e-4)  # straight into the cosine, from its peak
  schedule = train.learning_rate(Config(meta_epochs=1, sub_epochs=1))
  rates = train.chunk_rates(schedule, 3, 4, steps=5, compiled_steps=8)  # a short last batch, padded
  assert rates.shape == (8,) and np.all(rates[5:] == 0) and np.all(rates[:5] > 0)
  np.testing.assert_allclose(rates[:5], schedule(3 / 4 + np.arange(5) / 20), rtol=1e-6)


def test_chunks_drop_or_absorb_the_remainder():
  key = jax.random.key(0)
  main, last = train_step._chunk_indices(key, 70, Config(fiber_batch=32))
  assert main.shape == (2, 32) and last is None  # 6 fibers dropped (original)
  main, last = train_step._chunk_indices(key, 70, Config(fiber_batch=32, drop_remainder=False))
  assert main.shape == (1, 32) and last.shape == (38,)  # the last chunk takes them (anomalib)
  everything = np.concatenate([np.asarray(main).ravel(), np.asarray(last)])
  assert sorted(everything.tolist()) == list(range(70))  # a joint shuffle: each fiber exactly once


@pytest.mark.slow
def test_train_step_compiles_once_and_same_seed_gives_same_parameters(encoder_variables):
  config = SMALL
  model = model_lib.build(config)
  layout = runtime.train_layout(train.layer_costs(model))
  train.make_train_layer.cache_clear()  # compiled afresh here, whatever earlier tests compiled
  step = train.make_train_layer(model, layout.split_mesh)
  with _lowered() as names:
    first, _ = _fit(config, encoder_variables)
  # Three image batches per epoch, two epochs, a new learning rate every batch: one compilation per layer.
  assert _compilations(names, step) == 3, names
  with _lowered() as names:
    second, _ = _fit(config, encoder_variables)  # later runs of the same config reuse the compiled steps
    state = runtime.place_state(train.init_state(model, jax.random.key(0)), layout)
    features = model_lib.encode(model, encoder_variables, layout.put_images(IMAGES[:4]))
    _, losses = train.train_batch(model, layout, state.decoders, features,
                                  train.layer_key_data(jax.random.key(1), 3),
                                  tuple(np.full(n, 1e-3, np.float32) for n in (8, 2, 1)))
  assert _compilations(names, step) == 0, names
  for a, b in zip(_leaves(first), _leaves(second)):
    np.testing.assert_array_equal(a, b)
  assert [l.shape for l in losses] == [(8,), (2,), (1,)]  # 4*8*8/32, 4*4*4/32, max(4*2*2/32, 1)


def test_an_image_batch_step_is_adam_at_the_learning_rate_it_is_given(encoder_variables):
  """With one chunk per layer (N above every layer's fiber count) a call is one Adam step on the mean loss
  of all fibers, whatever their order: compare with optax.adam at that rate."""
  config = dataclasses.replace(SMALL, fiber_batch=4096)
  model = model_lib.build(config)
  state = train.init_state(model, jax.random.key(0))
  features = model_lib.encode(model, encoder_variables, IMAGES[:4])
  step = jax.jit(train_step.train_batch_fn(config))
  lr = 3e-3
  decoders, _ = step(state.decoders, features, jax.random.key(1), np.float32(lr))
  params = tuple(d.params for d in decoders)
  for layer, f in enumerate(features):
    x, c = model_lib.fibers_and_condition(f, config.condition_dim)
    loss = lambda p: flow.nll_loss(flow.log_prob(p, state.permutations[layer], x, c, config.clamp),
                                   x.shape[-1])
    grads = jax.jit(jax.grad(loss))(state.params[layer])  # compiled: op by op, the flow is slow
    adam = optax.adam(lr)
    updates, _ = adam.update(grads, adam.init(state.params[layer]))
    expected = optax.apply_updates(state.params[layer], updates)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params[layer])))
    assert moved > lr / 2  # Adam's first step moves each weight by about lr
    # 1% of a step: where a gradient is near Adam's eps, its first step g / (|g| + eps) magnifies float
    # rounding (one weight in ~10^6 moved 0.2% of a step differently when XLA fused the blocks otherwise);
    # a 10% different rate would miss by 10% of a step everywhere.
    for a, b in zip(jax.tree.leaves(params[layer]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=lr * 1e-2)


def test_an_image_batch_follows_anomalibs_training_loop(monkeypatch):
  """Our chunk loop from anomalib's initial decoder and fiber order, against anomalib's own loop
  (tests/fixtures/make_flow_fixtures.py, float64): six Adam steps, the last on a longer chunk. The
  joint shuffle is the one thing not compared (torch.randperm vs jax.random.permutation); the test
  takes anomalib's order, so every parameter must end where anomalib's did."""
  ref = {k.split("/", 1)[1]: v for k, v in np.load(
      pathlib.Path(__file__).parent / "fixtures" / "flow_reference.npz").items() if k.startswith("training/")}
  n, perm = int(ref["fiber_batch"]), jnp.asarray(ref["perm"], jnp.int32)
  k = len(perm) // n
  monkeypatch.setattr(train_step, "_chunk_indices", lambda key, length, config, valid=None: (
      perm[:(k - 1) * n].reshape(k - 1, n), perm[(k - 1) * n:]))
  config = Config(condition_dim=8, coupling_blocks=3, fiber_batch=n, drop_remainder=False, train_dtype="float32")
  train_layer = jax.jit(train_step.train_layer_fn(config))
  names = ("w1", "b1", "w2", "b2", "global_scale", "global_offset")
  params = {name: jnp.asarray(ref[f"initial_{name}"], jnp.float32) for name in names}
  permutations = jnp.asarray(np.argmax(ref["permutation"], axis=-1), jnp.int32)
  decoder = DecoderState(params, train_step.make_optimizer().init(params), permutations)
  (final, _, _), losses = train_layer(decoder, jnp.asarray(ref["features"], jnp.float32), jax.random.key(0),
                                      np.float32(ref["lr"]))
  np.testing.assert_allclose(losses, ref["losses"], rtol=1e-5)
  for name in names:
    moved = np.abs(ref[f"final_{name}"] - ref[f"initial_{name}"]).max()
    assert moved > float(ref["lr"])  # every kind of parameter really moved
    # Adam divides by sqrt(v): where a gradient is tiny its float32 rounding shows, so the bound is a
    # fraction of how far training moved the parameter, not a relative error per weight.
    assert np.abs(np.asarray(final[name]) - ref[f"final_{name}"]).max() < 1e-3 * moved, name


class Interrupt(Exception):
  pass


@pytest.fixture(scope="module")
def interrupted_run(encoder_variables, tmp_path_factory):
  """A workdir whose run was stopped in its second epoch, after the first epoch's checkpoint."""
  workdir = tmp_path_factory.mktemp("interrupted")

  def dies_in_second_epoch(epoch):
    if epoch == 1:
      raise Interrupt
    yield from _batches(IMAGES, SMALL.batch_size)(epoch)

  with pytest.raises(Interrupt):
    _fit(SMALL, encoder_variables, workdir, dies_in_second_epoch)
  return workdir


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run"


def test_interrupted_run_resumes_to_the_same_result(encoder_variables, interrupted_run, tmp_path):
  uninterrupted, full_history = _fit(SMALL, encoder_variables)
  assert full_history["epoch_loss"][-1] < full_history["epoch_loss"][0]  # it learns
  workdir = _copy(interrupted_run, tmp_path)
  assert checkpoint.latest_step(workdir) == 1
  # A save killed half-way leaves only orbax's temporary folder, which is never taken as a checkpoint.
  (workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1234").mkdir()
  assert checkpoint.latest_step(workdir) == 1
  resumed, history = _fit(SMALL, encoder_variables, workdir)
  assert history["epoch_loss"] == full_history["epoch_loss"]
  for a, b in zip(_leaves(uninterrupted), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # bitwise on the CPU


def test_resume_with_a_different_config_is_a_clear_error(encoder_variables, interrupted_run, tmp_path):
  workdir = _copy(interrupted_run, tmp_path)
  with pytest.raises(UserError, match="fiber_batch: checkpoint has 32, requested 64"):
    _fit(dataclasses.replace(SMALL, fiber_batch=64), encoder_variables, workdir)


def test_nan_loss_stops_with_step_and_layer_and_keeps_last_checkpoint(encoder_variables, interrupted_run,
                                                                      tmp_path):
  workdir = _copy(interrupted_run, tmp_path)
  # Continue the run with an encoder whose last stage emits NaN: the deepest layer's loss is NaN.
  poisoned = {**encoder_variables, "params": dict(encoder_variables["params"])}
  poisoned["params"]["layer4_1"] = jax.tree.map(lambda a: a * np.nan, poisoned["params"]["layer4_1"])
  with pytest.raises(train.TrainingDiverged, match=r"epoch 2, image batch 1, chunk 1, layer layer4") as err:
    _fit(SMALL, poisoned, workdir)
  assert "last good checkpoint" in str(err.value)
  assert checkpoint.latest_step(workdir) == 1


def _layer_step(fiber_batch):
  config = Config(condition_dim=8, coupling_blocks=2, fiber_batch=fiber_batch, train_dtype="float32")
  step = jax.jit(train_step.train_layer_fn(config))
  params, permutations = flow.init_decoder(jax.random.key(0), 16, 8, 2)
  features = jax.random.normal(jax.random.key(1), (4, 4, 4, 16))
  return step, params, permutations, features


@pytest.mark.parametrize("fiber_batch,drop_remainder", [(20, False), (20, True), (48, False), (64, False)])
def test_the_chunk_loop_is_one_adam_step_per_chunk_in_order(fiber_batch, drop_remainder):
  """The compiled loop (each step applies the previous step's gradient before taking its own) against
  plain Adam steps one chunk after another: several chunks and a longer last one, the remainder dropped,
  a single chunk longer than N (64 fibers, N = 48), and a single chunk of exactly N."""
  config = Config(condition_dim=8, coupling_blocks=2, fiber_batch=fiber_batch, drop_remainder=drop_remainder,
                  train_dtype="float32")
  step = jax.jit(train_step.train_layer_fn(config))
  params, permutations = flow.init_decoder(jax.random.key(0), 16, 8, 2)
  features = jax.random.normal(jax.random.key(1), (4, 4, 4, 16))
  key, lr = jax.random.key(2), np.float32(1e-3)
  decoder = DecoderState(params, train_step.make_optimizer().init(params), permutations)
  (final, _, _), losses = step(decoder, features, key, lr)

  x, c = model_lib.fibers_and_condition(features, config.condition_dim)
  main, last = train_step._chunk_indices(key, x.shape[0], config)
  chunks = list(main) + ([] if last is None else [last])
  adam = optax.adam(lr)
  loss_fn = lambda p, idx: flow.nll_loss(flow.log_prob(p, permutations, x[idx], c[idx], config.clamp), 16)
  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))  # compiled: op by op, the flow is slow
  expected, adam_state, expected_losses = params, adam.init(params), []
  for idx in chunks:
    loss, grads = loss_and_grads(expected, idx)
    updates, adam_state = adam.update(grads, adam_state)
    expected, expected_losses = optax.apply_updates(expected, updates), expected_losses + [loss]
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  for a, b, start in zip(jax.tree.leaves(final), jax.tree.leaves(expected), jax.tree.leaves(params)):
    assert np.abs(np.asarray(b) - np.asarray(start)).max() > lr / 2  # every parameter moved
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=lr * 1e-2)


def test_one_chunk_longer_than_n_trains_through_the_padded_batches_program():
  """The program `train_batch` runs (with a count of real images) on a layer whose fibers make a single
  chunk longer than N: one Adam step on all of them; `padded_chunks` never pads such a batch."""
  config = Config(condition_dim=8, coupling_blocks=2, fiber_batch=48, drop_remainder=False, train_dtype="float32")
  model = types.SimpleNamespace(config=config, feature_sizes=lambda: (4,))
  step = jax.jit(train_step.train_layer_fn(config))
  params, permutations = flow.init_decoder(jax.random.key(0), 16, 8, 2)
  features = jax.random.normal(jax.random.key(1), (4, 4, 4, 16))  # 64 fibers
  args = (DecoderState(params, train_step.make_optimizer().init(params), permutations), features,
          jax.random.key(2), np.float32(1e-3))
  (final, state, _), losses = step(*args, np.int32(4))
  assert int(state.count) == 1 and losses.shape == (1,)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(step(*args)[0].params)):  # the plain loop's step
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  assert train.padded_chunks(model, 3, 4) is None  # 48 real fibers would fill a chunk of 48


def test_a_padded_short_batch_trains_on_its_real_fibers_only():
  """The last short batch of an epoch, padded to the others' size (`train.padded_chunks`), reuses their
  compiled step. Padding with NaN: any padded fiber in a step would make the
  parameters NaN."""
  step, params, permutations, features = _layer_step(fiber_batch=16)
  padded = features.at[3].set(jnp.nan)
  opt_state = train_step.make_optimizer().init(params)
  (final, state, _), losses = step(DecoderState(params, opt_state, permutations), padded, jax.random.key(2),
                                   np.float32(1e-3), np.int32(3))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(final))
  assert np.all(np.asarray(losses[:3]) != 0) and float(losses[3]) == 0  # 3 * 16 real fibers: 3 steps of 16
  assert int(state.count) == 3  # Adam's step count: the skipped step did not count

  # With one chunk of exactly the real fibers, the padded batch's step is the short batch's own step
  # (the fibers' order differs, so the float sums do: Adam's step, ~lr, is compared to 1% of it).
  step, params, permutations, features = _layer_step(fiber_batch=48)
  lr = np.float32(1e-3)
  decoder = DecoderState(params, opt_state, permutations)
  (alone, _, _), _ = step(decoder, features[:3], jax.random.key(2), lr, np.int32(3))
  (padded, _, _), _ = step(decoder, features.at[3].set(jnp.nan), jax.random.key(2), lr, np.int32(3))
  for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(alone)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=lr * 1e-2)


@pytest.mark.slow
def test_a_short_last_batch_reuses_the_compiled_steps(encoder_variables):
  """Ten images in batches of four: the last batch of two is padded (fiber_batch 8 fits every layer's
  real fibers), so each layer compiles once, and its losses are those of its real steps only."""
  config = dataclasses.replace(SMALL, fiber_batch=8)
  model = model_lib.build(config)
  assert train.padded_chunks(model, 2, 4) == (16, 4, 1)  # 2 * 8 * 8 / 8, 2 * 4 * 4 / 8, 2 * 2 * 2 / 8
  assert train.padded_chunks(model_lib.build(SMALL), 2, 4) is None  # layer 3: 8 real fibers, chunks of 16
  train.make_train_layer.cache_clear()  # compiled afresh here, whatever earlier tests compiled
  step = train.make_train_layer(model, runtime.train_layout(train.layer_costs(model)).split_mesh)

  def batches(epoch):
    for i in range(0, 10, 4):
      yield IMAGES[i:min(i + 4, 10)]

  with _lowered() as names:
    state, history = train.fit(model, encoder_variables, batches, 3, progress=False, log=lambda s: None)
  assert _compilations(names, step) == 3, names
  assert history["fibers_per_epoch"] == 10 * sum(h * h for h in model.feature_sizes())
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))
  assert all(np.isfinite(history["epoch_loss"]))
