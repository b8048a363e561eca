"""Orbax checkpoints of a run: decoders, optimiser states, progress, config, encoder identity, normalisation.

Orbax writes each checkpoint into a temporary folder and renames it only once complete, so a process killed
mid-save leaves the previous checkpoint as the latest one that restores. Steps number the saves, not the
epochs (the epoch is in the meta): the finished run, with its normalisation, is one more step after its last
epoch's, written beside it, so no moment of a run leaves less than its last completed epoch on disk.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import pathlib
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from cflow_jax.config import Config
from cflow_jax.errors import UserError

# Fields that only change how scores are normalised, not what was trained: free to differ on resume.
_SCORING_ONLY = ("normalization", "normalization_images", "cache_features", "blur_sigma", "score_dtype")
# Fields that may grow on resume: training longer continues the same run.
_EXTENDABLE = ("meta_epochs",)


def _manager(workdir) -> ocp.CheckpointManager:
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options)


class DamagedCheckpoint(UserError):
  """A checkpoint step that cannot be read back (a truncated, missing or garbled file)."""

  def __init__(self, workdir, step: int, error: Exception):
    reason = str(error).splitlines()[0][:160] if str(error) else ""
    super().__init__(f"checkpoint step {step} in {pathlib.Path(workdir) / 'checkpoints'} is damaged "
                     f"({type(error).__name__}: {reason})")
    self.step = step


# Where a write fails because of the disk, not of the program: reported in one line, not a traceback.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def latest_step(workdir) -> int | None:
  found = steps(workdir)
  return found[0] if found else None


def steps(workdir) -> list[int]:
  """The workdir's complete checkpoint steps, newest first."""
  if not (pathlib.Path(workdir) / "checkpoints").exists():
    return []
  with _manager(workdir) as manager:
    return sorted(manager.all_steps(), reverse=True)


def newest_intact(workdir, read, log=print):
  """`read(step)` of the newest step that reads back whole; a damaged newer step is reported with `log`
  and skipped (it stays on disk until newer saves supersede it)."""
  for step in steps(workdir):
    try:
      return read(step)
    except DamagedCheckpoint as error:
      log(f"{error}: skipping it")
  raise UserError(f"no intact checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: move the folder away "
                  "to train from scratch")


def save(workdir, state, meta: dict) -> int:
  """Saves `state` (a pytree of arrays) and `meta` (JSON: config, encoder identity, progress) as the step
  after the latest one, which stays (orbax keeps the two newest); returns the step.

  On several processes every array is replicated over all of them and saved from host copies: orbax
  then writes from process 0 alone (its device-array path failed on arrays spanning processes' CPUs)."""
  if jax.process_count() > 1:
    state = jax.device_get(state)
  with _manager(workdir) as manager:
    step = (manager.latest_step() or 0) + 1
    with _disk_errors(manager.directory, state), _quiet_orbax_threads():
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
      manager.wait_until_finished()
  return step


def check_writable(workdir):
  """A UserError now, before any training, if files cannot be created in `workdir` (made if missing)."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise UserError(f"cannot write into the workdir {path} ({error.strerror}): choose another --workdir "
                    "or make it writable") from None


def disk_error(error: BaseException) -> str | None:
  """What `error` says of the disk (`DISK_ERRORS`), looking through its causes: tensorstore raises
  ValueError with the OS error's code in its text."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
      return DISK_ERRORS[error.errno]
    for code, words in DISK_ERRORS.items():
      if f"os_error_code='{code}'" in str(error):
        return words
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def _disk_errors(directory, state):
  try:
    yield
  except Exception as error:
    words = disk_error(error)
    if words is None:
      raise
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 2**20
    raise UserError(f"{words} writing a checkpoint into {directory}: it needs about {size:,.1f} MB (the "
                    "size of the state's arrays, an estimate); free space there or choose another "
                    "--workdir, then run again to resume from the last checkpoint") from None


@contextlib.contextmanager
def _quiet_orbax_threads():
  """Silences what orbax's threads print when a save or a restore fails, which the caller reports once:
  each writer thread logs the error that `save` then raises, and tensorstore's pending reads or writes,
  failing one by one, each try to wake orbax's event loop, closed by then, and Python prints each such
  RuntimeError (some 50 tracebacks on a full disk); on a truncated data file, orbax's other pending reads,
  closed when the first fails, each print their own error. The log filter goes with the call; after a
  failure, the hook stays, as the pending operations go on failing after the call has given up."""
  logged = lambda record: "_SignalingThread.run() raised" not in record.getMessage()
  logger, previous = logging.getLogger("absl"), sys.unraisablehook

  def unraisable(event):
    error = event.exc_value
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    # One of orbax's pending reads, closed (GeneratorExit) after another failed:
    source = getattr(getattr(event.object, "cr_code", None), "co_filename", "")
    closed_read = isinstance(error.__cause__, GeneratorExit) and "orbax" in source
    if not (closed_loop or closed_read):
      previous(event)

  logger.addFilter(logged)
  sys.unraisablehook = unraisable
  try:
    yield
    sys.unraisablehook = previous
  finally:
    logger.removeFilter(logged)


def restore(workdir, like_state, step: int | None = None):
  """Restores (state, meta) of `step` (default: the latest), shaped like `like_state`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
  restored = _restore(workdir, step, ocp.args.StandardRestore(abstract))
  if jax.process_count() > 1:
    # Host copies: JAX places them on the job's mesh, which it cannot do from another process's device.
    return jax.device_get(restored["state"]), restored["meta"]
  return restored["state"], restored["meta"]


def restore_fields(workdir, like_fields: dict, step: int | None = None) -> tuple[dict, dict]:
  """Restores only the named top-level fields of the saved state, e.g. {"params": ..., "permutations":
  ...}, shaped like the given values: scoring a finished run needs neither its optimiser state nor that
  state's layout to match this version's."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_fields)
  args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=True)
  restored = _restore(workdir, step, args)
  return dict(restored["state"]), restored["meta"]


def _restore(workdir, step, state_args):
  with _manager(workdir) as manager, _quiet_orbax_threads():
    step = _step(workdir, manager, step)
    try:
      return manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # whatever a truncated file makes orbax or tensorstore raise
      if "tree structures do not match" not in str(e):
        raise DamagedCheckpoint(workdir, step, e) from e
      raise UserError(f"the checkpoint in {workdir} (step {step}) holds a state laid out differently from "
                      f"what this version of cflow_jax trains (written by another version?); start a new "
                      f"--workdir. Orbax: {str(e).splitlines()[0]}") from None


def _step(workdir, manager, step):
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first "
                    f"(python experiments/train.py --workdir={workdir})")
  return step


def read_meta(workdir, step: int | None = None) -> dict:
  """The JSON part of a checkpoint alone (cheap: no arrays are read)."""
  with _manager(workdir) as manager, _quiet_orbax_threads():
    step = _step(workdir, manager, step)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # as in `_restore`
      raise DamagedCheckpoint(workdir, step, e) from e
  return restored["meta"]


def check_compatible(saved: Config, requested: Config):
  """A resumed run must train the same model the same way; say exactly what differs."""
  old, new = dataclasses.asdict(saved), dataclasses.asdict(requested)
  diffs = [f"{k}: checkpoint has {old[k]!r}, requested {new[k]!r}" for k in sorted(old)
           if k not in _SCORING_ONLY and old[k] != new.get(k)
           and not (k in _EXTENDABLE and new.get(k, 0) >= old[k])]
  if diffs:
    raise UserError("the workdir holds a run with a different config (use another --workdir, or the same "
                    "flags): " + "; ".join(diffs))


def check_same_run(saved_meta: dict, config: Config | None = None, identity: dict | None = None,
                   workdir=None):
  """A UserError unless the checkpoint whose meta is `saved_meta` holds the run that `config` and
  `identity` (what `save` stores as "identity": dataset, train_images, encoder_fingerprint) describe: the
  same training images where `identity` names them, a config that trains the same model the same way
  (`check_compatible`; skipped without `config`), the same encoder weights where both have a fingerprint.
  The one check of "is this the same run" for resuming, reloading and re-evaluating a workdir."""
  saved, now = saved_meta.get("identity", {}), identity or {}
  ours = (now.get("dataset"), now.get("train_images"))
  theirs = (saved.get("dataset"), saved.get("train_images"))
  if None not in ours and theirs != ours:
    raise UserError(f"{workdir} holds a run trained on {theirs[0]} ({theirs[1]} images), not on {ours[0]} "
                    f"({ours[1]} images): use another --workdir")
  if config is not None:
    check_compatible(config_from_meta(saved_meta), config)
  if saved.get("encoder_fingerprint") and now.get("encoder_fingerprint") and \
     saved["encoder_fingerprint"] != now["encoder_fingerprint"]:
    raise UserError(f"the encoder weights differ from those the run in {workdir} was trained with "
                    f"({saved.get('weights')}): use another --workdir or the same --weights")


def fingerprint(tree) -> str:
  """A short content hash of a pytree of arrays: identifies the encoder weights a run was trained with."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


# Fields added since a run could have been saved, with the value that keeps such a run scoring as it was
# trained (its stored constants are the maxima "exp" needs); other added fields take their defaults.
_BEFORE_FIELD = {"likelihood": "exp"}


def config_from_meta(meta: dict) -> Config:
  """The saved config; fields that Config no longer has (a run saved by an older version, e.g. its
  `warmup_epochs`) are dropped, and fields added since take `_BEFORE_FIELD`'s value or their defaults."""
  known = {field.name for field in dataclasses.fields(Config)}
  return Config(**{**_BEFORE_FIELD, **{k: v for k, v in json.loads(meta["config"]).items() if k in known}})
