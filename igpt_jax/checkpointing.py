"""Orbax checkpoints of the train state in `workdir/checkpoints`, plus the run's config.

Every process takes part in saving (sharded arrays); orbax writes each step into a temporary
directory and renames it when complete, so a half-written step never becomes the latest. The
palette and `config.json` live beside the checkpoints in `workdir`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import orbax.checkpoint as ocp

# Fields that fix the shapes or meaning of a checkpoint: resuming with other values is an error.
STATE_DEFINING_FIELDS = ("image_size", "palette_size", "objective", "model.num_layers",
                         "model.width", "model.num_heads", "model.mlp_ratio")


def manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


class CheckpointError(RuntimeError):
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


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

  Arrays are read straight into their sharded buffers: nothing else is allocated first.
  """
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def restore_params(mgr: ocp.CheckpointManager, step: int, abstract_params):
  """Restores only the parameters of `step` (orbax partial restore: no optimizer state)."""
  item = {"params": abstract_params}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]


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


def _get(config, field):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def save_config(workdir: str, config) -> None:
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def check_compatible(workdir: str, config) -> None:
  """Fails, naming the fields, if `workdir` holds a run whose state this config cannot load."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = []
  for field in STATE_DEFINING_FIELDS:
    old = saved
    for part in field.split("."):
      old = old.get(part) if isinstance(old, dict) else None
    new = _get(config, field)
    if old is not None and old != new:
      diffs.append(f"{field}: saved {old!r}, now {new!r}")
  if diffs:
    raise ValueError(
        f"workdir {workdir} holds a run with a different model; its checkpoints cannot be "
        f"restored with this config ({'; '.join(diffs)}). Use a new --workdir, or set those "
        "fields back.")
