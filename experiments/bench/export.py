"""Scoring from an exported file (`cflow_jax.load_exported`) against in process (`cf.score`), and the file's
size, on one device (as predict.py scores).

    python experiments/bench/export.py --workdir=runs/demo/brick/vgg16_hed         # a trained run
    python experiments/bench/export.py --backbone=wide_resnet50_2 --random_weights  # size and speed only

Timings are the best of --repeats after a first call (which compiles); both sides score the same random
uint8 images in batches of the run's size.
"""

import json
import pathlib
import tempfile
import time
import zipfile

import jax
import numpy as np
from absl import app, flags

from cflow_jax.cli import common
from cflow_jax import api, encoders, model as model_lib, train
from cflow_jax.config import Config
from cflow_jax.export import export, load_exported

flags.DEFINE_string("workdir", None, "A finished run to export; else a detector with random weights.")
flags.DEFINE_string("backbone", "wide_resnet50_2", "Encoder, with --random_weights.")
flags.DEFINE_integer("image_size", 256, "Input size, with --random_weights.")
flags.DEFINE_integer("batch_size", 8, "Images per batch, with --random_weights.")
flags.DEFINE_bool("random_weights", False, "Random encoder and decoder weights (the file's size and the "
                  "speed do not depend on their values).")
flags.DEFINE_integer("images", 32, "Images scored per timing.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is kept).")
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
FLAGS = flags.FLAGS


def random_detector() -> api.Detector:
  config = Config(backbone=FLAGS.backbone, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size)
  model = model_lib.build(config)
  variables = encoders.init_variables(model.encoder, jax.random.key(0), config.image_size)
  state = train.init_state(model, jax.random.key(1))
  return api.Detector(model, variables, state.params, state.permutations, state.normalization)


def best_seconds(fn, repeats: int) -> float:
  fn()  # compiles
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return min(times)


def main(_):
  if FLAGS.workdir is None and not FLAGS.random_weights:
    raise app.UsageError("give --workdir or --random_weights")
  detector = api.load(FLAGS.workdir) if FLAGS.workdir else random_detector()
  config = detector.config
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.images, config.image_size, config.image_size, 3),
                                             dtype=np.uint8)
  with tempfile.TemporaryDirectory() as folder:
    began = time.perf_counter()
    path = export(detector, pathlib.Path(folder) / "detector.jaxexport", normalization="train")
    export_seconds = time.perf_counter() - began
    began = time.perf_counter()
    scorer = load_exported(path)
    load_seconds = time.perf_counter() - began
    figures = {
        "backbone": config.backbone, "image_size": config.image_size, "batch_size": config.batch_size,
        "devices": [str(d) for d in jax.devices()], "file_mib": path.stat().st_size / 2 ** 20,
        "program_kib": zipfile.ZipFile(path).getinfo("scoring.jaxexport").file_size / 1024,
        "export_seconds": export_seconds, "load_seconds": load_seconds,
    }
    in_process = best_seconds(lambda: api.score(detector, images), FLAGS.repeats)
    exported = best_seconds(lambda: scorer.score(images), FLAGS.repeats)
  figures.update({"in_process_images_per_s": len(images) / in_process,
                  "exported_images_per_s": len(images) / exported})
  for k, v in figures.items():
    print(f"{k:28s} {v:,.4g}" if isinstance(v, float) else f"{k:28s} {v}")
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
  app.run(common.exit_on_user_error(main))
