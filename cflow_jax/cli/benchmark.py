"""Trains and evaluates several categories and prints the paper's tables, with the published numbers beside.

  cflow-benchmark                                   # all 15 MVTec AD categories
  cflow-benchmark --categories=bottle,cable --epochs=10
  cflow-benchmark --dataset=demo --categories=brick,grass,gravel

(or python experiments/benchmark.py with the same flags). Each category runs as cflow-train would, in
<workdir>/<category>/<backbone> (so with the default workdir, runs/<dataset>, a category cflow-train has
already trained is reused); the tables go to the screen and to <workdir>/benchmark_<backbone>.md. Takes the
same training flags as cflow-train.
"""

import pathlib

import jax
from absl import flags

from cflow_jax import data, report
from cflow_jax.cli import common, config_flags
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS

# docs/design.md section 9: CFLOW-AD paper, WRN-50-2 at 256 px, per class (image AUROC, pixel AUROC) in
# percent. The paper picks each metric's best epoch on the test set and averages 4 runs; ours reports the
# last epoch.
PAPER = {
    "bottle": (100.0, 98.98), "cable": (97.59, 97.64), "capsule": (97.68, 98.98), "carpet": (98.73, 99.25),
    "grid": (99.60, 98.99), "hazelnut": (99.98, 98.89), "leather": (100.0, 99.66),
    "metal_nut": (99.26, 98.56), "pill": (96.82, 98.95), "screw": (91.89, 98.86), "tile": (99.88, 98.01),
    "toothbrush": (99.65, 98.93), "transistor": (95.21, 97.99), "wood": (99.12, 96.65),
    "zipper": (98.48, 99.08),
}
PUBLISHED_MEANS = """Published means over all 15 MVTec AD categories, in percent:

| | Image AUROC | Pixel AUROC | AUPRO | Image F1 |
|---|---:|---:|---:|---:|
| CFLOW-AD paper, WRN-50-2, 256 px | 98.26 | 98.62 | 94.60 | - |
| CFLOW-AD paper, ResNet-18 | 96.75 | 98.06 | - | - |
| anomalib Cflow, WRN-50-2, seed 42 | 96.2 | 97.1 | - | 94.4 |
"""


def published(categories) -> str:
  """The paper's per-category numbers for those of `categories` it has, in the same layout as ours."""
  known = {c: {"image_auroc": PAPER[c][0] / 100, "pixel_auroc": PAPER[c][1] / 100}
           for c in categories if c in PAPER}
  if not known:
    return ""
  return ("## Published\n\nCFLOW-AD paper (WRN-50-2, 256 px, best epoch on the test set, mean of 4 runs), "
          f"the same categories:\n\n{report.metric_tables(known)}\n{PUBLISHED_MEANS}")


def timing_table(results: dict) -> str:
  lines = ["| category | train s | train images/s | train fibers/s | score images/s | peak RSS MB |",
           "|---|---:|---:|---:|---:|---:|"]
  for category, document in results.items():
    t = document["timing"]
    lines.append(f"| {category} | {t['train_seconds']:.1f} | {t['train_images_per_s']:.2f} | "
                 f"{t['train_fibers_per_s']:,.0f} | {t['score_images_per_s']:.2f} | {t['peak_rss_mb']:,.0f} |")
  return "\n".join(lines) + "\n"


def define_flags():
  config_flags.define_training_flags()
  flags.DEFINE_list("categories", None, "Comma-separated categories. Default: all of the dataset's.")
  flags.DEFINE_string("workdir", None, "Root of the per-category runs and of the tables. Default: "
                      "runs/<dataset>.")


def run(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}: flags take the form --name=value")
  config = config_flags.config_from_flags()
  categories = FLAGS.categories or list(data.CATEGORIES[FLAGS.dataset]) or [None]
  root = pathlib.Path(FLAGS.workdir or pathlib.Path("runs") / FLAGS.dataset)
  results = {}
  for category in categories:
    train_set, test_set = common.load_splits(category, config)
    workdir = root / train_set.category / config.backbone
    results[train_set.category] = common.train_and_evaluate(config, train_set, test_set, workdir,
                                                            FLAGS.num_pictures)

  text = (f"# CFLOW-AD on {FLAGS.dataset}: {config.backbone} at {config.image_size} px, "
          f"{config.epochs} epochs, seed {config.seed}\n\n## Ours\n\n{report.metric_tables(results)}\n"
          f"## Timing\n\n{timing_table(results)}\n")
  if FLAGS.dataset == "mvtec_ad":
    text += published(results)
  path = root / f"benchmark_{config.backbone}.md"
  if jax.process_index() == 0:  # on several processes every category is data parallel over all of them
    path.write_text(text)
    print(f"\n{text}\nwritten to {path}")


def main():
  common.start(run, define_flags, __doc__)
