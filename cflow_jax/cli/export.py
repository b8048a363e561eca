"""Exports a trained run's detector as one portable file: its whole scoring function in StableHLO
(`jax.export`) and its weights, for scoring outside the training code (`cflow_jax.load_exported`, or
cflow-predict --exported).

  cflow-export --workdir=runs/mvtec_ad/cable/wide_resnet50_2 --out=cable.jaxexport

(or python experiments/export.py with the same flags). The batch dimension is symbolic and the program is
lowered for every platform of --platforms at once.
"""

import pathlib

from absl import flags

from cflow_jax import api, checkpoint
from cflow_jax.cli import common
from cflow_jax.export import PLATFORMS, export
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A finished training run's workdir (holding checkpoints/).")
  flags.DEFINE_string("out", None, "The file to write. Default: <workdir>/detector.jaxexport.")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to lower the scoring function for.")
  flags.DEFINE_enum("normalization", None, ("train",), "Export with the maxima fixed from the training images "
                    "even if the run normalises otherwise (its config's test_set or batch cannot be exported).")
  flags.mark_flag_as_required("workdir")


def run(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = pathlib.Path(FLAGS.workdir)
  if checkpoint.latest_step(workdir) is None:
    raise UserError(f"no trained run in {workdir} (no checkpoints/): train one with "
                    f"python experiments/train.py --workdir={workdir}")
  detector = api.load(workdir)
  out = pathlib.Path(FLAGS.out) if FLAGS.out else workdir / "detector.jaxexport"
  path = export(detector, out, platforms=FLAGS.platforms, normalization=FLAGS.normalization,
                image_threshold=common.image_threshold(workdir))
  print(f"exported {detector.config.backbone} at {detector.config.image_size} px for "
        f"{', '.join(FLAGS.platforms)}: {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")


def main():
  common.start(run, define_flags, __doc__)
