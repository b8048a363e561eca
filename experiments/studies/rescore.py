"""Scores a finished run again under other scoring settings, without training it again.

The run's decoders are kept; its fixed constants are fitted again from its training images (the first
metrics.json["train_images"], as --max_train cut them) exactly as train.py does after training
(`api.fixed_normalization`), then its test set is evaluated as train.py evaluates it. Training does not
read these settings, so the metrics are those a new run with them would report. One JSON row per run.

  .venv/bin/python experiments/studies/rescore.py --data_dir=DATA --category=magnetic_tile \
      --likelihood=floored_log --out=rows.jsonl RUN [RUN ...]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import app, flags

import cflow_jax as cf
from cflow_jax import config as config_lib
from map_study import run_training_images  # its neighbour here

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "folder", "The runs' dataset.")
flags.DEFINE_string("data_dir", None, "Raw data, as for cflow-train.")
flags.DEFINE_string("category", None, "The runs' category.")
flags.DEFINE_enum("likelihood", None, config_lib.LIKELIHOODS, "Score with this likelihood (default: the run's).")
flags.DEFINE_float("floor_quantile", None, "Score with this floor quantile (default: the run's).")
flags.DEFINE_integer("max_test", None, "As train.py's: this many test images, evenly spaced.")
flags.DEFINE_string("out", None, "Append the rows to this file.")


def rescore(workdir) -> dict:
  detector = cf.load(workdir)
  changes = {k: v for k, v in (("likelihood", FLAGS.likelihood), ("floor_quantile", FLAGS.floor_quantile))
             if v is not None}
  config = dataclasses.replace(detector.config, normalization="train", **changes)
  model = dataclasses.replace(detector.model, config=config)
  load = lambda split: cf.api.resized(config, cf.data.load(FLAGS.dataset, split, FLAGS.category, FLAGS.data_dir))
  train_set = run_training_images(workdir, load("train"))
  normalization = cf.api.fixed_normalization(model, detector.encoder_variables, detector.params,
                                             detector.permutations, train_set)
  detector = dataclasses.replace(detector, model=model, normalization=normalization)
  test_set = load("test")
  if FLAGS.max_test is not None and FLAGS.max_test < len(test_set):  # as train.py cuts it
    test_set = test_set.subset(np.linspace(0, len(test_set) - 1, FLAGS.max_test).round())
  found = cf.evaluate(detector, test_set).metrics
  return {"run": Path(workdir).name, "category": FLAGS.category, **changes,
          **{k: found[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1")}}


def main(argv):
  for workdir in argv[1:]:
    row = rescore(workdir)
    print(f"{row['run']}: image / pixel AUROC {100 * row['image_auroc']:.2f} / {100 * row['pixel_auroc']:.2f}, "
          f"AUPRO {100 * row['aupro']:.2f}", flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
