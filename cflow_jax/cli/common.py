"""What the commands share at run time: the data they load, training and evaluating one category into a
workdir (metrics.json, results.md and the pictures), whether a workdir holds a finished run, joining a job
of several processes, and the one-line exit on a user's mistake (and, for the benchmarks in
experiments/bench/, batches timed as training streams them). Their flags: `config_flags`.
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
from absl import app, flags, logging

from cflow_jax import api, checkpoint, compile_cache, data, encoders, metrics as metrics_lib, report, train
from cflow_jax.config import Config
from cflow_jax.data.input_pipeline import preprocess
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS
# One decoder per tapped layer: more CPU devices than decoders would idle.
TAPPED_LAYERS = max(len(spec.taps) for spec in encoders.SPECS.values())


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


def start(run, define_flags, doc: str):
  """A command's door (a console script or its experiments/ wrapper): defines its flags, then runs
  `run(argv)` under absl, with a user's mistake as one line (`exit_on_user_error`).

  absl's --help prints the main module's docstring and key flags: the door is the main module, so the
  command's `doc` and flags are given to it."""
  before = set(FLAGS)
  define_flags()
  for name in sorted(set(FLAGS) - before):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  sys.modules["__main__"].__doc__ = doc
  app.run(exit_on_user_error(run))
