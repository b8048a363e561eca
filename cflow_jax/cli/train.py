"""Trains CFLOW-AD on one category and evaluates it.

  cflow-train --category=cable                       # MVTec AD, the reference defaults
  cflow-train --dataset=demo                         # no download, a few minutes on a CPU
  cflow-train --dataset=folder --data_dir=my_parts   # your images, in MVTec AD's layout

(or python experiments/train.py with the same flags). Writes into --workdir (default
runs/<dataset>/<category>/<backbone>): checkpoints/, metrics.json, results.md, roc.png, pro.png and
pictures/. Running again with the same workdir resumes an interrupted run, or re-evaluates a finished one.
"""

import pathlib

from absl import flags

from cflow_jax.cli import common, config_flags
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags():
  config_flags.define_training_flags()
  flags.DEFINE_string("category", None, "Category: mvtec_ad: bottle, cable, ... (required); demo: brick, "
                      "grass, gravel (default brick); folder: a subfolder of --data_dir (optional).")
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics.json, results.md and pictures go here; a run "
                      "already there is resumed, or re-evaluated if it had finished. Default: "
                      "runs/<dataset>/<category>/<backbone>.")


def run(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}: flags take the form --name=value")
  config = config_flags.config_from_flags()
  train_set, test_set = common.load_splits(FLAGS.category, config)
  workdir = FLAGS.workdir or pathlib.Path("runs", FLAGS.dataset, train_set.category, config.backbone)
  common.train_and_evaluate(config, train_set, test_set, workdir, FLAGS.num_pictures)


def main():
  common.start(run, define_flags, __doc__)
