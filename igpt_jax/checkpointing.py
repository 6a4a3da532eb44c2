"""Orbax checkpoints of the train state in `workdir/checkpoints`, plus the run's config.

Every process takes part in saving (sharded arrays); orbax writes each step into a temporary
directory and renames it when complete, so a half-written step never becomes the latest. The
palette and `config.json` live beside the checkpoints in `workdir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time

import jax
import orbax.checkpoint as ocp

from igpt_jax import atomic
from igpt_jax import errors
from igpt_jax.config_lib import get_field

# Fields that fix the shapes or meaning of a checkpoint: resuming with other values is an error.
STATE_DEFINING_FIELDS = ("image_size", "palette_size", "objective", "model.num_layers",
                         "model.width", "model.num_heads", "model.mlp_ratio")


def manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


class CheckpointError(errors.UserError, RuntimeError):
  """No checkpoint in the workdir can be restored; the message lists why for each."""


def quarantine(mgr: ocp.CheckpointManager, workdir: str, step: int) -> str:
  """Moves an unrestorable step directory to workdir/corrupt_checkpoints/ (process 0)."""
  src = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  dst = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints", f"{step}-{int(time.time())}")
  if jax.process_index() == 0 and os.path.exists(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
  del mgr
  return dst


def save(mgr: ocp.CheckpointManager, step: int, state, next_index: int) -> None:
  """Saves the train state and the data position (the next global stream index) as one step."""
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"next_index": int(next_index)})))


def save_failed(workdir: str, step: int, last_good, e: BaseException) -> errors.UserError:
  """The error for a checkpoint that could not be written: what, where, how much space."""
  where = os.path.join(os.path.abspath(workdir), "checkpoints")
  try:
    free = f"{shutil.disk_usage(workdir).free / 2**30:.1f} GiB free there"
  except OSError:
    free = "free space unknown"
  kept = (f"the checkpoint of step {last_good} is kept" if last_good is not None
          else "no earlier checkpoint exists")
  return CheckpointError(
      f"saving the checkpoint of step {step} to {where} failed ({failure_reason(e)}; {free}); "
      f"training stopped and {kept}. Free disk space or fix the directory's permissions, then "
      "rerun the same command to resume.")


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

  Arrays are read straight into their sharded buffers: nothing else is allocated first.
  """
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def failure_reason(e: BaseException) -> str:
  """One line on why a checkpoint did not restore: the most specific message in the exception
  chain (orbax wraps TensorStore's, which ends in an object dump)."""
  chain = []
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  lines = []
  for err in chain:
    text = str(err).split("See full TensorStore details")[0].strip()
    first = text.splitlines()[0].strip() if text else ""
    lines.append(f"{type(err).__name__}: {first}" if first else type(err).__name__)
  specific = [line for line in lines if any(k in line for k in (
      "NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "Truncated", "No such file",
      "structure", "not found", "corrupt"))]
  return (specific or lines)[-1][:300]


def restore_params(mgr: ocp.CheckpointManager, step: int, abstract_params):
  """Restores only the parameters of `step` (orbax partial restore: no optimizer state)."""
  item = {"params": abstract_params}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]


def restore_newest(mgr: ocp.CheckpointManager, workdir: str, abstract, *, params_only: bool,
                   step: int | None = None, batch_size: int, log=print):
  """(restored, step, next_index) of a run's checkpoint, or (None, None, None) if it has none.

  `abstract`: ShapeDtypeStructs with shardings of the train state, or of the parameters alone
  (`params_only`, an orbax partial restore). `step=None` takes the newest checkpoint that
  restores: newer damaged ones are skipped with one line each and moved to
  workdir/corrupt_checkpoints/ (never deleted); if none restores, nothing is moved and the error
  lists every failure. An exact `step` must exist and restore. `next_index` is the saved data
  position, or step x batch_size for checkpoints that predate it.
  """
  if step is not None and step not in mgr.all_steps():
    raise errors.MissingError(
        f"no checkpoint at step {step} in {workdir}/checkpoints (have "
        f"{sorted(mgr.all_steps())}); train first or pick one of those.")
  candidates = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
  failures = []
  for s in candidates:
    try:
      restored = (restore_params if params_only else restore)(mgr, s, abstract)
      next_index = data_position(mgr, s)
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
      reason = failure_reason(e)
      if step is None:
        log(f"Skipping checkpoint {s}: it does not restore ({reason}).")
      failures.append((s, reason))
      continue
    if step is None:
      for bad, _ in failures:
        moved = quarantine(mgr, workdir, bad)
        log(f"Moved unrestorable checkpoint {bad} to {moved}; resuming from step {s}.")
      if failures:
        mgr.reload()
    return restored, s, (s * batch_size if next_index is None else next_index)
  if failures:
    raise CheckpointError(
        f"no checkpoint in {workdir}/checkpoints restores: "
        + "; ".join(f"step {s}: {r}" for s, r in failures)
        + ". Nothing was moved or deleted. If the config changed, use the run's config.json; "
        "otherwise move the damaged step directories away or use a new --workdir.")
  return None, None, None


def data_position(mgr: ocp.CheckpointManager, step: int):
  """The next global stream index saved with `step`; None for checkpoints written before the
  data position was saved (they resume from step x batch size)."""
  if not os.path.isdir(os.path.join(str(mgr.directory), str(step), "data")):
    return None
  restored = mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  return int(restored["data"]["next_index"])


def abstract_like(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_config(workdir: str, config) -> None:
  atomic.write_text(os.path.join(workdir, "config.json"),
                    config.to_json_best_effort(indent=2, sort_keys=True))


# Fields that fix what a run trains on: resuming with other values is refused (the palette and
# the data position belong to the old data) unless config.allow_data_change is set.
# (palette_path: another palette gives the same tokens other colors.)
DATA_DEFINING_FIELDS = ("dataset", "train_split", "holdout_fraction", "palette_path")


class IncompatibleRunError(errors.UserError, ValueError):
  """The workdir holds a run that this config cannot continue or load."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds `workdir`'s writer lock (process 0 of a run): a second run on the same workdir
  fails at once with a message naming the first. The lock is the operating system's (flock),
  so it goes with the process that held it: a killed run leaves no stale lock behind. (On a
  network file system without flock support, the check is as good as that file system's.)"""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise errors.UserError(
          f"--workdir={workdir} is in use by another run ({holder}); two runs writing one "
          "workdir would overwrite each other's checkpoints and metrics. Wait for that run to "
          "end or stop it (it resumes from its checkpoints), or pass another --workdir.") from e
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock


def check_workdir(workdir: str, *, write: bool) -> None:
  """Fails at once if `workdir` is a file or (with `write`) cannot be written, before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                           "(it is created if missing).")
  if not write:
    return
  try:
    atomic.make_writable_dir(workdir)
  except OSError as e:
    raise errors.UserError(f"--workdir={workdir} is not writable ({e.strerror}); pass a "
                           "directory you can write to, or fix its permissions.") from e


def saved_config(workdir: str):
  """The run's config.json as a dict, or None if there is none; a damaged one is named."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise IncompatibleRunError(
        f"{path} is truncated or not JSON ({e}); it records the run's config. Restore it from "
        "a copy, or move it away to accept this config as the run's record (checkpoints are "
        "kept).") from e


def _dataset_key(value):
  """Local folders compare by absolute path; tfds names as written."""
  if isinstance(value, str) and (os.sep in value or value.startswith((".", "~"))):
    return os.path.abspath(os.path.expanduser(value))
  return value


def _differences(saved: dict, config, fields) -> list[str]:
  """"field: saved X, now Y" for each of `fields` the saved run set to another value."""
  diffs = []
  for field in fields:
    old, new = get_field(saved, field, None), get_field(config, field)
    if field == "dataset":
      old, new = _dataset_key(old), _dataset_key(new)
    if old is not None and old != new:
      diffs.append(f"{field}: saved {old!r}, now {new!r}")
  return diffs


def check_compatible(workdir: str, config, *, data: bool = False) -> None:
  """Fails, naming the fields, if `workdir` holds a run whose state this config cannot load,
  and (with `data`, for resuming training) one that trained on other data."""
  saved = saved_config(workdir)
  if saved is None:
    return
  diffs = _differences(saved, config, STATE_DEFINING_FIELDS)
  if diffs:
    raise IncompatibleRunError(
        f"workdir {workdir} holds a run with a different model; its checkpoints cannot be "
        f"restored with this config ({'; '.join(diffs)}). Use a new --workdir, or set those "
        "fields back.")
  if not data:
    return
  # Clipping on or off changes the optimizer state's structure (one more link in its chain);
  # the threshold itself may change freely.
  old_clip, new_clip = get_field(saved, "grad_clip_norm", None), config.get("grad_clip_norm", 0)
  if old_clip is not None and (old_clip > 0) != (new_clip > 0):
    state = "on" if old_clip > 0 else "off"
    raise IncompatibleRunError(
        f"workdir {workdir} holds a run trained with gradient clipping {state} "
        f"(config.grad_clip_norm: saved {old_clip!r}, now {new_clip!r}); its optimizer state "
        "has another structure, so it cannot be resumed. Set config.grad_clip_norm "
        + ("to any value > 0" if old_clip > 0 else "back to 0")
        + " (the threshold may change), or use a new --workdir.")
  if config.get("allow_data_change", False):
    return
  diffs = _differences(saved, config, DATA_DEFINING_FIELDS)
  if diffs:
    raise IncompatibleRunError(
        f"workdir {workdir} holds a run trained on other data ({'; '.join(diffs)}); its "
        "palette and data position belong to that data. Use a new --workdir, set those fields "
        "back, or pass --config.allow_data_change=True to continue on the new data (the old "
        "config.json is kept as config.<time>.json).")


def keep_config_history(workdir: str) -> None:
  """Copies config.json to config.<unix time>.json before a changed config replaces it."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    shutil.copyfile(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
