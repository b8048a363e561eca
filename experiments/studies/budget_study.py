"""Our defaults against anomalib 2.7's Cflow at the training budgets people run (1, 2 and 4 epochs).

Both sides train on the same images with the same HED VGG16 weights, input size and batch size, each in
its own subprocess on the same CPUs, one run after the other. Ours runs experiments/train.py once per
budget (our schedule depends on the run's length) with the defaults, or with one default changed
(`--variants`, the one-epoch ablations); anomalib runs once for the largest budget and is scored after
each budget's epoch (its learning rate is constant, so that is the same model a shorter run gives:
experiments/reference/anomalib_cflow.py --score_epochs). Every metric of both sides comes from the same
code, `cflow_jax.metrics`, on each side's own maps (anomalib's normalised per batch, as its predict loop
gives them; ours as our defaults give them); wall-clock is each side's training loop.

Data:
  magnetic_tile  the project's split of Magnetic Tile (compare_anomalib.py), cut to --max_train training
                 images (the first by name) and --max_test test images (evenly spaced over type and name)
  demo           the demo textures written as an MVTec-layout folder of PNGs (48 training crops, 36 test)

Each run appends one JSON row to --out (default experiments/studies/results/budget_study.jsonl, kept in the
repository); a (dataset, side, variant, epochs, seed) already there is not run again. --table prints the
mean over seeds per budget and variant from that file.

  .venv/bin/python experiments/studies/budget_study.py --dataset=demo --seeds=42,7 --reference
  .venv/bin/python experiments/studies/budget_study.py --dataset=magnetic_tile --epochs=1 \
      --variants=fiber_batch=256,rotation=0 --seeds=42,7
  .venv/bin/python experiments/studies/budget_study.py --table
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from cflow_jax import metrics, weights
from cflow_jax.data import demo

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "experiments" / "studies" / "results" / "budget_study.jsonl"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1")
# Settings both sides share; each dataset's image size is its usual one (the demo's crops are 128 px).
SHARED = {"magnetic_tile": dict(image_size=256, batch_size=32), "demo": dict(image_size=128, batch_size=12)}

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "magnetic_tile", sorted(SHARED), "Data (see above).")
flags.DEFINE_string("category", "brick", "Demo texture.")
flags.DEFINE_string("source", str(REPO.parent / "shared" / "data" / "magnetic_tile"), "Magnetic Tile as "
                    "published.")
flags.DEFINE_integer("max_train", 128, "Training images.")
flags.DEFINE_integer("max_test", None, "Test images. Default: all.")
flags.DEFINE_string("epochs", "1,2,4", "Comma-separated budgets.")
flags.DEFINE_string("seeds", "42,7", "Comma-separated seeds.")
flags.DEFINE_string("variants", "default", "Comma-separated runs of ours: 'default', or train.py flags joined "
                    "by '+' (e.g. fiber_batch=256+rotation=0).")
flags.DEFINE_string("tag", "defaults", "Names the state of our defaults these runs use (part of what "
                    "identifies a run in --out).")
flags.DEFINE_bool("reference", False, "Also run anomalib.")
flags.DEFINE_bool("ours", True, "Run ours (--noours --reference: anomalib alone, e.g. beside a run of ours "
                  "pinned to the other CPU with taskset).")
flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "CPUs per run.")
flags.DEFINE_integer("reference_threads", None, "CPUs and threads of anomalib's run (default --threads): 1 "
                     "keeps its many small OpenMP regions from stalling when other work shares the CPUs.")
flags.DEFINE_string("torch_python", "/work/torchenv/bin/python", "The torch venv's interpreter.")
flags.DEFINE_string("workdir", "/tmp/budget_study", "Data, run folders, logs.")
flags.DEFINE_string("out", str(OUT), "The JSON rows, one per run.")
flags.DEFINE_bool("table", False, "Print the tables of --out (--dataset, --tag if given on the command line) "
                  "and exit.")


def _compare_module():
  spec = importlib.util.spec_from_file_location("compare_anomalib", Path(__file__).with_name("compare_anomalib.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def prepare_data(args, root: Path) -> Path:
  """The dataset as an MVTec-layout folder `root/<category>` that both sides read; returns that folder."""
  if args.dataset == "magnetic_tile":
    compare = _compare_module()
    full = root / "full" / compare.CATEGORY
    compare.sync_links(full, compare.split_links(Path(args.source)))
    category = root / "subset" / compare.CATEGORY
    compare.sync_links(category, compare.subset_links(full, args.max_train, args.max_test))
    return category
  category = root / "demo" / args.category
  if not (category / "done").exists():
    for split in ("train", "test"):
      for i, (defect, image, mask) in enumerate(demo.examples(args.category, split)):
        path = category / split / defect / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        if defect != "good":
          gt = category / "ground_truth" / defect / f"{i:03d}_mask.png"
          gt.parent.mkdir(parents=True, exist_ok=True)
          Image.fromarray(mask * 255).save(gt)
    (category / "done").write_text("")
  return category


def run(cmd: list[str], log: Path, threads: int) -> float:
  """Runs one side on the first `threads` CPUs this process may use (`taskset` picks which) with that many
  threads; its wall seconds."""
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  print("$", shlex.join(cmd), flush=True)
  began = time.perf_counter()
  with open(log, "w") as out:
    code = subprocess.call(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                           preexec_fn=lambda: os.sched_setaffinity(0, cpus))
  if code:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise SystemExit(f"failed ({code}), log {log}:\n{tail}")
  return time.perf_counter() - began


def ours(args, data: Path, run_dir: Path, variant: str, epochs: int, seed: int) -> dict:
  shared = SHARED[args.dataset]
  flags = [f"--{kv}" for kv in variant.split("+")] if variant != "default" else []
  cmd = [sys.executable, "experiments/train.py", "--dataset=folder", f"--data_dir={data.parent}",
         f"--category={data.name}", "--backbone=vgg16_hed", f"--image_size={shared['image_size']}",
         f"--batch_size={shared['batch_size']}", f"--epochs={epochs}", f"--seed={seed}",
         f"--workdir={run_dir}", "--num_pictures=0", "--compilation_cache=", *flags]
  run_dir.mkdir(parents=True, exist_ok=True)
  wall = run(cmd, run_dir / "log.txt", args.threads)
  document = json.loads((run_dir / "metrics.json").read_text())
  timing = document["timing"]
  return {**{m: document[m] for m in METRICS}, "train_seconds": timing["train_seconds"],
          "normalization_seconds": timing.get("normalization_seconds"), "wall_seconds": wall,
          "config": document["config"]}


def reference(args, data: Path, run_dir: Path, budgets: list[int], seed: int) -> list[dict]:
  """anomalib trained for the largest budget, scored after each; one row per budget."""
  shared = SHARED[args.dataset]
  run_dir.mkdir(parents=True, exist_ok=True)
  cmd = [args.torch_python, "experiments/reference/anomalib_cflow.py", f"--data_root={data}",
         "--backbone=vgg16_hed", f"--image_size={shared['image_size']}", "--fiber_batch=64",
         f"--epochs={max(budgets)}", "--lr=1e-4", f"--batch_size={shared['batch_size']}", f"--seed={seed}",
         f"--threads={args.reference_threads or args.threads}", f"--score_epochs={','.join(map(str, budgets))}",
         f"--maps_out={run_dir}", f"--out={run_dir / 'result.json'}",
         f"--hed_weights={weights.hed_weights_path()}"]
  wall = run(cmd, run_dir / "log.txt", args.reference_threads or args.threads)
  test = np.load(run_dir / "test.npz")
  rows = []
  for epochs in budgets:
    scored = np.load(run_dir / f"epoch{epochs}.npz")
    found = metrics.evaluate(scored["scores"], test["labels"], scored["maps"].astype(np.float32), test["masks"])
    row = {**{m: found[m] for m in METRICS}, "epochs": epochs,
           "train_seconds": float(scored["train_seconds"]), "wall_seconds": wall}
    # The same model under the whole-test-set rule, and under its own per-batch rule on a shuffled order.
    for rule in ("test_set", "batch_shuffled"):
      if f"maps_{rule}" in scored:
        maps = scored[f"maps_{rule}"].astype(np.float32)
        found = metrics.evaluate(maps.reshape(len(maps), -1).max(axis=1), test["labels"], maps, test["masks"])
        row.update({f"{m}_{rule}": found[m] for m in METRICS})
    rows.append(row)
  return rows


def _done(out: Path) -> set:
  if not out.exists():
    return set()
  rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  return {(r["dataset"], r["tag"], r["side"], r["variant"], r["epochs"], r["seed"]) for r in rows}


def _append(out: Path, row: dict):
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "config"}, flush=True)


def _machine() -> dict:
  model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
  flags = Path("/proc/cpuinfo").read_text()
  kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
  return {"cpu": f"{model} ({kind}, {len(os.sched_getaffinity(0))} cores)", "commit": commit}


def study(args):
  root = Path(args.workdir)
  data = prepare_data(args, root)
  out, machine = Path(args.out), _machine()
  budgets = [int(e) for e in args.epochs.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  variants = args.variants.split(",")
  base = {"dataset": args.dataset, "tag": args.tag, "max_train": args.max_train, "max_test": args.max_test,
          **machine}
  for seed in seeds:
    if args.reference:
      if any((args.dataset, args.tag, "anomalib", "anomalib", e, seed) not in _done(out) for e in budgets):
        for row in reference(args, data, root / "runs" / f"anomalib_s{seed}", budgets, seed):
          _append(out, {**base, "side": "anomalib", "variant": "anomalib", "seed": seed, **row})
    for variant in variants if args.ours else ():
      for epochs in budgets:
        if (args.dataset, args.tag, "ours", variant, epochs, seed) in _done(out):
          continue
        run_dir = root / "runs" / f"ours_{args.tag}_{variant}_e{epochs}_s{seed}"
        if run_dir.exists():
          shutil.rmtree(run_dir)
        row = ours(args, data, run_dir, variant, epochs, seed)
        _append(out, {**base, "side": "ours", "variant": variant, "epochs": epochs, "seed": seed, **row})


def table(out: Path, dataset: str | None = None, tag: str | None = None) -> str:
  """Mean over seeds per (dataset, epochs, run): accuracy in percent and training seconds. anomalib's runs
  give up to three lines: its own maps (normalised per batch of the test folder, in file order), and the
  same log-likelihoods with maxima over the whole test set and per batch of a shuffled test order, where
  recorded."""
  rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  # anomalib's runs do not depend on our tag: one row per (dataset, epochs, seed), the last recorded
  # (a rerun of the same seed gives the same model, and may add the whole-test-set figures).
  reference = {(r["dataset"], r["epochs"], r["seed"], r["max_train"], r["max_test"]): r
               for r in rows if r["side"] == "anomalib"}
  rows = [r for r in rows if r["side"] != "anomalib"] + list(reference.values())
  groups: dict = {}
  for r in rows:
    if (dataset is None or r["dataset"] == dataset) and (tag is None or r["tag"] == tag or r["side"] == "anomalib"):
      if r["side"] == "anomalib":
        groups.setdefault((r["dataset"], r["epochs"], "anomalib, its maps"), []).append((r, ""))
        if "image_auroc_test_set" in r:
          groups.setdefault((r["dataset"], r["epochs"], "anomalib, test-set maxima"), []).append((r, "_test_set"))
        if "image_auroc_batch_shuffled" in r:
          groups.setdefault((r["dataset"], r["epochs"], "anomalib, its maps, test order shuffled"),
                            []).append((r, "_batch_shuffled"))
      else:
        name = "ours" if r["variant"] == "default" else f"ours, {r['variant']}"
        groups.setdefault((r["dataset"], r["epochs"], f"{name} ({r['tag']})"), []).append((r, ""))
  lines = []
  for (ds, epochs, name), group in sorted(groups.items()):
    mean = lambda k: statistics.mean(100 * g[k + suffix] for g, suffix in group)
    seconds = statistics.mean(g["train_seconds"] for g, _ in group)
    seeds = ",".join(str(g["seed"]) for g, _ in group)
    lines.append(f"| {ds} | {epochs} | {name} | {mean('image_auroc'):.2f} | {mean('pixel_auroc'):.2f} | "
                 f"{mean('aupro'):.2f} | {mean('image_f1'):.2f} | {seconds:.0f} | {seeds} |")
  header = ("| dataset | epochs | run | image AUROC | pixel AUROC | AUPRO | image F1 | train s | seeds |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---|")
  return header + "\n" + "\n".join(lines)


def main(_):
  if FLAGS.table:
    print(table(Path(FLAGS.out), FLAGS.dataset if FLAGS["dataset"].present else None,
                FLAGS.tag if FLAGS["tag"].present else None))
  else:
    study(FLAGS)


if __name__ == "__main__":
  app.run(main)
