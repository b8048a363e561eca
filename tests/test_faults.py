"""Faults at every stage of train.py's work: training, each checkpoint's write and switch, the final save,
the normalisation pass, scoring and the report; a damaged checkpoint; a full or read-only disk; Ctrl-C.

A fault is struck in-process, as an exception raised at its point, deterministically: on disk it leaves
what a kill there leaves (orbax's temporary folders; nothing of ours cleans up).
"""

import errno
import json
import logging
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import cflow_jax as cf
from cflow_jax import api, checkpoint, report, train
from cflow_jax.cli import common, config_flags
from orbax.checkpoint._src.path import async_path

# Processes, whole training runs and lowerings for three platforms: the slow subset (pyproject.toml).
pytestmark = pytest.mark.slow

# A small demo run (HED VGG16 at 64 px, two coupling blocks: short compilations and steps for its dozen
# runs) of two epochs: a resume from the first epoch's checkpoint is part of it.
CONFIG = cf.Config(**{**config_flags.DEMO_DEFAULTS, "image_size": 64, "meta_epochs": 2, "coupling_blocks": 2})


class Killed(Exception):
  """The fault: raised at a point, it ends the run there."""


@pytest.fixture(scope="module")
def splits():
  train_set = cf.data.load("demo", "train", "brick").subset(range(8))
  test_set = cf.data.load("demo", "test", "brick")
  test_set = test_set.subset(np.linspace(0, len(test_set) - 1, 8).round())
  return api.resized(CONFIG, train_set), api.resized(CONFIG, test_set)


def _run(splits, workdir) -> dict:
  """train.py's work in `workdir`; metrics.json without its timings."""
  common.train_and_evaluate(CONFIG, *splits, workdir, num_pictures=0)
  document = json.loads((workdir / "metrics.json").read_text())
  document.pop("timing")
  return document


@pytest.fixture(scope="module")
def uninterrupted(splits, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return _run(splits, workdir), workdir


def _strike_at(monkeypatch, owner, name, nth, when=lambda *args, **kwargs: True):
  """Makes owner.name raise Killed at its nth call for which `when` holds."""
  original, calls = getattr(owner, name), [0]

  def faulty(*args, **kwargs):
    if when(*args, **kwargs):
      calls[0] += 1
      if calls[0] == nth:
        raise Killed(f"{name}, call {nth}")
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, faulty)


def _during_save(monkeypatch, nth):
  """Killed half-way through the nth checkpoint save, its arrays written and its commit file not."""
  saves = [0]
  original_save = checkpoint.save

  def counted(*args, **kwargs):
    saves[0] += 1
    return original_save(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", counted)
  _strike_at(monkeypatch, async_path, "write_text", 1, lambda *args, **kwargs: saves[0] == nth)


def _at_switch(monkeypatch, nth):
  """Killed at the nth checkpoint's switch into place (orbax's rename of the complete folder)."""
  _strike_at(monkeypatch, async_path, "rename", nth, lambda src, dst: dst.parent.name == "checkpoints")


# In the order a run reaches them; `nth` counts within one run.
STAGES = {
    "epoch 1 checkpoint, mid-write": lambda m: _during_save(m, 1),
    "epoch 1 checkpoint, switch": lambda m: _at_switch(m, 1),
    "training, second epoch": lambda m: _strike_at(m, train, "train_batch", 2),
    "epoch 2 checkpoint, mid-write": lambda m: _during_save(m, 1),
    "epoch 2 checkpoint, switch": lambda m: _at_switch(m, 1),
    "normalisation pass": lambda m: _strike_at(m, train, "fit_normalization", 1),
    "final save, mid-write": lambda m: _during_save(m, 1),
    "final save, switch": lambda m: _at_switch(m, 1),
    "scoring": lambda m: _strike_at(m, api, "compiled_maps", 1),
    "report": lambda m: _strike_at(m, report, "write_metrics", 1),
}


def _on_disk(workdir) -> tuple[int, bool]:
  """(epoch, normalised) of the newest checkpoint; (0, False) without one."""
  if checkpoint.latest_step(workdir) is None:
    return 0, False
  meta = checkpoint.read_meta(workdir)
  return meta["epoch"], meta["normalized"]


def test_a_run_killed_at_every_stage_in_turn_ends_as_the_uninterrupted_one(splits, uninterrupted, tmp_path):
  """One workdir, struck at each stage in turn: each rerun resumes from what the one before left and is
  struck at the next stage. No fault may leave less on disk than before it (the final save's switch
  was the gap: its last epoch's checkpoint was deleted before the new one was written), and the last
  rerun ends with the metrics of the run never interrupted, bit for bit."""
  workdir, progress = tmp_path / "run", (0, False)
  for stage, strike in STAGES.items():
    with pytest.MonkeyPatch.context() as monkeypatch:
      strike(monkeypatch)
      with pytest.raises(Killed):
        _run(splits, workdir)
        pytest.fail(f"{stage}: the fault was not reached")
    assert _on_disk(workdir) >= progress, stage
    progress = _on_disk(workdir)
  assert progress == (CONFIG.epochs, True)
  assert _run(splits, workdir) == uninterrupted[0]


def test_a_damaged_finished_checkpoint_is_rebuilt_from_the_last_epochs(splits, uninterrupted, tmp_path,
                                                                        capsys):
  """Re-evaluating a finished run whose newest step is truncated: the step is named in one line and the
  run is finished again from the last epoch's checkpoint, not trained from scratch."""
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[1], workdir)
  latest = checkpoint.latest_step(workdir)
  metadata = workdir / "checkpoints" / str(latest) / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:100])
  assert _run(splits, workdir) == uninterrupted[0]
  out = capsys.readouterr().out
  assert f"checkpoint step {latest} in {workdir / 'checkpoints'} is damaged" in out
  assert "resuming from the checkpoint after epoch 2" in out


def _exit_of(main, capsys) -> tuple[int, str]:
  """(exit code, last line on stderr) of `main` run as the scripts run theirs."""
  with pytest.raises(SystemExit) as exit:
    common.exit_on_user_error(main)([])
  return exit.value.code, capsys.readouterr().err.splitlines()[-1]


def test_a_full_disk_in_a_checkpoint_save_is_one_line_with_the_space_needed(splits, tmp_path, monkeypatch,
                                                                           capsys, caplog):
  """Orbax's threads logged the error and raised it again, in some 1,000 lines; now it is one line."""
  def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(async_path, "write_text", full)
  code, line = _exit_of(lambda argv: _run(splits, tmp_path / "run"), capsys)
  assert code == 1
  assert re.fullmatch(rf"error: no space left on device writing a checkpoint into {tmp_path / 'run'}/checkpoints: "
                      r"it needs about [\d,]+\.\d MB \(.*estimate\).*", line), line
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("error, code, line", [
    (KeyboardInterrupt(), 130, "interrupted: run the same command again to go on (train.py resumes from its last "
                               "checkpoint)"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/metrics.json"), 1,
     "error: no space left on device writing /w/metrics.json: free space there or choose another --workdir "
     "or --out_dir"),
    (OSError(errno.EROFS, "Read-only file system", "/w/pro.png"), 1,
     "error: read-only file system writing /w/pro.png: free space there or choose another --workdir or "
     "--out_dir"),
])
def test_ctrl_c_and_a_full_or_read_only_disk_end_the_scripts_in_one_line(error, code, line, capsys):
  def main(argv):
    raise error
  assert _exit_of(main, capsys) == (code, line)


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder nobody may write into: a read-only tmpfs for root (whom permissions do not stop)."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  if os.geteuid() != 0:
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
    return
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"running as root without permission to mount a read-only folder: {mount.stderr.strip()}")
  yield folder
  subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_workdir_is_refused_before_training(splits, read_only_dir, monkeypatch):
  monkeypatch.setattr(train, "train_batch", lambda *args: pytest.fail("training started"))
  with pytest.raises(cf.UserError, match=rf"cannot write into the workdir {read_only_dir / 'run'} "
                                         r"\((Read-only file system|Permission denied)\)"):
    _run(splits, read_only_dir / "run")
