"""How the map's layer combination and blur change trained models' accuracy, on the same likelihoods.

docs/design.md section 7.1 sums exp(log p - c_l) over the layers, c_l the training maxima. A layer whose
log p / C spreads widely then contributes ~0 almost everywhere, and every pixel far below its layer's
maximum saturates at the same score. This scores the training and test images of each run once (cached in
<workdir>/normalization_study.npz, the file normalization_study.py writes), then recomputes the maps
under each combination, every constant taken from the run's training images (the first
metrics.json["train_images"], as --max_train cut them; never the test set):

  exp          sum_l exp(log p_l - max_l)               (the references' combination)
  log          sum_l log p_l                            (the product of the layers' likelihoods)
  z            sum_l (log p_l - mean_l) / std_l         (each layer standardised on the training fibers)
  floored_log  sum_l max(log p_l, q_l)                  (q_l the --floor_quantile of the training fibers:
                                                         the default since)

each upsampled and blurred with every sigma of --blurs before the sum. The anomaly map is minus the sum
(plus a constant); the image score its maximum. What it found: docs/results.md, "The layers' combination".

  .venv/bin/python experiments/studies/map_study.py --data_dir=DATA --category=brick \
      --out=experiments/studies/results/map_study.jsonl RUN [RUN ...]
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import cflow_jax as cf
from cflow_jax import metrics
from cflow_jax.anomaly_map import layer_constant, upsample
from normalization_study import labels_and_masks, layer_log_probs  # its neighbour here

FLAGS = flags.FLAGS


def per_layer(combination, log_p, train):
  """The layer's term of the likelihood sum, from constants of its training fibers."""
  if combination == "exp":
    return np.exp(log_p - layer_constant(train, "exp", 0.0))
  if combination == "log":
    return log_p
  if combination == "z":
    return (log_p - train.mean()) / train.std()
  if combination == "floored_log":
    return np.maximum(log_p, layer_constant(train, "floored_log", FLAGS.floor_quantile))
  raise ValueError(f"unknown combination {combination!r}")


def anomaly_maps(combination, test, train, image_size, blur_sigma, chunk=16):
  """(scores, maps): minus the summed, upsampled terms, shifted so that the smallest anomaly is 0."""
  total = np.zeros((len(test[0]), image_size, image_size), np.float32)
  for layer, layer_train in zip(test, train):
    term = per_layer(combination, layer, layer_train).astype(np.float32)
    for i in range(0, len(term), chunk):
      total[i:i + chunk] += np.asarray(upsample(jnp.asarray(term[i:i + chunk]), image_size, blur_sigma))
  maps = total.max() - total
  return maps.max(axis=(1, 2)), maps


def run_training_images(workdir, train_set):
  used = json.loads((Path(workdir) / "metrics.json").read_text()).get("train_images", len(train_set))
  return train_set.subset(range(used)) if used < len(train_set) else train_set


def study(workdir):
  cache = Path(workdir) / "normalization_study.npz"
  detector = cf.load(workdir)
  config = detector.config
  load = lambda split: cf.api.resized(config, cf.data.load(FLAGS.dataset, split, FLAGS.category, FLAGS.data_dir))
  test_set = load("test")
  stored = dict(np.load(cache)) if cache.exists() else {}
  layers = range(len(detector.params))
  for split, images in (("test", test_set), ("train", None)):
    if f"{split}0" not in stored:
      images = images if images is not None else run_training_images(workdir, load(split))
      stored.update({f"{split}{i}": l for i, l in enumerate(
          layer_log_probs(detector, images, config.batch_size, f"{split} log p"))})
      np.savez(cache, **stored)
  test = [stored[f"test{i}"] for i in layers]
  train = [stored[f"train{i}"] for i in layers]
  labels, masks = labels_and_masks(test_set, config.batch_size, config.image_size)
  rows = []
  for combination in FLAGS.combinations:
    for blur in (float(b) for b in FLAGS.blurs):
      scores, maps = anomaly_maps(combination, test, train, config.image_size, blur)
      found = metrics.evaluate(scores, labels, maps, masks)
      row = {"run": Path(workdir).name, "category": FLAGS.category, "combination": combination, "blur": blur,
             **({"floor_quantile": FLAGS.floor_quantile} if combination == "floored_log" else {}),
             **{k: found[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1")}}
      rows.append(row)
      print(f"{Path(workdir).name}: {combination:>3} blur {blur:3.0f}: image / pixel AUROC "
            f"{100 * row['image_auroc']:.2f} / {100 * row['pixel_auroc']:.2f}, AUPRO {100 * row['aupro']:.2f}",
            flush=True)
  return rows


def main(argv):
  for workdir in argv[1:]:
    rows = study(workdir)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def define_flags():
  flags.DEFINE_string("dataset", "folder", "The runs' dataset.")
  flags.DEFINE_string("data_dir", None, "Raw data, as for cflow-train.")
  flags.DEFINE_string("category", None, "The runs' category.")
  flags.DEFINE_list("combinations", ["exp", "log", "z", "floored_log"], "Layer combinations to compare.")
  flags.DEFINE_float("floor_quantile", 0.01, "The floor of floored_log, a quantile of the training fibers.")
  flags.DEFINE_list("blurs", ["0", "2", "4", "8"], "Gaussian sigmas (output pixels) to compare.")
  flags.DEFINE_string("out", None, "Append one JSON row per run, combination and blur to this file.")


if __name__ == "__main__":
  define_flags()  # here, not on import: rescore.py imports this file's functions
  app.run(main)
