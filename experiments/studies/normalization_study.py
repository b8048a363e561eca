"""How the anomaly map's normalisation constants change the scores of one trained model.

docs/design.md section 7.1 turns per-layer log-likelihoods into a map with exp(log p - c_l) per layer; the
constants c_l set how much each layer weighs in the sum. The references take c_l from the images scored
together (the whole test set, or each batch); our default fixes them from the training images. This script
scores the test set once, keeps every layer's log p / C, and recomputes the maps under each rule, so that
the rules are compared on exactly the same likelihoods:

  train           the run's own constants: max over the training fibers (fixed; our default)
  train_q<q>      the q-quantile of the training fibers' log p (fixed; with --quantiles, which needs
                  a pass over the training images)
  test_set        max over the whole test set (the original code)
  batch           max over each batch of --batch_size test images in file order (anomalib)
  batch_shuffled  the same over batches of the test images in a random order: a score that moves
                  between `batch` and this depends on which images share its batch
  test_set_unblurred  test_set without the run's Gaussian blur (docs/design.md section 7.1's map
                  exactly), when the run blurs; every other rule blurs as the run does (--blur_sigma)

  .venv/bin/python experiments/studies/normalization_study.py --workdir=RUN --dataset=folder \
      --data_dir=DATA --category=magnetic_tile [--quantiles=0.99,0.999]

The per-layer log-likelihoods are cached in <workdir>/normalization_study.npz, the figures written to
<workdir>/normalization_study.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

import cflow_jax as cf
from cflow_jax import metrics, model as model_lib, runtime
from cflow_jax.anomaly_map import Normalization, anomaly_maps

FLAGS = flags.FLAGS


def layer_log_probs(detector, images, batch_size, desc):
  """Every layer's log p / C for a set of images, as numpy (N, h, w) per layer."""
  parts = []
  for batch in tqdm(cf.api.input_batches(detector.config, images, batch_size), desc=desc,
                    total=-(-len(images) // batch_size)):
    x, n = runtime.pad_batch(batch["image"], batch_size), len(batch["image"])
    log_probs = model_lib.image_log_probs(detector.model, detector.encoder_variables, detector.params,
                                          detector.permutations, x)
    parts.append([np.asarray(layer)[:n] for layer in log_probs])
  return [np.concatenate(layer) for layer in zip(*parts)]


def labels_and_masks(test_set, batch_size, image_size):
  labels, masks = [], []
  for batch in cf.data.batches(test_set, batch_size, image_size):
    labels.append(batch["label"]), masks.append(batch["mask"])
  return np.concatenate(labels), np.concatenate(masks)


def fixed(layer_max):
  """Normalization with these per-layer constants; map_max is 0 (it only shifts every score alike)."""
  return Normalization(jnp.asarray(layer_max, jnp.float32), jnp.asarray(0.0, jnp.float32))


def score_rule(rule, detector, train, test, image_size, batch_size, seed=0, blur_sigma=None):
  """(scores, maps) of the test set under one rule, the maps blurred as the run's config says or with
  `blur_sigma`."""
  blur = detector.config.blur_sigma if blur_sigma is None else blur_sigma
  if rule == "test_set":
    return _maps(test, image_size, None, blur)
  if rule in ("batch", "batch_shuffled"):
    order = np.arange(len(test[0]))
    if rule == "batch_shuffled":
      order = np.random.default_rng(seed).permutation(order)
    parts = [_maps([layer[order[i:i + batch_size]] for layer in test], image_size, None, blur)
             for i in range(0, len(order), batch_size)]
    scores, maps = np.empty(len(order)), np.empty((len(order), image_size, image_size), np.float32)
    scores[order], maps[order] = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return scores, maps
  if rule == "train":
    return _maps(test, image_size, detector.normalization, blur, detector.config.likelihood)
  q = float(rule.removeprefix("train_q"))
  return _maps(test, image_size, fixed([np.quantile(layer, q) for layer in train]), blur)


def _maps(layers, image_size, normalization, blur_sigma, likelihood="exp", chunk=64):
  """(scores, maps) of stored log p, a few images at a time; with `normalization=None` the maxima are
  taken over every image given, as the references do over the images scored together."""
  together = normalization is None
  if together:
    normalization = fixed([layer.max() for layer in layers])
  maps = np.concatenate([np.asarray(anomaly_maps([jnp.asarray(l[i:i + chunk]) for l in layers], image_size,
                                                 normalization, blur_sigma, likelihood)[0])
                         for i in range(0, len(layers[0]), chunk)])
  if together:
    maps = maps - maps.min()  # map_max - likelihood, map_max the largest summed likelihood of the set
  return maps.max(axis=(1, 2)), maps


def define_flags():
  flags.DEFINE_string("workdir", None, "A finished run.", required=True)
  flags.DEFINE_string("dataset", "folder", "Its dataset.")
  flags.DEFINE_string("data_dir", None, "Raw data, as for cflow-train.")
  flags.DEFINE_string("category", None, "Its category.")
  flags.DEFINE_integer("batch_size", 32, "Test images per batch (also the batches of the batch rules).")
  flags.DEFINE_list("quantiles", [], "Also fixed constants at these quantiles of the training log p, e.g. "
                    "0.99,0.999.")


def main(_):
  quantiles = [float(q) for q in FLAGS.quantiles]
  cache = Path(FLAGS.workdir) / "normalization_study.npz"
  detector = cf.load(FLAGS.workdir)
  size = detector.config.image_size
  load = lambda split: cf.api.resized(detector.config,
                                      cf.data.load(FLAGS.dataset, split, FLAGS.category, FLAGS.data_dir))
  test_set = load("test")
  layers = range(len(detector.params))
  stored = dict(np.load(cache)) if cache.exists() else {}
  if "test0" not in stored:
    stored.update({f"test{i}": l for i, l in enumerate(
        layer_log_probs(detector, test_set, FLAGS.batch_size, "test log p"))})
  if quantiles and "train0" not in stored:
    stored.update({f"train{i}": l for i, l in enumerate(
        layer_log_probs(detector, load("train"), FLAGS.batch_size, "train log p"))})
  np.savez(cache, **stored)
  test = [stored[f"test{i}"] for i in layers]
  train = [stored[f"train{i}"] for i in layers] if quantiles else None
  labels, masks = labels_and_masks(test_set, FLAGS.batch_size, size)

  print("per-layer constants (log p / C):")
  for i in layers:
    qs = " ".join(f"q{q}={np.quantile(train[i], q):.3f}" for q in quantiles) if train else ""
    constant = float(detector.normalization.layer_max[i])
    print(f"  layer {i} {test[i].shape[1:]}: train constant ({detector.config.likelihood}) {constant:.3f} "
          f"{qs} | test max {test[i].max():.3f}")
  rules = ["train", *(f"train_q{q}" for q in quantiles), "test_set", "batch", "batch_shuffled"]
  if detector.config.blur_sigma:
    rules.append("test_set_unblurred")
  results = {}
  for rule in rules:
    blur = 0.0 if rule == "test_set_unblurred" else None
    scores, maps = score_rule(rule.removesuffix("_unblurred"), detector, train, test, size, FLAGS.batch_size,
                              blur_sigma=blur)
    results[rule] = {"image_auroc": metrics.auroc(scores, labels),
                     "pixel_auroc": metrics.auroc(maps, masks)}
    print(f"{rule:>18}: image AUROC {results[rule]['image_auroc']:.4f}  "
          f"pixel AUROC {results[rule]['pixel_auroc']:.4f}")
  (Path(FLAGS.workdir) / "normalization_study.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  define_flags()  # here, not on import: normalization_subset.py imports this file's functions
  app.run(main)
