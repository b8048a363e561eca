"""Scores new images with a trained run or an exported detector: an anomaly score per image and a heat map
picture of each.

  cflow-predict --workdir=runs/mvtec_ad/cable/wide_resnet50_2 photo1.png photo2.jpg more/
  cflow-predict --exported=cable.jaxexport photo1.png      # from cflow-export

(or python experiments/predict.py with the same arguments). Arguments are image files or folders (their
images, recursively). Images of any size are resized as the training pipeline resized them. A file that cannot
be read as an image is reported and skipped. Writes into --out_dir (default <workdir>/predictions, or <file
name>_predictions beside an exported file): scores.csv, scores.json and <index>_<image name>.png (the image,
the heat map and the map over the image), replacing the previous call's pictures there. The verdict column
compares the score with --threshold, by default the image threshold of the run's metrics.json (the best-F1
threshold on its test set; an exported file carries it).
"""

import csv
import io
import json
import pathlib

import numpy as np
from absl import flags
from PIL import Image

from cflow_jax import api, checkpoint, report
from cflow_jax.cli import common, config_flags
from cflow_jax.data import files
from cflow_jax.data.input_pipeline import preprocess
from cflow_jax.errors import UserError
from cflow_jax.export import load_exported

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A finished training run's workdir (holding checkpoints/).")
  flags.DEFINE_string("exported", None, "An exported detector (cflow-export), instead of --workdir.")
  flags.DEFINE_string("out_dir", None, "Where the scores and pictures go. Default: <workdir>/predictions, or "
                      "<file name>_predictions beside the exported file.")
  flags.DEFINE_float("threshold", None, "Image score at or above which an image is called anomalous. "
                     "Default: image_threshold of <workdir>/metrics.json (or the exported file's), if known.")
  flags.DEFINE_integer("batch_size", None, "Images per encoder pass. Default: the run's.", lower_bound=1)
  config_flags.define_compilation_cache_flag()


def image_paths(arguments) -> list[pathlib.Path]:
  """The files named, and the image files inside the folders named, in order."""
  paths = []
  for argument in arguments:
    path = pathlib.Path(argument)
    if path.is_dir():
      paths += sorted(p for p in path.rglob("*")
                      if p.is_file() and p.suffix.lower() in files.IMAGE_EXTENSIONS)
    else:
      paths.append(path)
  return paths


def read_resized(path: pathlib.Path, scorer) -> np.ndarray:
  """(S, S, 3) RGB, read and resized as the training images were (a UserError if unreadable); `scorer` has
  the run's image_size, resample and image_dtype (a Config or an exported detector)."""
  encoded, size = files.read_image(path)
  with Image.open(io.BytesIO(encoded)) as image:
    rgb = np.asarray(image.convert("RGB"))
  return preprocess({"image": rgb, "mask": np.zeros(size, np.uint8)}, scorer.image_size, 0.0, scorer.resample,
                    scorer.image_dtype)["image"]


def clear_previous(out_dir: pathlib.Path) -> int:
  """Deletes the pictures an earlier call listed in out_dir's scores.json (and nothing else of the folder),
  so that what is there afterwards is this call's results alone; returns how many were deleted."""
  listing = out_dir / "scores.json"
  if not listing.is_file():
    return 0
  deleted = 0
  for row in json.loads(listing.read_text()).get("images", []):
    picture = pathlib.Path(row["picture"])
    if picture.parent.resolve() == out_dir.resolve() and picture.is_file():
      picture.unlink()
      deleted += 1
  return deleted


def scorer_and_defaults():
  """(what the images are read for: a Config or an exported detector, score(images, batch_size) -> (scores,
  maps), the default out_dir, the default threshold)."""
  if (FLAGS.workdir is None) == (FLAGS.exported is None):
    raise UserError("give --workdir (a trained run) or --exported (an exported file), one of the two")
  if FLAGS.exported:
    path = pathlib.Path(FLAGS.exported)
    exported = load_exported(path)
    return exported, exported.score, path.with_name(f"{path.stem}_predictions"), exported.image_threshold
  workdir = pathlib.Path(FLAGS.workdir)
  if checkpoint.latest_step(workdir) is None:
    raise UserError(f"no trained run in {workdir} (no checkpoints/): train one with "
                    f"python experiments/train.py --workdir={workdir}")
  try:
    detector = api.load(workdir)
  except checkpoint.DamagedCheckpoint as error:
    raise UserError(f"{error}; run train.py again with the same --workdir to rebuild the finished run from "
                    "the newest intact checkpoint") from None
  score = lambda images, batch_size: api.score(detector, images, batch_size, progress=True)
  return detector.config, score, workdir / "predictions", common.image_threshold(workdir)


def run(argv):
  if len(argv) < 2:
    raise UserError("name the images to score: predict.py --workdir=RUN (or --exported=FILE) IMAGE_OR_FOLDER ...")
  scorer, score_images, default_out, default_threshold = scorer_and_defaults()

  images, names = [], []
  for path in image_paths(argv[1:]):
    try:
      images.append(read_resized(path, scorer))
      names.append(path)
    except UserError as error:
      print(f"skipped {path}: {common.one_line(error)}")
  if not images:
    raise UserError("none of the arguments is a readable image")
  scores, maps = score_images(np.stack(images), FLAGS.batch_size)

  out_dir = pathlib.Path(FLAGS.out_dir) if FLAGS.out_dir else default_out
  out_dir.mkdir(parents=True, exist_ok=True)
  cleared = clear_previous(out_dir)
  threshold = FLAGS.threshold if FLAGS.threshold is not None else default_threshold
  low, high = float(maps.min()), float(maps.max())  # one colour scale for all pictures
  rows = []
  for index, (path, image, score, anomaly_map) in enumerate(zip(names, images, scores, maps)):
    picture = out_dir / f"{index:04d}_{path.stem}.png"
    anomalous = None if threshold is None else bool(score >= threshold)
    verdict = "" if anomalous is None else " (anomalous)" if anomalous else " (normal)"
    # Without a threshold nothing is outlined: no map value reaches infinity.
    report.save_strip(picture, image, None, anomaly_map, threshold if threshold is not None else np.inf,
                      title=f"{path.name}: score {score:.4g}{verdict}", vmin=low, vmax=high)
    rows.append({"file": str(path), "score": float(score), "anomalous": anomalous, "picture": str(picture)})
    print(f"{path}: {score:.4f}{verdict}")

  with open(out_dir / "scores.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  (out_dir / "scores.json").write_text(json.dumps(
      {"workdir": FLAGS.workdir, "exported": FLAGS.exported, "threshold": threshold, "images": rows},
      indent=2) + "\n")
  replaced = f" (replacing the previous call's {cleared} pictures)" if cleared else ""
  print(f"{len(rows)} images scored; scores.csv, scores.json and pictures in {out_dir}{replaced}")


def main():
  common.start(run, define_flags, __doc__)
