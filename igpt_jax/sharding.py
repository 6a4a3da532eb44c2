"""Device mesh, logical-axis shardings and global batches.

The mesh has three named axes (`data`, `fsdp`, `tensor`) sized by `config.mesh`; the model names
every parameter and activation axis logically and `config.logical_axis_rules` maps those names
to mesh axes. Changing the parallelism plan is a config change only.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from absl import logging
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from igpt_jax import config_lib

BATCH_AXES = ("data", "fsdp")
_SPLIT_WARNED = set()  # mesh shapes `make_mesh` has said split a physical axis


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """A `data x fsdp x tensor` mesh over all devices of all processes.

  Each mesh axis takes whole physical axes of a TPU slice where it can (`jax.make_mesh`); a
  shape that needs part of one (e.g. data 2 x fsdp 32 on a v6e 8x8 torus) splits that physical
  axis instead, with a line saying so: it runs, and the split axes' collectives use a part of
  that axis's links each.
  """
  devices = jax.devices() if devices is None else devices
  shape = config_lib.resolve_mesh_shape(config.mesh, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  try:
    return jax.make_mesh(shape, config_lib.MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError as e:  # a TPU slice's physical torus cannot hold this shape whole
    reason = str(e).split(".")[0]
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError) as e:
    raise config_lib.ConfigError(
        f"config.mesh={dict(zip(config_lib.MESH_AXES, shape))} does not map onto these "
        f"devices' physical layout ({reason}; splitting physical axes failed too: "
        f"{str(e).split('.')[0]}). Choose other config.mesh sizes, e.g. products of the "
        "slice's physical axes (16 = 4 x 4 on a 4x4x4 slice).") from e
  if shape not in _SPLIT_WARNED:
    _SPLIT_WARNED.add(shape)
    logging.warning("config.mesh=%s splits a physical axis of this slice (%s): it runs, with "
                    "less link bandwidth for the split axes", dict(zip(config_lib.MESH_AXES, shape)),
                    reason)
  return jax.sharding.Mesh(grid, config_lib.MESH_AXES, axis_types=axis_types)


def rules(config):
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)


@contextlib.contextmanager
def use(mesh, config):
  """The mesh, logical rules and matmul precision (`config.model.matmul_precision`) in force
  while tracing model code: every step, forward and sampler is traced under it."""
  set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  precision = config.model.get("matmul_precision", "default")
  with set_mesh(mesh), nn.logical_axis_rules(rules(config)), \
      jax.default_matmul_precision(precision):
    yield


def param_shardings(boxed_params, mesh, config):
  """NamedShardings for a tree of logically partitioned (boxed) parameters or shapes."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(config))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes: the batch's one
  intended host-to-device copy, so it is allowed under the train loop's transfer guard (with
  several processes jax counts `make_array_from_process_local_data` as an implicit copy)."""
  sharding = batch_sharding(mesh)
  with jax.transfer_guard_host_to_device("allow"):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def local_batch_size(config) -> int:
  """The share of the global batch this process feeds (processes feed equal shares)."""
  if config.batch_size % jax.process_count():
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size}: must be divisible by the number of processes "
        f"({jax.process_count()}).")
  return config.batch_size // jax.process_count()
