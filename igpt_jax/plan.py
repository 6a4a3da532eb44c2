r"""Memory plan of a config on a device count you do not have: compile, allocate nothing.

  python -m igpt_jax.plan --config=configs/xl.py --devices=256 \
      [--config.mesh.fsdp=64 --config.mesh.tensor=4] [--hbm_gib=16] [--json]

Builds `--devices` fake CPU devices, the config's mesh over them, abstract (shape-only) train
state and batch with their shardings, lowers and compiles the real train step, and prints the
parameter count, bytes per device for parameters, optimizer state, and XLA's temporary buffers
(activations, gradients, collectives' scratch), whether the total fits `--hbm_gib`, and the
peak of a resume (one train state: checkpoints restore into the sharded state directly).
The figures are the CPU compiler's; an accelerator's compiler schedules differently, so keep a
margin (the README's recommendations keep about 20%).
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from igpt_jax import cli  # absl and the error type only: jax is not imported yet

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config to plan for.", lock_config=True)
flags.DEFINE_integer("devices", 8, "Number of devices to plan for (faked on the CPU).")
flags.DEFINE_float("hbm_gib", 16.0, "Memory per device, GiB (v5e 16, v4 32, H100 80).")
flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead of text.")
flags.mark_flags_as_required(["config"])
flags.register_validator("devices", lambda n: n > 0, "--devices must be a positive count.")
flags.register_validator("hbm_gib", lambda g: g > 0,
                         "--hbm_gib must be > 0 (memory per device: v5e 16, v4 32, H100 80).")

GIB = 1024**3


def _fake_devices(n: int) -> None:
  """Must run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("igpt_jax.plan must set up its fake devices before jax is imported.")
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={n}"])


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (shape structs) laid out with `shardings`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings),
                  strict=True):
    total += int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def plan(config, hbm_gib: float) -> dict:
  """Compiles the train step of `config` on the current devices; returns the figures."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import sharding  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  model, schedule, tx = train_state.model_and_optimizer(config, train_state.warmup_steps(config))
  abstract, shardings = train_state.abstract_train_state(model, tx, mesh, config)
  batch_sharding = sharding.batch_sharding(mesh)
  seq_len = config.image_size**2
  batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len), jnp.int32,
                                          sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=batch_sharding)}
  step_fn = train.jit_train_step(config, model, tx, schedule, mesh, shardings)
  with sharding.use(mesh, config):
    t0 = time.time()
    compiled = step_fn.lower(abstract, batch).compile()
    compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  params_b = per_device_bytes(abstract.params, shardings.params)
  opt_b = per_device_bytes(abstract.opt_state, shardings.opt_state)
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  args_b = int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0
  total = max(args_b, params_b + opt_b) + temp_b
  return {
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape),
      "parameters": model_lib.count_params(abstract.params),
      "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      "params_gib_per_device": params_b / GIB,
      "optimizer_gib_per_device": opt_b / GIB,
      "temp_gib_per_device": temp_b / GIB,
      "total_gib_per_device": total / GIB,
      # A resume restores the checkpoint straight into the sharded state: one train state.
      "restore_peak_gib_per_device": (params_b + opt_b) / GIB,
      "hbm_gib": hbm_gib,
      "fits": total <= hbm_gib * GIB,
      "compile_s": compile_s,
  }


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
  verdict = "fits" if p["fits"] else "DOES NOT FIT"
  return "\n".join([
      f"{p['parameters']:,} parameters on {p['devices']} devices ({mesh}); global batch "
      f"{p['batch_size']} in {p['grad_accum_steps']} micro-batch(es), remat "
      f"{p['remat_policy']}, compute {p['dtype']}",
      f"  per device: parameters {p['params_gib_per_device']:.2f} GiB | optimizer "
      f"{p['optimizer_gib_per_device']:.2f} GiB | activations & temporaries "
      f"{p['temp_gib_per_device']:.2f} GiB | total {p['total_gib_per_device']:.2f} GiB",
      f"  restore peak {p['restore_peak_gib_per_device']:.2f} GiB per device (one train state: "
      "a checkpoint is read into its shards, nothing is allocated before it)",
      f"  {verdict} in {p['hbm_gib']:g} GiB per device (compiled in {p['compile_s']:.0f}s)",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _fake_devices(FLAGS.devices)
  render = json.dumps if FLAGS.json else format_plan
  cli.run_reporting_user_errors(
      lambda c: print(render(plan(c, FLAGS.hbm_gib)), flush=True), FLAGS.config)


if __name__ == "__main__":
  cli.run(main)
