"""Several processes as one JAX job, as on a GPU cluster or a TPU pod, proven on this machine: 1, 2 and 4
Python processes (`tests/distributed_worker.py`, one CPU device each) join over the loopback interface
with CPU collectives (gloo) and train the same tiny run.

Every process must end with the same decoders, equal to the one-process run's within `TOLERANCE`; each
hands JAX only its own slice of every image batch; only process 0 writes checkpoint data.
"""

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).parents[1]

# Decoder parameters (largest about 10) and normalisation maxima against the one-process run, absolute;
# measured: 1.6e-7 on two processes (the gradients' sums run in another order).
TOLERANCE = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def job(processes: int, folder, workdir: bool = True) -> list:
  """Runs the worker as `processes` processes of one job; each one's saved outputs, by process index."""
  port = free_port()
  run = folder / "run" if workdir else "-"
  workers = [subprocess.Popen([sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(i),
                               str(processes), str(port), str(run), str(folder / f"out{i}.npz")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  for worker in workers:
    _, stderr = worker.communicate(timeout=600)
    assert worker.returncode == 0, stderr[-4000:]
  return [dict(np.load(folder / f"out{i}.npz")) for i in range(processes)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  return job(1, tmp_path_factory.mktemp("one"), workdir=False)[0]


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_train_as_one_each_reading_its_slice_and_only_process_0_writes(processes, one_process,
                                                                                  tmp_path):
  outputs = job(processes, tmp_path)
  params = sorted(k for k in one_process if k.startswith("param"))
  for out in outputs:
    for key in params + ["layer_max"]:
      np.testing.assert_array_equal(out[key], outputs[0][key])  # every process holds the same decoders
      np.testing.assert_allclose(out[key], one_process[key], rtol=0, atol=TOLERANCE)
    # Two training batches and two normalisation batches of 8 images: this process's 8 / processes rows.
    assert out["reads"].tolist() == [[8 // processes, 8]] * 4
  assert max(np.abs(one_process[k]).max() for k in params) > 1000 * TOLERANCE  # a tolerance that tells
  state = tmp_path / "run" / "checkpoints" / "1" / "state"
  assert (state / "ocdbt.process_0").is_dir()
  assert not [p.name for p in state.glob("ocdbt.process_*") if p.name != "ocdbt.process_0"]
