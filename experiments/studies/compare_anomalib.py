"""Side-by-side benchmark on Magnetic Tile: our CFLOW (experiments/train.py) against anomalib's Cflow.

Both sides get the same images, resized with the same filter and kept unrounded (antialiased bilinear in
float, the reference's; ours defaults to the original code's Lanczos, rounded to uint8), the same HED VGG16
encoder, input size, fiber batch N, epochs, learning rate, batch size and seed, train on every image each
epoch (a last, shorter batch included), and each runs in its own subprocess pinned to the same CPUs with
the same thread settings; rounds alternate which side runs first. The table gives each side's accuracy
and speed, and ours/anomalib ratios of throughput and peak memory.

Runs with our venv and never imports torch: the reference side runs under the torch venv
(experiments/reference/anomalib_cflow.py), ours under this interpreter.

Data: the project's split of the Magnetic Tile set (../shared/data/magnetic_tile/README.md), written as an
MVTec-layout folder of symlinks: MT_Free stems sorted by name, position % 5 == 0 -> test/good, the rest
-> train/good; every image of the five defect classes -> test/<class>, its mask ->
ground_truth/<class>/<stem>_mask.png. --max_train/--max_test materialise a smaller folder holding exactly
that subset (first N train images; N test images evenly spaced over (class, name)), so both sides see the
same images whatever their own subset flags do; the flags are forwarded as well.

Quick check (a few minutes on 2 cores):
  .venv/bin/python experiments/studies/compare_anomalib.py --max_train=16 --max_test=16 --image_size=64
Several seeds (one round each; the accuracy is then also given as mean +- standard deviation), or the
rounds of reports made separately, one per seed, summarised together:
  .venv/bin/python experiments/studies/compare_anomalib.py --seeds=0,1,2
  .venv/bin/python experiments/studies/compare_anomalib.py --combine \
      seed42/compare_anomalib.json seed0/compare_anomalib.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from absl import app, flags

from cflow_jax.config import Config

FLAGS = flags.FLAGS

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "magnetic_tile"
REFERENCE_SCRIPT = REPO / "experiments" / "reference" / "anomalib_cflow.py"
CATEGORY = "magnetic_tile"
DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

ACCURACY = ("image_auroc", "pixel_auroc", "image_f1")
# The same trained models with the maxima of docs/design.md section 7.2 taken over the whole test set (the
# original code's rule), over each batch (anomalib's) and over batches of a shuffled test order: the first
# makes the two sides' numbers comparable without either depending on batch composition. Ours from
# experiments/studies/normalization_study.py, anomalib's from the log-likelihoods its map generator saw.
# Post-processing: ours blurs its maps (--blur_sigma, our default); "test_set_unblurred" is our map without
# it, "test_set_blurred" anomalib's with it, so each side is also seen with the other's.
RULES = ("test_set", "batch", "batch_shuffled", "test_set_unblurred", "test_set_blurred")
RESCORED = tuple(f"{metric}_{rule}" for rule in RULES for metric in ("image_auroc", "pixel_auroc"))
SPEED = ("train_seconds", "train_fibers_per_s", "train_images_per_s", "score_images_per_s")
MEMORY = ("peak_rss_mb", "child_peak_rss_mb")
# What must agree for rounds of several reports to be summarised together.
SETTINGS = ("backbone", "image_size", "fiber_batch", "epochs", "lr", "ours_lr", "batch_size", "max_train",
            "max_test", "resample", "image_dtype", "last_batch", "blur_sigma")
RATIOS = ("train_fibers_per_s", "train_images_per_s", "score_images_per_s", "peak_rss_mb", "child_peak_rss_mb")


def _reference_module():
  """The reference script's image selection (torch-free part), so that the subset rule lives in one place."""
  spec = importlib.util.spec_from_file_location("anomalib_cflow_reference", REFERENCE_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fresh_dir(path: Path) -> Path:
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  return path


def sync_links(root: Path, links: dict[str, Path]) -> dict[str, int]:
  """Make `root` hold exactly these symlinks (relative path -> target); returns images per train/test folder.

  An identical folder is left untouched: our folder dataset fingerprints its files, and fresh links would
  make it prepare the same images again."""
  links = {rel: target.resolve() for rel, target in links.items()}
  existing = None
  if root.exists():
    existing = {str(p.relative_to(root)): Path(os.readlink(p)) for p in root.rglob("*") if p.is_symlink()}
  if existing != links:
    _fresh_dir(root)
    for rel, target in links.items():
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
      (root / rel).symlink_to(target)
  counts: dict[str, int] = {}
  for rel in sorted(links):
    if not rel.startswith("ground_truth/"):
      folder = str(Path(rel).parent)
      counts[folder] = counts.get(folder, 0) + 1
  return counts


def split_links(source: Path) -> dict[str, Path]:
  """The project's Magnetic Tile split in MVTec layout, as relative path -> file in `source`."""
  links = {}
  free = sorted(p.stem for p in (source / "MT_Free" / "Imgs").glob("*.jpg"))
  if not free:
    raise FileNotFoundError(f"no MT_Free/Imgs/*.jpg under {source}")
  for position, stem in enumerate(free):
    subset = "test" if position % 5 == 0 else "train"
    links[f"{subset}/good/{stem}.jpg"] = source / "MT_Free" / "Imgs" / f"{stem}.jpg"
  for cls in DEFECT_CLASSES:
    name = cls.removeprefix("MT_").lower()
    for image in sorted((source / cls / "Imgs").glob("*.jpg")):
      mask = image.with_suffix(".png")
      if not mask.exists():
        raise FileNotFoundError(f"no mask for {image}")
      links[f"test/{name}/{image.name}"] = image
      links[f"ground_truth/{name}/{image.stem}_mask.png"] = mask
  return links


def subset_links(full_dir: Path, max_train: int | None, max_test: int | None) -> dict[str, Path]:
  """The images that the reference script's --max_train/--max_test select from `full_dir`, same layout."""
  reference = _reference_module()
  links = {f"train/good/{image.name}": image for image in reference.select_train(full_dir, max_train)}
  for image, kind in reference.select_test(full_dir, max_test):
    links[f"test/{kind}/{image.name}"] = image
    mask = reference.mask_path(full_dir, image, kind)
    if mask is not None:
      links[f"ground_truth/{kind}/{mask.name}"] = mask
  return links


def run_child(cmd: list[str], log_path: Path, threads: int) -> dict:
  """Run one side in its own process on the first `threads` CPUs; wall time and the child's own peak RSS."""
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  env = dict(os.environ, **{var: str(threads) for var in THREAD_VARS})
  if threads == 1:
    single = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {single}".strip()
  print("$", shlex.join(cmd), flush=True)
  start = time.perf_counter()
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the maximum over every child so far.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  return {
      "returncode": process.returncode,
      "wall_seconds": wall,
      "child_peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux reports KiB
      "child_cpu_seconds": usage.ru_utime + usage.ru_stime,
      "load_average_after": list(os.getloadavg()),
      "log": str(log_path),
      "command": shlex.join(cmd),
  }


def _tail(path: str, lines: int = 30) -> str:
  return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def run_ours(args, data_dir: Path, run_dir: Path) -> dict:
  _fresh_dir(run_dir)
  cmd = [
      sys.executable, "experiments/train.py", "--dataset=folder", f"--data_dir={data_dir}", f"--category={CATEGORY}",
      f"--backbone={args.backbone}", f"--image_size={args.image_size}", f"--fiber_batch={args.fiber_batch}",
      f"--epochs={args.epochs}", f"--lr={args.ours_lr or args.lr:g}", f"--batch_size={args.batch_size}",
      "--schedule=constant", f"--blur_sigma={args.blur_sigma:g}",
      "--rotation=0", f"--resample={args.resample}", f"--image_dtype={args.image_dtype}",
      "--nodrop_remainder", "--nodrop_last_batch", f"--seed={args.seed}", f"--workdir={run_dir}",
      "--compilation_cache=",  # a first run's figures: every program compiled in the timed run
      *_subset_flags(args),
      *shlex.split(args.ours_extra),
  ]
  child = run_child(cmd, run_dir / "log.txt", args.threads)
  metrics_file = run_dir / "metrics.json"
  if child["returncode"] != 0 or not metrics_file.exists():
    return {**child, "error": _tail(child["log"])}
  metrics = json.loads(metrics_file.read_text())
  flat = {k: metrics.get(k) for k in ACCURACY}
  flat.update(metrics.get("timing", {}))
  flat.update(rescore_ours(args, data_dir, run_dir))
  return {**flat, **child}


def rescore_ours(args, data_dir: Path, run_dir: Path) -> dict:
  """Our trained model's accuracy under each rule of RULES (untimed, after the run)."""
  cmd = [sys.executable, "experiments/studies/normalization_study.py", f"--workdir={run_dir}", "--dataset=folder",
         f"--data_dir={data_dir}", f"--category={CATEGORY}", f"--batch_size={args.batch_size}"]
  child = run_child(cmd, run_dir / "normalization_study.log", args.threads)
  study = run_dir / "normalization_study.json"
  if child["returncode"] != 0 or not study.exists():
    print(f"normalization study failed:\n{_tail(child['log'])}", file=sys.stderr, flush=True)
    return {}
  rules = json.loads(study.read_text())
  return {f"{metric}_{rule}": rules[rule][metric] for rule in RULES if rule in rules
          for metric in ("image_auroc", "pixel_auroc")}


def run_reference(args, category_dir: Path, run_dir: Path) -> dict:
  _fresh_dir(run_dir)
  out = run_dir / "result.json"
  cmd = [
      args.torch_python, str(REFERENCE_SCRIPT.relative_to(REPO)), f"--data_root={category_dir}",
      f"--backbone={args.backbone}", f"--image_size={args.image_size}", f"--fiber_batch={args.fiber_batch}",
      f"--epochs={args.epochs}", f"--lr={args.lr:g}", f"--batch_size={args.batch_size}", f"--seed={args.seed}",
      f"--threads={args.threads}", f"--out={out}", f"--blur_sigma={args.blur_sigma:g}", *_subset_flags(args),
  ]
  if args.hed_weights:
    cmd.append(f"--hed_weights={args.hed_weights}")
  child = run_child(cmd, run_dir / "log.txt", args.threads)
  if child["returncode"] != 0 or not out.exists():
    return {**child, "error": _tail(child["log"])}
  result = json.loads(out.read_text())
  result.update({f"{metric}_batch": result[metric] for metric in ("image_auroc", "pixel_auroc")})
  return {**result, **child}


def _subset_flags(args) -> list[str]:
  subset = []
  if args.max_train is not None:
    subset.append(f"--max_train={args.max_train}")
  if args.max_test is not None:
    subset.append(f"--max_test={args.max_test}")
  return subset


def summarise(rounds: list[dict]) -> dict:
  """Median over rounds of every number each side reported, ours/anomalib ratios of the medians, and the
  accuracy of every round (rounds with different seeds: the spread is the seed-to-seed noise)."""
  summary: dict[str, dict] = {}
  for side in ("ours", "anomalib"):
    runs = [r[side] for r in rounds if side in r and "error" not in r[side]]
    keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary[side] = {k: statistics.median(run[k] for run in runs if run.get(k) is not None) for k in sorted(keys)}
    summary[f"{side}_per_round"] = {k: [run[k] for run in runs if run.get(k) is not None]
                                    for k in ACCURACY + RESCORED if k in keys}
  ours, ref = summary["ours"], summary["anomalib"]
  summary["ratio_ours_over_anomalib"] = {
      k: ours[k] / ref[k] for k in RATIOS if ours.get(k) is not None and ref.get(k)
  }
  return summary


def format_spread(summary: dict) -> str:
  """Accuracy as mean +- sample standard deviation over rounds, each side, when there are several."""
  rows = []
  for key in ACCURACY + RESCORED:
    cells = []
    for side in ("ours", "anomalib"):
      values = summary.get(f"{side}_per_round", {}).get(key, [])
      spread = f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else ""
      cells.append(f"{statistics.mean(values):.4f}{spread} (n={len(values)})" if values else "-")
    rows.append((key, *cells))
  if not any(" +- " in cell for row in rows for cell in row[1:]):
    return ""
  rows.insert(0, ("accuracy over rounds", "ours", "anomalib"))
  return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
  """Rows as text columns: the first left-aligned, the others right-aligned, a rule under the header."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def format_table(summary: dict) -> str:
  ours, ref, ratio = summary["ours"], summary["anomalib"], summary["ratio_ours_over_anomalib"]
  rows = [("metric", "ours", "anomalib", "ours/anomalib")]
  for key in (*ACCURACY, *RESCORED, *SPEED, *MEMORY, "wall_seconds", "child_cpu_seconds"):
    a, b = ours.get(key), ref.get(key)
    if a is None and b is None:
      continue
    fmt = "{:.4f}" if key in ACCURACY + RESCORED else "{:.4g}"
    cell = lambda v: "-" if v is None else fmt.format(v)  # noqa: E731
    r = ratio.get(key)
    rows.append((key, cell(a), cell(b), "-" if r is None else f"{r:.2f}x"))
  return _aligned(rows)


def combine(paths: list[str]) -> int:
  """Summarises the rounds of several reports together, e.g. one run per seed."""
  rounds, settings = [], {}
  for path in paths:
    try:
      report = json.loads(Path(path).read_text())
      rounds += report["rounds"]
      setting = ({k: report["config"].get(k) for k in SETTINGS}, report["data"]["counts"])
    except (OSError, ValueError, KeyError) as e:
      print(f"error: {path} is not a report of this script ({e})", file=sys.stderr)
      return 2
    settings.setdefault(json.dumps(setting, sort_keys=True), []).append(path)
  if len(settings) > 1:
    print("error: these reports were made with different settings or data, only seeds may differ:\n"
          + "\n".join(f"  {paths}: {s}" for s, paths in settings.items()), file=sys.stderr)
    return 2
  summary = summarise(rounds)
  print(format_table(summary))
  print(format_spread(summary))
  return 0


def main(argv) -> int:
  if FLAGS.combine:
    return combine(argv[1:])
  # This script's flags (absl's own left out), as the settings the functions above read and the report keeps.
  args = types.SimpleNamespace(**{flag.name: flag.value for flag in FLAGS.get_flags_for_module(sys.argv[0])})
  workdir = Path(args.workdir).resolve()
  full_dir = workdir / "data" / "full" / CATEGORY
  split_counts = sync_links(full_dir, split_links(Path(args.source)))
  if args.max_train is None and args.max_test is None:
    data_dir, counts = full_dir.parent, split_counts
  else:
    subset_dir = workdir / "data" / f"train{args.max_train or 'all'}_test{args.max_test or 'all'}" / CATEGORY
    counts = sync_links(subset_dir, subset_links(full_dir, args.max_train, args.max_test))
    data_dir = subset_dir.parent
  print(f"data: {data_dir / CATEGORY} {counts}", flush=True)

  sides = [] if args.skip_ours else ["ours"]
  sides += [] if args.skip_reference else ["anomalib"]
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed] * args.rounds
  rounds = []
  for r, seed in enumerate(seeds):
    results, round_args = {}, types.SimpleNamespace(**{**vars(args), "seed": seed})
    for side in sides if r % 2 == 0 else sides[::-1]:
      run_dir = workdir / "runs" / f"{side}_round{r}"
      if side == "ours":
        results[side] = run_ours(round_args, data_dir, run_dir)
      else:
        results[side] = run_reference(round_args, data_dir / CATEGORY, run_dir)
      results[side]["seed"] = seed
      failure = results[side]
      if "error" in failure:
        print(f"{side} round {r} FAILED (rc={failure['returncode']}):\n{failure['error']}", file=sys.stderr, flush=True)
    rounds.append(results)

  summary = summarise(rounds)
  report = {
      # Both sides train on every image each epoch (a last short batch, as torch's DataLoader gives) and
      # let the last step of a layer take its leftover fibers.
      "config": {**vars(args), "last_batch": "trained"},
      "data": {"dir": str(data_dir / CATEGORY), "counts": counts, "full_split": split_counts},
      "rounds": rounds,
      "summary": summary,
  }
  out = Path(args.out) if args.out else workdir / "compare_anomalib.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(format_table(summary))
  print(format_spread(summary))
  print(f"written: {out}")
  return int(any("error" in side for r in rounds for side in r.values()))


def define_flags():
  flags.DEFINE_string("source", str(DEFAULT_SOURCE), "Magnetic Tile as published (MT_<class>/Imgs).")
  flags.DEFINE_string("workdir", "/tmp/cflow_jax_compare", "Data symlinks, run folders, logs.")
  flags.DEFINE_string("out", None, "JSON report. Default: <workdir>/compare_anomalib.json.")
  flags.DEFINE_integer("rounds", 1, "Rounds, the sides alternating which goes first.")
  flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "CPUs per run. Default: all.")
  flags.DEFINE_string("backbone", "vgg16_hed", "Encoder, both sides.")
  flags.DEFINE_integer("image_size", 256, "Input size, both sides.")
  flags.DEFINE_integer("fiber_batch", 64, "Fibers per step, both sides.")
  flags.DEFINE_integer("epochs", 1, "Epochs, both sides.")
  flags.DEFINE_float("lr", 1e-4, "Learning rate, both sides unless --ours_lr.")
  flags.DEFINE_float("ours_lr", None, "Our learning rate, if not --lr (e.g. 2e-4, the original's, against "
                     "anomalib's 1e-4).")
  flags.DEFINE_integer("batch_size", 32, "Images per batch, both sides.")
  flags.DEFINE_float("blur_sigma", Config().blur_sigma, "Gaussian blur of our maps (our default); anomalib's "
                     "are also rescored with it.")
  flags.DEFINE_integer("seed", 42, "Seed, both sides.")
  flags.DEFINE_enum("resample", "bilinear", ("bilinear", "lanczos"), "Our resizing filter; bilinear is what "
                    "the reference's torchvision Resize does.")
  flags.DEFINE_enum("image_dtype", "float32", ("float32", "uint8"), "Our resized images: float32 (unrounded) "
                    "is what the reference's Resize gives.")
  flags.DEFINE_string("seeds", None, "Comma-separated seeds, one round each (overrides --rounds, --seed).")
  flags.DEFINE_bool("combine", False, "Print the summary of the rounds of the reports named as arguments "
                    "together (runs nothing).")
  flags.DEFINE_integer("max_train", None, "The first N training images only (a subset both sides see).")
  flags.DEFINE_integer("max_test", None, "N test images only, evenly spaced over (class, name).")
  flags.DEFINE_string("torch_python", "/work/torchenv/bin/python", "The torch venv's interpreter.")
  flags.DEFINE_string("hed_weights", None, "HED .h5 for the reference. Default: its own cache.")
  flags.DEFINE_string("ours_extra", "", "Extra flags for experiments/train.py, one string.")
  flags.DEFINE_bool("skip_ours", False, "Run the reference side only.")
  flags.DEFINE_bool("skip_reference", False, "Run our side only.")


if __name__ == "__main__":
  define_flags()  # here, not on import: budget_study.py imports this file's functions
  app.run(main)
