"""How many training images the fixed normalisation needs: one trained run's test accuracy when its
per-layer maxima come from K training images, evenly spaced (as `normalization_images` picks them).

Scores every training and test image of the run once, then recomputes the maps for each K from the same
log-likelihoods. The map's maximum M only shifts every score by a constant, so only the layer maxima
matter for AUROC and AUPRO; they are printed beside the metrics.

  .venv/bin/python experiments/studies/normalization_subset.py --workdir=RUN --dataset=folder \
      --data_dir=DATA --category=magnetic_tile --counts=64,32,16,8
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import cflow_jax as cf
from cflow_jax import metrics
from cflow_jax.anomaly_map import Normalization, anomaly_maps, layer_constant
from normalization_study import labels_and_masks, layer_log_probs  # its neighbour here

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished run.", required=True)
flags.DEFINE_string("dataset", "folder", "Its dataset.")
flags.DEFINE_string("data_dir", None, "Raw data, as for cflow-train.")
flags.DEFINE_string("category", None, "Its category.")
flags.DEFINE_list("counts", ["64", "32", "24", "16", "8", "4"], "The K to try (all images always).")


def main(_):
  detector = cf.load(FLAGS.workdir)
  config = detector.config
  load = lambda split: cf.api.resized(config, cf.data.load(FLAGS.dataset, split, FLAGS.category, FLAGS.data_dir))
  train_set, test_set = load("train"), load("test")
  train_lp = layer_log_probs(detector, train_set, config.batch_size, "training images")
  test_lp = layer_log_probs(detector, test_set, config.batch_size, "test images")
  labels, masks = labels_and_masks(test_set, config.batch_size, config.image_size)
  n = len(train_set)
  results = {}
  for k in sorted({n} | {int(c) for c in FLAGS.counts if int(c) < n}, reverse=True):
    chosen = np.linspace(0, n - 1, k).round().astype(int)
    # The run's constants from these K images: each layer's maximum, or its floor (`likelihood`).
    layer_max = jnp.asarray([layer_constant(layer[chosen], config.likelihood, config.floor_quantile)
                             for layer in train_lp], jnp.float32)
    fixed = Normalization(layer_max, jnp.float32(0.0))
    parts = [anomaly_maps(tuple(jnp.asarray(layer[i:i + 16]) for layer in test_lp), config.image_size, fixed,
                          config.blur_sigma, config.likelihood) for i in range(0, len(labels), 16)]
    maps = np.concatenate([np.asarray(m) for m, _ in parts])
    scores = np.concatenate([np.asarray(s) for _, s in parts])
    found = metrics.evaluate(scores, labels, maps, masks)
    results[k] = {"image_auroc": found["image_auroc"], "pixel_auroc": found["pixel_auroc"],
                  "aupro": found["aupro"], "layer_max": [float(x) for x in layer_max]}
    print(f"K = {k:4d} of {n}: image / pixel AUROC {100 * found['image_auroc']:.2f} / "
          f"{100 * found['pixel_auroc']:.2f}, AUPRO {100 * found['aupro']:.2f}, layer maxima "
          f"{', '.join(f'{x:.3f}' for x in layer_max)}", flush=True)
  out = Path(FLAGS.workdir) / "normalization_subset.json"
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"written to {out}")


if __name__ == "__main__":
  app.run(main)
