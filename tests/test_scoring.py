"""Scoring: anomaly maps as the reference computes them, batch-independent scores, checkpoint round trip."""

import dataclasses
import gc
import shutil
import sys

import jax
import numpy as np
import optax
import pytest

import cflow_jax as cf
from cflow_jax import anomaly_map, checkpoint, encoders, train
from cflow_jax.anomaly_map import Normalization
from test_train import _lowered

CONFIG = cf.Config(backbone="resnet18", image_size=64, coupling_blocks=2, fiber_batch=64, batch_size=8,
                   meta_epochs=1, sub_epochs=1, rotation=0.0)


def _naive_upsample(m, size):
  """Bilinear with align_corners=True, one output pixel at a time (PyTorch's definition)."""
  h, w = m.shape
  out = np.zeros((size, size))
  for i in range(size):
    for j in range(size):
      y, x = i * (h - 1) / (size - 1), j * (w - 1) / (size - 1)
      y0, x0 = min(int(y), h - 2), min(int(x), w - 2)
      dy, dx = y - y0, x - x0
      out[i, j] = ((1 - dy) * (1 - dx) * m[y0, x0] + (1 - dy) * dx * m[y0, x0 + 1]
                   + dy * (1 - dx) * m[y0 + 1, x0] + dy * dx * m[y0 + 1, x0 + 1])
  return out


def test_upsampling_is_bilinear_with_align_corners():
  m = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
  ours = np.asarray(anomaly_map.upsample(m, 17))
  for b in range(2):
    np.testing.assert_allclose(ours[b], _naive_upsample(m[b], 17), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_blur_folded_into_upsampling_is_a_gaussian_filter_with_reflected_borders(sigma):
  """The blur rides in the upsampling matrices; it must equal blurring the upsampled map afterwards with
  scipy's Gaussian (mode "reflect", 4 sigmas), borders included, and leave a constant map unchanged."""
  from scipy import ndimage

  m = np.random.default_rng(2).normal(size=(2, 4, 5)).astype(np.float32)
  ours = np.asarray(anomaly_map.upsample(m, 40, sigma))
  for b in range(2):
    expected = ndimage.gaussian_filter(_naive_upsample(m[b], 40), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours[b], expected, rtol=1e-5, atol=1e-5)
  flat = np.asarray(anomaly_map.upsample(np.full((1, 4, 5), 3.0, np.float32), 40, sigma))
  np.testing.assert_allclose(flat, 3.0, rtol=1e-6)


def test_maps_follow_the_original_whole_set_formula():
  rng = np.random.default_rng(1)
  layers = [rng.normal(size=(3, s, s)).astype(np.float32) * 3 for s in (8, 4, 2)]
  maps, scores = anomaly_map.anomaly_maps(tuple(layers), 32)
  # The original, in float64: exp(log p - max) per layer, upsampled, summed; max - sum over the set.
  total = sum(np.stack([_naive_upsample(np.exp(l[b] - l.max()), 32) for b in range(3)]) for l in layers)
  expected = total.max() - total
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scores, expected.reshape(3, -1).max(axis=1), rtol=1e-5, atol=1e-5)


def test_floored_log_maps_sum_each_layers_log_likelihood_floored_at_its_constant():
  rng = np.random.default_rng(3)
  layers = [rng.normal(size=(3, s, s)).astype(np.float32) * 3 for s in (8, 4, 2)]
  floors, map_max = np.array([-1.0, 0.5, -2.0], np.float32), np.float32(4.0)
  maps, scores = anomaly_map.anomaly_maps(tuple(layers), 32, Normalization(floors, map_max), 0.0, "floored_log")
  # In float64: max(log p, floor) per layer, upsampled, summed; map_max - sum.
  total = sum(np.stack([_naive_upsample(np.maximum(l[b], f).astype(np.float64), 32) for b in range(3)])
              for l, f in zip(layers, floors))
  expected = map_max - total
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scores, expected.reshape(3, -1).max(axis=1), rtol=1e-5, atol=1e-5)
  # The references' rules (constants from the images themselves) stay exp(log p - max), whatever is asked.
  np.testing.assert_array_equal(anomaly_map.anomaly_maps(tuple(layers), 32, None, 0.0, "floored_log")[0],
                                anomaly_map.anomaly_maps(tuple(layers), 32)[0])


def test_fixed_normalisation_makes_scores_independent_of_the_batch():
  rng = np.random.default_rng(2)
  layers = tuple(rng.normal(size=(4, s, s)).astype(np.float32) for s in (8, 4, 2))
  fixed = Normalization(np.array([1.0, 2.0, 0.5], np.float32), np.float32(2.5))
  together, _ = anomaly_map.anomaly_maps(layers, 32, fixed)
  alone, _ = anomaly_map.anomaly_maps(tuple(l[:1] for l in layers), 32, fixed)
  np.testing.assert_array_equal(together[0], alone[0])
  # anomalib's per-batch maxima do depend on the company an image keeps
  per_batch, _ = anomaly_map.anomaly_maps(layers, 32)
  per_batch_alone, _ = anomaly_map.anomaly_maps(tuple(l[:1] for l in layers), 32)
  assert np.abs(per_batch[0] - per_batch_alone[0]).max() > 1e-3


# Trains and checkpoints a whole model: the tests that use it are marked slow.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  module, _ = encoders.create_encoder("resnet18")
  variables = encoders.init_variables(module, jax.random.key(0), 64)
  workdir = tmp_path_factory.mktemp("run")
  train_set = cf.data.load("demo", "train", "brick")
  detector = cf.fit(CONFIG, train_set, encoder_variables=variables, workdir=workdir, progress=False)
  return detector, variables, workdir


@pytest.mark.slow
def test_scores_do_not_depend_on_other_images_and_survive_a_checkpoint(trained):
  detector, variables, workdir = trained
  test_set = cf.data.load("demo", "test", "brick")
  images = np.stack([b for batch in cf.data.batches(test_set, 8, 64) for b in batch["image"]])
  full = cf.score(detector, images, batch_size=8)
  assert full.maps.shape == (len(test_set), 64, 64) and np.isfinite(full.maps).all()
  alone = cf.score(detector, images[5:6], batch_size=8)
  shuffled = cf.score(detector, images[::-1], batch_size=8)
  np.testing.assert_allclose(alone.scores[0], full.scores[5], rtol=1e-6)
  np.testing.assert_allclose(shuffled.scores[::-1], full.scores, rtol=1e-6)

  restored = cf.load(workdir, encoder_variables=variables)
  np.testing.assert_array_equal(cf.score(restored, images, batch_size=8).scores, full.scores)
  np.testing.assert_array_equal(np.asarray(restored.normalization.layer_max),
                                np.asarray(detector.normalization.layer_max))


@pytest.mark.slow
def test_a_finished_run_scores_whatever_its_optimiser_state_layout(trained, tmp_path):
  """Scoring reads only decoders, permutations and normalisation; resuming needs the whole state and says
  clearly when its layout differs (here: optax.adam's chained state, which older versions wrote)."""
  detector, variables, workdir = trained
  meta = checkpoint.read_meta(workdir)
  old_adam = tuple(optax.adam(1e-3).init(p) for p in detector.params)
  old_state = train.TrainState(detector.params, old_adam, detector.permutations, detector.normalization)
  checkpoint.save(tmp_path, old_state, meta)
  images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  restored = cf.load(tmp_path, encoder_variables=variables)
  np.testing.assert_array_equal(cf.score(restored, images).scores, cf.score(detector, images).scores)
  like = train.init_state(detector.model, jax.random.key(0))
  with pytest.raises(cf.UserError, match="laid out differently"):
    checkpoint.restore(tmp_path, like)


@pytest.mark.slow
def test_evaluate_reports_every_metric_and_whole_set_normalisation_scores_are_map_maxima(trained, capsys):
  detector, _, _ = trained
  test_set = cf.data.load("demo", "test", "brick")
  result = cf.evaluate(detector, test_set)
  # The progress bar counts every batch and leaves the results as they are.
  shown = cf.evaluate(detector, test_set, progress=True)
  batches = -(-len(test_set) // CONFIG.batch_size)
  err = capsys.readouterr().err
  assert batches > 1 and "scoring: 100%" in err and f"{batches}/{batches}" in err
  np.testing.assert_array_equal(shown.scores, result.scores)
  for key in ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "aupro", "image_threshold"):
    assert 0.0 <= result.metrics[key] <= 1.0 or key.endswith("threshold"), key
  assert result.maps.shape == (len(test_set), 64, 64) and result.labels.sum() > 0
  # The original's whole-test-set maxima, computed in two passes: every image's score is its map's max.
  whole = cf.evaluate(detector, test_set, normalization="test_set")
  assert whole.maps.shape == result.maps.shape
  assert np.isclose(whole.maps.max(axis=(1, 2)), whole.scores).all()


@pytest.mark.slow
def test_load_refuses_other_encoder_weights(trained):
  _, variables, workdir = trained
  other = jax.tree.map(lambda a: a + 1.0, variables)
  with pytest.raises(cf.UserError, match="encoder weights differ"):
    cf.load(workdir, encoder_variables=other)


@pytest.mark.slow
def test_cached_features_train_like_encoding_every_epoch(trained):
  _, variables, _ = trained
  config = dataclasses.replace(CONFIG, sub_epochs=2, normalization="batch")  # training alone: no pass
  train_set = cf.data.load("demo", "train", "brick")
  encoded = cf.fit(config, train_set, encoder_variables=variables, progress=False)
  cached = cf.fit(dataclasses.replace(config, cache_features=True), train_set, encoder_variables=variables,
                  progress=False)
  for a, b in zip(jax.tree.leaves(encoded.params), jax.tree.leaves(cached.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="cache_features needs rotation=0"):
    dataclasses.replace(config, cache_features=True, rotation=5.0)


@pytest.mark.slow
def test_keeping_the_last_short_batch_trains_on_every_image(trained):
  """anomalib's data loader ends an epoch with a shorter batch; the original drops it. 20 images in
  batches of 8 (the fixture's, whose programs the full batches reuse): 16 or 20 images an epoch, on the
  encoded and the cached-feature paths alike."""
  detector, variables, _ = trained
  config = dataclasses.replace(CONFIG, sub_epochs=2, drop_last_batch=False,
                               normalization="batch")  # training alone: no normalisation pass
  train_set = cf.data.load("demo", "train", "brick").subset(range(20))
  encoded = cf.fit(config, train_set, encoder_variables=variables, progress=False)
  cached = cf.fit(dataclasses.replace(config, cache_features=True), train_set, encoder_variables=variables,
                  progress=False)
  dropped = cf.fit(dataclasses.replace(config, sub_epochs=1, drop_last_batch=True), train_set,
                   encoder_variables=variables, progress=False)
  per_image = sum(h * h for h in detector.model.feature_sizes())
  assert encoded.history["fibers_per_epoch"] == cached.history["fibers_per_epoch"] == 20 * per_image
  assert dropped.history["fibers_per_epoch"] == 16 * per_image
  for a, b in zip(jax.tree.leaves(encoded.params), jax.tree.leaves(cached.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cache_blocked_scoring_on_one_cpu_equals_whole_batch_scoring(trained, monkeypatch):
  """On one CPU device the encoder runs image by image and the flows in blocks of fibers; on accelerators
  the whole batch goes at once. Both give the same log-likelihoods, remainders of blocks included."""
  detector, variables, _ = trained
  images = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  monkeypatch.setattr(cf.model, "_CPU_FIBER_BLOCK", 40)  # 3 * 16 * 16 fibers = 19 blocks and 8 left over

  def log_probs(blocked):
    pick = lambda cpu, accelerator, *args: (cpu if blocked else accelerator)(*args)
    monkeypatch.setattr(cf.model, "cpu_or_accelerator", pick)  # the encoder keeps its path
    jax.clear_caches()  # the jitted functions were traced with the other path
    return cf.model.image_log_probs(detector.model, variables, detector.params, detector.permutations, images)

  for blocked, whole in zip(log_probs(True), log_probs(False)):
    assert blocked.shape == whole.shape
    # The same sums in another order. log p / C of these random (out-of-distribution) features is ~ -100s,
    # a difference of large terms; on an AMX CPU the deepest map's 12 fibers (one block, run padded or
    # not) came 2.0e-4 apart (with the decoders of the lr 4e-4 default; 9e-8 and 0 on the other maps).
    # A wrong block or remainder would be off by far more.
    np.testing.assert_allclose(blocked, whole, rtol=5e-4, atol=1e-5)


@pytest.mark.slow
def test_auto_score_dtype_scores_in_bfloat16_only_on_native_hardware(trained, monkeypatch):
  """`score_dtype="auto"` (the default) scores exactly as bfloat16 where the hardware multiplies it
  natively and as float32 elsewhere (`cflow_jax.precision`), and the two really differ."""
  detector, variables, _ = trained
  images = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)

  def log_probs(score_dtype):
    model = dataclasses.replace(detector.model, config=dataclasses.replace(CONFIG, score_dtype=score_dtype))
    jax.clear_caches()  # "auto" resolves when traced
    return np.concatenate([np.ravel(a) for a in cf.model.image_log_probs(
        model, variables, detector.params, detector.permutations, images)])

  assert CONFIG.score_dtype == "auto"
  for native, dtype in ((True, "bfloat16"), (False, "float32")):
    monkeypatch.setattr(cf.precision, "has_native_bfloat16", lambda platform, native=native: native)
    np.testing.assert_array_equal(log_probs("auto"), log_probs(dtype))
  assert np.abs(log_probs("bfloat16") - log_probs("float32")).max() > 0


@pytest.mark.slow
def test_the_training_maxima_come_from_a_bounded_evenly_spaced_subset(trained):
  """`normalization_images` caps the pass over the training images; the constants it fixes are those of
  exactly the chosen images: each layer's `floor_quantile` of their fibers' log p (the default
  likelihood), or its maximum (the references' "exp")."""
  detector, variables, _ = trained
  train_set = cf.api.resized(CONFIG, cf.data.load("demo", "train", "brick"))
  for cap in (0, 48, 64):  # none, or not under the 48 images: all of them
    assert cf.api.normalization_subset(dataclasses.replace(CONFIG, normalization_images=cap), train_set) \
        is train_set
  config = dataclasses.replace(CONFIG, normalization_images=5)
  subset = cf.api.normalization_subset(config, train_set)
  assert [e["filename"] for e in subset] == [train_set[i]["filename"] for i in (0, 12, 24, 35, 47)]
  images = np.stack([e["image"] for e in subset])
  expected = train.fit_normalization(detector.model, variables, detector.params, detector.permutations,
                                     [images])
  # The map maximum, which the pass reads off scoring's map program, is the likelihood map's maximum.
  log_probs = cf.model.image_log_probs(detector.model, variables, detector.params, detector.permutations, images)
  assert CONFIG.likelihood == "floored_log"
  np.testing.assert_allclose(expected.layer_max, [np.quantile(np.asarray(lp), CONFIG.floor_quantile)
                                                  for lp in log_probs], rtol=1e-5)
  likelihood = anomaly_map.likelihood_map(log_probs, expected.layer_max, CONFIG.image_size, CONFIG.blur_sigma,
                                          CONFIG.likelihood)
  np.testing.assert_allclose(expected.map_max, np.max(likelihood), rtol=1e-5)
  exp_model = dataclasses.replace(detector.model, config=dataclasses.replace(CONFIG, likelihood="exp"))
  maxima = train.fit_normalization(exp_model, variables, detector.params, detector.permutations, [images])
  np.testing.assert_allclose(maxima.layer_max, [np.max(lp) for lp in log_probs], rtol=1e-6)
  np.testing.assert_allclose(maxima.map_max, np.max(anomaly_map.likelihood_map(
      log_probs, maxima.layer_max, CONFIG.image_size, CONFIG.blur_sigma)), rtol=1e-5)
  # A short last batch (2 images after 3) runs the program compiled for full batches, padded, and the
  # padding's zeros set no maximum: the pass lowers no log-likelihood program of its own.
  train.fit_normalization(detector.model, variables, detector.params, detector.permutations, [images[:3]])
  with _lowered() as names:
    split = train.fit_normalization(detector.model, variables, detector.params, detector.permutations,
                                    [images[:3], images[3:]])
  assert not [n for n in names if "log_probs" in n], names
  np.testing.assert_allclose(split.layer_max, expected.layer_max, rtol=1e-6)
  # Given the batch size scoring pads to, a pass over fewer images runs scoring's programs, as
  # `api.fixed_normalization` does: no program of its own, neither log-likelihoods nor maps (batches of 1
  # and 4, sizes nothing compiled, both padded to 8; padded to the first batch's size they would compile two).
  cf.score(detector, images[:3], batch_size=CONFIG.batch_size)  # scoring's program, 3 images padded to 8
  with _lowered() as names:
    padded = train.fit_normalization(detector.model, variables, detector.params, detector.permutations,
                                     [images[:1], images[1:]], batch_size=CONFIG.batch_size)
  # (an upsampling einsum outside `anomaly_maps` would be a map program of the pass's own)
  assert not [n for n in names if "log_probs" in n or "maps" in n or "einsum" in n], names
  np.testing.assert_allclose(padded.layer_max, expected.layer_max, rtol=1e-6)
  np.testing.assert_allclose(padded.map_max, expected.map_max, rtol=1e-5)
  got = train.fit_normalization(detector.model, variables, detector.params, detector.permutations,
                                (b["image"] for b in cf.api.input_batches(config, subset, 2)))
  np.testing.assert_allclose(got.layer_max, expected.layer_max, rtol=1e-6)


@pytest.mark.slow
def test_a_run_normalised_per_batch_skips_the_pass_and_refuses_training_maxima(trained):
  _, variables, _ = trained
  config = dataclasses.replace(CONFIG, normalization="batch")
  detector = cf.fit(config, cf.data.load("demo", "train", "brick"), encoder_variables=variables,
                    progress=False)
  assert np.isnan(np.asarray(detector.normalization.map_max))
  images = np.zeros((2, 64, 64, 3), np.uint8)
  assert np.isfinite(cf.score(detector, images).scores).all()  # per batch, as configured
  with pytest.raises(cf.UserError, match="normalization='batch'"):
    cf.score(detector, images, normalization="train")


@pytest.mark.slow
def test_score_takes_uint8_or_float_in_unit_range_and_refuses_anything_else(trained):
  """One contract: uint8 0..255, or float in [0, 1]; float 0..255, other dtypes, non-finite pixels,
  empty arrays and mixed shapes are refused with what was found, instead of scoring silently wrong."""
  detector, _, _ = trained
  images = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  as_uint8 = cf.score(detector, images).scores
  np.testing.assert_allclose(cf.score(detector, images / 255.0).scores, as_uint8, rtol=1e-5)
  np.testing.assert_array_equal(cf.score(detector, list(images)).scores, as_uint8)
  nan = (images / 255.0).astype(np.float32)
  nan[1, 3, 4, 0] = np.nan
  refused = [
      (images.astype(np.float32), r"float images must be in \[0, 1\].*float32 of shape \(2, 64, 64, 3\) "
                                  r"ranging over \[0, 255\]"),
      (images.astype(np.int32), r"int32 of shape \(2, 64, 64, 3\)"),
      (nan, r"finite pixels.*1 NaN or infinite values, in images \[1\]"),
      (np.full((1, 64, 64, 3), np.inf, np.float32), "NaN or infinite"),
      (images[:0], r"at least one image.*\(0, 64, 64, 3\)"),
      (images[:, :32], r"shape \(N, 64, 64, 3\); got uint8 of shape \(2, 32, 64, 3\)"),
      ([images[0], images[1, :32]], "one shape"),
      ([], r"shape \(0,\)"),
  ]
  for bad, message in refused:
    with pytest.raises(cf.UserError, match=message):
      cf.score(detector, bad)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_named_and_the_intact_one_before_it_resumes(trained, tmp_path,
                                                                                  monkeypatch):
  """A truncated file in the newest step: loading names that step in one line; training resumes from the
  step before it (the last epoch's), which is intact, and ends as the undamaged run did."""
  detector, variables, workdir = trained
  damaged = tmp_path / "run"
  shutil.copytree(workdir, damaged)
  latest = checkpoint.latest_step(damaged)
  assert checkpoint.steps(damaged) == [latest, latest - 1]  # the finished run beside its last epoch's
  # A directory's files are all truncated: which of tensorstore's data files holds the parameters (all that
  # `load` reads) and which only the optimiser's moments varies from save to save.
  printed = []  # what Python would print as "Exception ignored in ...": orbax's failing pending reads
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  for name in ("meta/metadata", "state/_METADATA", "state/d", "state/ocdbt.process_0/d"):
    shutil.rmtree(damaged / "checkpoints" / str(latest))
    shutil.copytree(workdir / "checkpoints" / str(latest), damaged / "checkpoints" / str(latest))
    path = damaged / "checkpoints" / str(latest) / name
    for file in path.iterdir() if path.is_dir() else [path]:
      file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"checkpoint step {latest} in .* is damaged") as e:
      cf.load(damaged, variables)
    assert "\n" not in str(e.value), name
    del e  # its traceback holds orbax's pending reads; collecting them closes them, which they report
    gc.collect()
    assert not printed, (name, [str(event.exc_value)[:200] for event in printed])
  logged = []
  resumed = cf.fit(CONFIG, cf.data.load("demo", "train", "brick"), encoder_variables=variables,
                   workdir=damaged, progress=False, log=logged.append)
  assert any(f"step {latest} " in line and "damaged" in line for line in logged), logged
  for a, b in zip(jax.tree.leaves((detector.params, detector.normalization)),
                  jax.tree.leaves((resumed.params, resumed.normalization))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert checkpoint.read_meta(damaged)["normalized"]
  gc.collect()
  assert not printed, [str(event.exc_value)[:200] for event in printed]
