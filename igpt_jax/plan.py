r"""Memory and speed plan of a config on devices you do not have: compile, allocate nothing.

  python -m igpt_jax.plan --config=configs/l.py --topology=v4:8x8x4 \
      [--config.mesh.fsdp=64 --config.mesh.tensor=2] [--json]
  python -m igpt_jax.plan --config=configs/xl.py --devices=64 --hbm_gib=80   # GPUs (CPU compiler)

With `--topology` (a TPU topology name: v4:2x2x1 ... v4:8x8x16, v5e:2x2 ... v5e:16x16,
v5p:2x2x1 ..., v6e:...), the devices are that slice's TPU chips, known to the real XLA:TPU
compiler (libtpu: `pip install -e ".[tpu]"`) without a TPU: the figures are the TPU compiler's.
Without it, `--devices` fake CPU devices stand in (for GPU shapes; the CPU compiler schedules,
fuses and pads differently, so keep a margin: the README's recommendations keep about 20%).

Builds the config's mesh over the devices, abstract (shape-only) train state and batch with
their shardings, lowers and compiles the real train step and the evaluation forward, and prints
the parameter count, bytes per device for parameters, optimizer state and the compiler's
temporary buffers (activations, gradients, collectives' scratch), whether the total fits the
chip's HBM (`--hbm_gib` overrides it), the peak of a resume (one train state: checkpoints
restore into the sharded state directly), compile times, and, for a known chip, the step's FLOPs
and HBM bytes per device with the roofline step time and MFU bound they imply (chips.py).

FLOPs and bytes: XLA's cost analysis counts a loop body once, and the layers are a scan. So the
step is also compiled, for the cost analysis only, with 1 and 2 layers unrolled:
cost(L layers) = cost(1) + (L - 1) * (cost(2) - cost(1)), exact for a stack of equal layers.
Model FLOPs (flops.py, no remat recomputation) are reported beside the compiler's; a Pallas
kernel (splash attention) is a custom call whose FLOPs XLA cannot see, so the model's count of
attention FLOPs is added for it, and the roofline never assumes fewer FLOPs than the model's.
HBM bytes are XLA's "bytes accessed" (operands and results of every fused op), an estimate of
HBM traffic; collectives over ICI are not in the roofline.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from igpt_jax import cli  # absl and the error type only: jax is not imported yet
from igpt_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config to plan for.", lock_config=True)
flags.DEFINE_string("topology", None, "A TPU topology (v5e:16x16, v4:8x8x4, v5p:4x4x4, ...): "
                    "compile for its chips with the TPU compiler. Needs libtpu ([tpu] extra).")
flags.DEFINE_integer("devices", 8, "Without --topology: devices to plan for (faked on the CPU).")
flags.DEFINE_float("hbm_gib", None, "Memory per device, GiB (default: the chip's; 16 for fake "
                   "CPU devices; v5e 16, v4 32, H100 80).")
flags.DEFINE_bool("costs", True, "Also compile 1- and 2-layer variants for FLOPs, HBM bytes and "
                  "the roofline (three compiles instead of one).")
flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead of text.")
flags.mark_flags_as_required(["config"])
flags.register_validator("devices", lambda n: n > 0, "--devices must be a positive count.")
flags.register_validator("hbm_gib", lambda g: g is None or g > 0,
                         "--hbm_gib must be > 0 (memory per device: v5e 16, v4 32, H100 80).")

GIB = 1024**3


def _fake_devices(n: int) -> None:
  """`n` CPU devices, and no accelerator opened (compile-only TPU devices need no TPU). Must
  run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("igpt_jax.plan must set up its devices before jax is imported.")
  os.environ["JAX_PLATFORMS"] = "cpu"
  # Compile-only TPU devices touch no chip: libtpu's one-process lock (for real chips) would
  # only stop two plans, or a plan beside a test, from running at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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


def topology_devices(name: str):
  """The chips of TPU topology `name` as compile-only devices (jax must run on the CPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # v4 and v5p chips run their two TensorCores as one device ("megacore"), as TPU VMs do.
  megacore = {"chip_config_name": "megacore"} if name.lower().startswith(("v4", "v5p")) else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **megacore).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad name
    raise errors.FlagError(
        f"--topology={name}: no such TPU topology here ({str(e).splitlines()[0][:200]}). "
        "Names look like v5e:16x16, v4:8x8x4, v5p:4x4x4; the TPU compiler comes with "
        '`pip install -e ".[tpu]"`.') from e


def _cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device from XLA's cost analysis (0 where it has none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def plan(config, hbm_gib: float | None = None, devices=None, layer_costs: bool = True) -> dict:
  """Compiles the train step and evaluation forward of `config` on `devices` (default: the
  current ones; compile-only TPU devices work); returns the figures. `hbm_gib` default: the
  chip's, else 16."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from igpt_jax import chips  # pylint: disable=g-import-not-at-top
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import flops  # pylint: disable=g-import-not-at-top
  from igpt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import objectives  # pylint: disable=g-import-not-at-top
  from igpt_jax import sharding  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top

  devices = list(jax.devices() if devices is None else devices)
  kind = devices[0].device_kind
  chip = chips.for_device(devices[0])
  hbm_gib = hbm_gib or (chip.hbm_gib if chip else 16.0)
  config_lib.validate(config, len(devices), platform=devices[0].platform)
  mesh = sharding.make_mesh(config, devices)
  seq_len = config.image_size**2
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len), jnp.int32,
                                          sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=batch_sharding)}

  def compile_step(c, unroll: int = 1):
    model, schedule, tx = train_state.model_and_optimizer(c, train_state.warmup_steps(c))
    if unroll > 1:
      model = model_lib.IGPT(dataclasses.replace(model.cfg, scan_unroll=unroll))
    abstract, shardings = train_state.abstract_train_state(model, tx, mesh, c)
    step_fn = train.jit_train_step(c, model, tx, schedule, mesh, shardings)
    with sharding.use(mesh, c):
      t0 = time.time()
      compiled = step_fn.lower(abstract, batch).compile()
    return compiled, time.time() - t0, abstract, shardings, model

  compiled, compile_s, abstract, shardings, model = compile_step(config)
  mem = compiled.memory_analysis()
  params_b = per_device_bytes(abstract.params, shardings.params)
  opt_b = per_device_bytes(abstract.opt_state, shardings.opt_state)
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  args_b = int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0
  total = max(args_b, params_b + opt_b) + temp_b

  # The evaluation forward (bits/dim, features): parameters only, no optimizer or gradients.
  eval_fn = jax.jit(
      lambda p, b: objectives.masked_loss_sums(
          model_lib.make_apply_fn(model), p, b, jax.random.PRNGKey(config.seed),
          objective=config.objective, mask_prob=config.mask_prob),
      in_shardings=(shardings.params, batch_sharding), out_shardings=sharding.replicated(mesh))
  with sharding.use(mesh, config):
    t0 = time.time()
    eval_batch = dict(batch, mask=jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_,
                                                       sharding=batch_sharding))
    eval_compiled = eval_fn.lower(abstract.params, eval_batch).compile()
    eval_compile_s = time.time() - t0
  eval_mem = eval_compiled.memory_analysis()
  eval_temp_b = int(getattr(eval_mem, "temp_size_in_bytes", 0)) if eval_mem is not None else 0

  n_layers = config.model.num_layers
  model_flops = (flops.train_flops_per_token_of(model.cfg) * config.batch_size * seq_len
                 / len(devices))
  out = {
      "devices": len(devices),
      "device_kind": kind,
      "compiler": f"XLA:{devices[0].platform.upper()}",
      "mesh": dict(mesh.shape),
      "parameters": model_lib.count_params(abstract.params),
      "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      "attention": model_lib.attention_lib.resolve(model.cfg.attention, model.cfg.compute_dtype,
                                                   devices[0].platform, kind),
      "params_gib_per_device": params_b / GIB,
      "optimizer_gib_per_device": opt_b / GIB,
      "temp_gib_per_device": temp_b / GIB,
      "total_gib_per_device": total / GIB,
      # A resume restores the checkpoint straight into the sharded state: one train state.
      "restore_peak_gib_per_device": (params_b + opt_b) / GIB,
      "eval_total_gib_per_device": (params_b + eval_temp_b) / GIB,
      "hbm_gib": hbm_gib,
      "hbm_headroom": 1.0 - total / (hbm_gib * GIB),
      "fits": total <= hbm_gib * GIB,
      "compile_s": compile_s,
      "eval_compile_s": eval_compile_s,
      "model_tflop_per_device": model_flops / 1e12,
  }
  if layer_costs:
    one, two = (_cost(compile_step(_with_layers(config, n), unroll=n)[0]) for n in (1, 2))
    step_flops = one[0] + (n_layers - 1) * (two[0] - one[0])
    step_bytes = one[1] + (n_layers - 1) * (two[1] - one[1])
    if out["attention"] == "splash":
      # A Pallas kernel is a custom call whose FLOPs XLA does not see: add the model's count
      # of them (the kernel skips the blocks above the diagonal, as that count assumes).
      m = model.cfg
      step_flops += (flops.attention_train_flops_per_token(n_layers, m.width, m.seq_len,
                                                           m.causal)
                     * config.batch_size * seq_len / len(devices))
    out.update({"compiler_tflop_per_device": step_flops / 1e12,
                "hbm_gb_per_device": step_bytes / 1e9,
                "one_and_two_layer_tflop": [one[0] / 1e12, two[0] / 1e12]})
    if chip is not None:
      out["chip"] = chip.name
      # Never fewer FLOPs than the model needs: where the compiler's count is lower (work it
      # does not see, as in custom calls), the roofline uses the model's.
      out.update(chips.roofline(model_flops, max(step_flops, model_flops), step_bytes, chip))
  return out


def _with_layers(config, n: int):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.num_layers = n
  return c


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
  verdict = "fits" if p["fits"] else "DOES NOT FIT"
  lines = [
      f"{p['parameters']:,} parameters on {p['devices']} x {p['device_kind']} ({mesh}); global "
      f"batch {p['batch_size']} in {p['grad_accum_steps']} micro-batch(es), remat "
      f"{p['remat_policy']}, compute {p['dtype']}, attention {p['attention']}; figures from "
      f"{p['compiler']}",
      f"  per device: parameters {p['params_gib_per_device']:.2f} GiB | optimizer "
      f"{p['optimizer_gib_per_device']:.2f} GiB | activations & temporaries "
      f"{p['temp_gib_per_device']:.2f} GiB | total {p['total_gib_per_device']:.2f} GiB",
      f"  {verdict} in {p['hbm_gib']:g} GiB per device ({100 * p['hbm_headroom']:.0f}% headroom;"
      f" train step compiled in {p['compile_s']:.0f} s)",
      f"  restore peak {p['restore_peak_gib_per_device']:.2f} GiB per device (one train state: "
      "a checkpoint is read into its shards, nothing is allocated before it)",
      f"  evaluation forward: {p['eval_total_gib_per_device']:.2f} GiB per device (parameters "
      f"and temporaries; compiled in {p['eval_compile_s']:.0f} s)",
  ]
  if "compiler_tflop_per_device" in p:
    lines.append(
        f"  per device and step: {p['model_tflop_per_device']:.3g} model TFLOP "
        f"({p['compiler_tflop_per_device']:.3g} by the compiler's count), "
        f"{p['hbm_gb_per_device']:.3g} GB of HBM traffic")
  if "roofline_step_s" in p:
    lines.append(
        f"  roofline on {p['chip']}: step >= {1e3 * p['roofline_step_s']:.0f} ms "
        f"({p['bound_by']}-bound: compute {1e3 * p['compute_bound_s']:.0f} ms, HBM "
        f"{1e3 * p['memory_bound_s']:.0f} ms), MFU <= {100 * p['mfu_bound']:.0f}% "
        "(collectives not counted)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _fake_devices(1 if FLAGS.topology else FLAGS.devices)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # optax's and orbax's INFO lines

  def plan_and_print(config):
    devices = topology_devices(FLAGS.topology) if FLAGS.topology else None
    p = plan(config, FLAGS.hbm_gib, devices=devices, layer_costs=FLAGS.costs)
    print(json.dumps(p) if FLAGS.json else format_plan(p), flush=True)

  cli.run_reporting_user_errors(plan_and_print, FLAGS.config)


if __name__ == "__main__":
  cli.run(main)
