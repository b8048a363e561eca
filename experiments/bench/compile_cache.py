"""What the persistent compilation cache saves: the demo's training run and a prediction, cold and warm.

    python experiments/bench/compile_cache.py --repeats=2

Each repeat starts from an empty cache directory: train.py --dataset=demo (cold: every program compiled,
then stored), the same run again into another workdir (warm: the programs loaded), then predict.py on a
few images twice, cold and warm (a cache of its own). Runs alternate, so a machine whose speed drifts affects
both sides alike; the tables show wall-clock seconds of each whole process and the run's training time.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 2, "Cold and warm pairs of runs.")
flags.DEFINE_integer("images", 4, "Images predict.py scores.")
REPO = pathlib.Path(__file__).resolve().parents[2]


def timed(script: str, *args) -> float:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  began = time.perf_counter()
  result = subprocess.run([sys.executable, str(REPO / "experiments" / script), *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
  return time.perf_counter() - began


def main(_):
  args = FLAGS
  rows = {key: [] for key in ("train_cold", "train_warm", "train_seconds_cold", "train_seconds_warm",
                              "predict_cold", "predict_warm")}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    rng = np.random.default_rng(0)
    images = [tmp / f"image{i}.png" for i in range(args.images)]
    for path in images:
      Image.fromarray(rng.integers(0, 256, (128, 128, 3), np.uint8)).save(path)
    for r in range(args.repeats):
      cache = tmp / f"cache{r}"
      for side in ("cold", "warm"):
        workdir = tmp / f"run{r}_{side}"
        rows[f"train_{side}"].append(timed("train.py", "--dataset=demo", f"--workdir={workdir}",
                                           f"--compilation_cache={cache}"))
        timing = json.loads((workdir / "metrics.json").read_text())["timing"]
        rows[f"train_seconds_{side}"].append(timing["train_seconds"])
      for side in ("cold", "warm"):  # a cache of its own: its batch shapes are not training's
        rows[f"predict_{side}"].append(timed("predict.py", f"--workdir={tmp / f'run{r}_cold'}",
                                             f"--out_dir={tmp / f'out{r}_{side}'}",
                                             f"--compilation_cache={tmp / f'predict_cache{r}'}", *images))
      print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()), flush=True)
  median = {k: statistics.median(v) for k, v in rows.items()}
  print(f"\n{'median seconds':<32}{'cold':>8}{'warm':>8}{'warm/cold':>11}")
  for label, key in (("demo training run (process)", "train"), ("  of which training", "train_seconds"),
                     (f"predict.py, {args.images} images (process)", "predict")):
    cold, warm = median[f"{key}_cold"], median[f"{key}_warm"]
    print(f"{label:<32}{cold:8.1f}{warm:8.1f}{warm / cold:11.2f}")


if __name__ == "__main__":
  app.run(main)
