"""Times the pixel metrics on 100 random 256x256 maps with blob masks, against scikit-learn's roc_auc_score.

    python experiments/bench/metrics.py [--images=100 --size=256 --repeats=3]

Prints the best of `repeats` wall times per metric, so other load on the machine inflates them less.
"""

import time

import numpy as np
from absl import app, flags
from scipy import ndimage
from sklearn import metrics as skm

from cflow_jax import metrics

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 100, "Random maps.")
flags.DEFINE_integer("size", 256, "Their side in pixels.")
flags.DEFINE_integer("repeats", 3, "Timed runs per metric, the best kept.")


def synthetic(images, size, seed=0):
  """(maps, masks): float32 noise maps, half the images with a few smooth blobs that score higher."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size]
  masks = np.zeros((images, size, size), bool)
  for i in range(0, images, 2):
    for _ in range(rng.integers(1, 4)):
      r, c = rng.integers(0, size, 2)
      radius = rng.uniform(3, size / 10)
      masks[i] |= (rows - r) ** 2 + (cols - c) ** 2 < radius ** 2
  noise = rng.normal(size=masks.shape)
  maps = ndimage.gaussian_filter(noise, (0, 2, 2)) + 0.6 * ndimage.gaussian_filter(masks * 1.0, (0, 3, 3))
  return maps.astype(np.float32), masks


def best_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return min(times), value


def main(_):
  args = FLAGS
  maps, masks = synthetic(args.images, args.size)
  scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
  print(f"{maps.size:,} pixels ({args.images} x {args.size}x{args.size}), "
        f"{masks.mean():.1%} defective, {metrics.label_regions(masks)[1]} regions; best of {args.repeats}")
  runs = [
      ("pixel AUROC", lambda: metrics.auroc(maps, masks)),
      ("pixel F1", lambda: metrics.best_f1(maps, masks)[0]),
      ("AUPRO (FPR 0.3)", lambda: metrics.aupro(maps, masks)),
      ("evaluate (all, one sort)", lambda: metrics.evaluate(scores, labels, maps, masks)["aupro"]),
      ("sklearn roc_auc_score", lambda: skm.roc_auc_score(masks.ravel(), maps.ravel())),
  ]
  for name, fn in runs:
    seconds, value = best_time(fn, args.repeats)
    print(f"  {name:26s} {seconds:6.3f} s   value {value:.6f}")


if __name__ == "__main__":
  app.run(main)
