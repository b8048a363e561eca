"""Orbax checkpoints of a run: decoders, optimiser states, progress, config, encoder identity, normalisation.

Orbax writes each checkpoint into a temporary folder and renames it only once complete, so a process killed
mid-save leaves the previous checkpoint as the latest one that restores.
"""

import dataclasses
import hashlib
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from cflow_jax.config import Config
from cflow_jax.errors import UserError

# Fields that only change how scores are normalised, not what was trained: free to differ on resume.
_SCORING_ONLY = ("normalization", "cache_features", "blur_sigma", "score_dtype")
# Fields that may grow on resume: training longer continues the same run.
_EXTENDABLE = ("meta_epochs",)


def _manager(workdir) -> ocp.CheckpointManager:
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options)


def latest_step(workdir) -> int | None:
  if not (pathlib.Path(workdir) / "checkpoints").exists():
    return None
  with _manager(workdir) as manager:
    return manager.latest_step()


def save(workdir, step: int, state, meta: dict):
  """Saves `state` (a pytree of arrays) and `meta` (JSON: config, encoder identity, progress) as `step`.

  On several processes every array is replicated over all of them and saved from host copies: orbax
  then writes from process 0 alone (its device-array path failed on arrays spanning processes' CPUs)."""
  if jax.process_count() > 1:
    state = jax.device_get(state)
  with _manager(workdir) as manager:
    if step in manager.all_steps():
      # Replacing a step (the finished run's normalisation after its last epoch): a kill between delete
      # and save leaves the previous epoch's checkpoint, from which a resume redoes the same work.
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


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
  with _manager(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first "
                      f"(python experiments/train.py --workdir={workdir})")
    try:
      return manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      raise UserError(f"the checkpoint in {workdir} (step {step}) holds a state laid out differently from "
                      f"what this version of cflow_jax trains (written by another version?); start a new "
                      f"--workdir. Orbax: {str(e).splitlines()[0]}") from None


def read_meta(workdir, step: int | None = None) -> dict:
  """The JSON part of a checkpoint alone (cheap: no arrays are read)."""
  with _manager(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first "
                      f"(python experiments/train.py --workdir={workdir})")
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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


def fingerprint(tree) -> str:
  """A short content hash of a pytree of arrays: identifies the encoder weights a run was trained with."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def config_from_meta(meta: dict) -> Config:
  return Config(**json.loads(meta["config"]))
