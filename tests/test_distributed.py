"""Several processes as one JAX job, as on a GPU cluster or a TPU pod, proven on this machine: 1, 2 and 4
Python processes (`tests/distributed_worker.py`, one CPU device each) join over the loopback interface
with CPU collectives (gloo) and train the same tiny run.

Every process must end with the same decoders, equal to the one-process run's within `TOLERANCE`; each
hands JAX only its own slice of every image batch; only process 0 writes checkpoint data; a job started
again resumes.
"""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cflow_jax import checkpoint, encoders, weights

# Processes, whole training runs and lowerings for three platforms: the slow subset (pyproject.toml).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).parents[1]

# Decoder parameters (largest about 10) and normalisation maxima against the one-process run, absolute;
# measured: 1.6e-7 on two processes (the gradients' sums run in another order).
TOLERANCE = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def job(processes: int, folder, workdir: bool = True, epochs: int = 1) -> list:
  """Runs the worker as `processes` processes of one job; each one's saved outputs and stdout, by process
  index."""
  port = free_port()
  run = folder / "run" if workdir else "-"
  workers = [subprocess.Popen([sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(i),
                               str(processes), str(port), str(run), str(folder / f"out{i}.npz"), str(epochs)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  outputs = []
  for i, worker in enumerate(workers):
    stdout, stderr = worker.communicate(timeout=600)
    assert worker.returncode == 0, stderr[-4000:]
    outputs.append({**np.load(folder / f"out{i}.npz"), "stdout": stdout})
  return outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  return job(1, tmp_path_factory.mktemp("one"), workdir=False)[0]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """(outputs, folder) of the two-process job, whose workdir the resume test continues."""
  folder = tmp_path_factory.mktemp("two")
  return job(2, folder), folder


def check_trained_as_one(outputs, one_process, processes: int, folder):
  """Every process holds the same decoders, equal to one process's within `TOLERANCE`, each read its own
  slice of every batch, and only process 0 wrote checkpoint data."""
  params = sorted(k for k in one_process if k.startswith("param"))
  for out in outputs:
    assert "resuming" not in out["stdout"]
    for key in params + ["layer_max"]:
      np.testing.assert_array_equal(out[key], outputs[0][key])
      np.testing.assert_allclose(out[key], one_process[key], rtol=0, atol=TOLERANCE)
    # Two training batches and two normalisation batches of 8 images: this process's 8 / processes rows.
    assert out["reads"].tolist() == [[8 // processes, 8]] * 4
  assert max(np.abs(one_process[k]).max() for k in params) > 1000 * TOLERANCE  # a tolerance that tells
  state = folder / "run" / "checkpoints" / "1" / "state"
  assert (state / "ocdbt.process_0").is_dir()
  assert not [p.name for p in state.glob("ocdbt.process_*") if p.name != "ocdbt.process_0"]


def test_two_processes_train_as_one_each_reading_its_slice_and_only_process_0_writes(two_processes,
                                                                                     one_process):
  outputs, folder = two_processes
  check_trained_as_one(outputs, one_process, 2, folder)


def test_four_processes_train_as_one_each_reading_its_slice_and_only_process_0_writes(one_process, tmp_path):
  check_trained_as_one(job(4, tmp_path), one_process, 4, tmp_path)


def test_a_run_restarted_on_every_process_resumes_from_its_checkpoint(two_processes):
  """The two-process job stopped after epoch 1 (as if killed after its checkpoint); started again on every
  process with a second epoch, each process restores that checkpoint and they train on together."""
  first, folder = two_processes
  second = job(2, folder, epochs=2)
  params = [k for k in first[0] if k.startswith("param")]
  for out in second:
    assert f"resuming from the checkpoint after epoch 1 in {folder / 'run'}" in out["stdout"]
    for key in params:
      np.testing.assert_array_equal(out[key], second[0][key])
  assert any(not np.array_equal(first[0][k], second[0][k]) for k in params)  # the second epoch trained
  assert checkpoint.read_meta(folder / "run")["epoch"] == 2  # the finished second epoch, saved


def train_processes(*per_process_flags, script="train.py", stdout=False) -> list:
  """experiments/train.py (or `script`) as one process per element of `per_process_flags` of a job on this
  machine; each one's (return code, stderr), or (return code, stderr, stdout)."""
  port, count = free_port(), len(per_process_flags)
  workers = [subprocess.Popen([sys.executable, str(REPO / "experiments" / script), "--dataset=demo",
                               "--image_size=64", "--epochs=1", "--max_train=8", "--cpu_devices=1", "--distributed",
                               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                               f"--process_id={i}", *flags], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, flags in enumerate(per_process_flags)]
  try:  # a guard against a hung job, generous: under `-n 2` another worker's tests share the CPU
    outputs = [w.communicate(timeout=900) for w in workers]
  finally:
    for w in workers:
      w.kill()  # after a timeout, no process of the job is left running (a finished one is not signalled)
  return [(w.returncode, err, out) if stdout else (w.returncode, err) for w, (out, err) in zip(workers, outputs)]


def assert_one_line(returncode, stderr, *words):
  assert returncode == 1, stderr[-4000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-4000:]
  for word in words:
    assert word in lines[0]


def test_a_coordinator_that_cannot_be_reached_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, str(REPO / "experiments" / "train.py"), "--dataset=demo",
                           "--distributed", f"--coordinator_address=127.0.0.1:{free_port()}",
                           "--num_processes=2", "--process_id=1", "--coordinator_timeout=2",
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert_one_line(result.returncode, result.stderr, "could not reach the coordinator", "within 2 s")


def test_processes_that_disagree_on_the_config_or_a_batch_that_does_not_divide_are_one_line(tmp_path):
  for returncode, stderr in train_processes([f"--workdir={tmp_path}", "--seed=1"],
                                            [f"--workdir={tmp_path}", "--seed=2"]):
    assert_one_line(returncode, stderr, "disagree on the config", "process 1")
  for returncode, stderr in train_processes([f"--workdir={tmp_path}", "--batch_size=3"],
                                            [f"--workdir={tmp_path}", "--batch_size=3"]):
    assert_one_line(returncode, stderr, "--batch_size=3", "2 devices")
  assert not (tmp_path / "checkpoints").exists()


def test_benchmark_on_two_processes_trains_each_category_data_parallel_and_reports_once(tmp_path):
  """benchmark.py on a job of two processes: the categories one after another, each data parallel over
  both processes (as train.py), its metrics those of a one-process run, the table written and announced
  by process 0 alone. A small model (ResNet-18 with random weights from a file, one coupling block) keeps
  the three processes' compilations short."""
  module, _ = encoders.create_encoder("resnet18")
  weights.save_variables(tmp_path / "resnet18", encoders.init_variables(module, jax.random.key(0), 64))
  flags = ("--categories=brick,grass", "--max_test=8", "--num_pictures=0", "--backbone=resnet18",
           f"--weights={tmp_path / 'resnet18'}", "--coupling_blocks=1")
  results = train_processes(*[(f"--workdir={tmp_path / 'two'}", *flags)] * 2, script="benchmark.py",
                            stdout=True)
  for returncode, stderr, _ in results:
    assert returncode == 0, stderr[-4000:]
  assert "benchmark_resnet18.md" in results[0][2] and "benchmark_resnet18.md" not in results[1][2]
  one = subprocess.run([sys.executable, str(REPO / "experiments" / "benchmark.py"), "--dataset=demo",
                        "--image_size=64", "--epochs=1", "--max_train=8", "--cpu_devices=1",
                        f"--workdir={tmp_path / 'one'}", *flags], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]
  for category in ("brick", "grass"):
    two_metrics, one_metrics = (json.loads((tmp_path / side / category / "resnet18" / "metrics.json").read_text())
                                for side in ("two", "one"))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
      assert two_metrics[key] == pytest.approx(one_metrics[key], abs=1e-3), (category, key)
  assert (tmp_path / "two" / "benchmark_resnet18.md").read_text().count("brick") >= 1
