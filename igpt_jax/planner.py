"""Compiles a config's train step for devices you may not have and reads what it costs.

The devices are compile-only devices known to a real compiler without the hardware
(`topology_devices`): a TPU slice for libtpu's XLA:TPU compiler, or NVIDIA GPUs as hosts x
GPUs per host for jax-cuda12-plugin's XLA:GPU compiler with the target configs in
igpt_jax/gpu_targets/; or the current (CPU) devices. `plan` lowers and compiles the real train
step and evaluation forward on the config's mesh over them, allocating nothing, and returns
memory per device, whether it fits, and (hlo_cost.py, chips.py) FLOPs, HBM traffic, bytes per
link and the roofline. `sample_plan.py` does the same for the sampler. The `plan` tool prints
both; `plan_search.py` ranks many of them.

jax is imported inside the functions: `use_fake_devices` must run before jax opens its devices.
"""

import os
import sys

import igpt_jax
from igpt_jax import errors

GIB = 1024**3
LINK_NAMES = {"ici": "ICI", "nvlink": "NVLink", "network": "the network"}


def _jax_devices_opened() -> bool:
  """Whether jax has opened its devices (imported is fine: the flags are read at that point)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another jax: assume the worst
    return True


def use_fake_devices(n: int) -> None:
  """`n` CPU devices, and no accelerator opened (compile-only TPU devices need no TPU). Must
  run before jax opens its devices."""
  if _jax_devices_opened():
    raise RuntimeError("igpt_jax.planner.use_fake_devices must run before jax's devices are "
                       "first used (e.g. in a fresh process: python -m igpt_jax.plan).")
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported, devices not opened: its platforms flag is already read
    sys.modules["jax"].config.update("jax_platforms", "cpu")
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


GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}


# libtpu, loaded to compile for a named topology on a machine without TPU chips, looks for the
# TPU VM it runs on (cloud metadata, worker hostnames, host bounds) and prints a screen of errors
# when there is none. None of that shapes a compile-only topology, whose name says it all (the
# plans are the same with these set): a lone worker, so that it stays quiet. The user's own
# values win, and a machine with TPU chips is left alone.
_COMPILE_ONLY_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                         "TPU_WORKER_ID": "0", "TPU_HOST_BOUNDS": "1,1,1"}


def _quiet_libtpu_without_chips() -> None:
  if not igpt_jax.tpu_chips_attached():
    for key, value in _COMPILE_ONLY_TPU_ENV.items():
      os.environ.setdefault(key, value)


def topology_devices(name: str):
  """Compile-only devices of `name`: a TPU topology (v5e:16x16, v4:8x8x4, ...: libtpu's XLA:TPU
  compiler) or NVIDIA GPUs as hosts x GPUs per host (h100:1x8, h200:4x8: the XLA:GPU compiler of
  jax-cuda12-plugin with the target config in igpt_jax/gpu_targets/). jax must run on the CPU."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kind, _, shape = name.lower().partition(":")
  if kind in GPU_TARGETS:
    dims = shape.split("x")
    if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise errors.FlagError(f"--topology={name}: a GPU topology is {kind}:<hosts>x<GPUs per "
                             f"host>, e.g. {kind}:1x8 or {kind}:4x8.")
    target = os.path.join(os.path.dirname(__file__), "gpu_targets", GPU_TARGETS[kind])
    try:
      with open(target) as f:
        return list(topologies.get_topology_desc(
            platform="cuda", target_config=f.read(), topology=f"1x{dims[0]}x{dims[1]}").devices)
    except Exception as e:  # pylint: disable=broad-except  # the plugin is missing
      raise errors.FlagError(
          f"--topology={name}: the XLA:GPU compiler is not available here "
          f"({str(e).splitlines()[0][:200]}); it comes with `pip install -e \".[plan]\"` "
          "(jax-cuda12-plugin and jax-cuda12-pjrt at the installed jax version).") from e
  # v4 and v5p chips run their two TensorCores as one device ("megacore"), as TPU VMs do.
  megacore = {"chip_config_name": "megacore"} if kind in ("v4", "v5p") else {}
  _quiet_libtpu_without_chips()
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **megacore).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad name
    raise errors.FlagError(
        f"--topology={name}: no such TPU topology here ({str(e).splitlines()[0][:200]}). "
        "Names look like v5e:16x16, v4:8x8x4, v5p:4x4x4 (TPU) or h100:1x8, h200:2x8 (GPU "
        'hosts x GPUs per host); the TPU compiler comes with `pip install -e ".[tpu]"`.') from e


def out_of_memory(e: Exception) -> str | None:
  """The compiler's out-of-memory message (XLA:TPU refuses a program larger than HBM), or None
  for any other error."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  head = next((l for l in lines if "exceed" in l or "memory" in l.lower()), lines[0])
  return head.split("RESOURCE_EXHAUSTED:")[-1].strip()[:300]


def device_bytes(mem) -> tuple[int, int]:
  """(temporary, argument) bytes per device of a compiled program's memory analysis."""
  if mem is None:
    return 0, 0
  return (int(getattr(mem, "temp_size_in_bytes", 0)),
          int(getattr(mem, "argument_size_in_bytes", 0)))


def communication(cost, devices, chip) -> dict:
  """Bytes each device sends per step over each link, and the time that takes at the chip's
  link bandwidth (chips.py). Partition i of the program is `devices[i]` (the mesh's order).
  TPU: ICI within the slice. GPUs: NVLink within a host, the network between hosts."""
  import collections  # pylint: disable=g-import-not-at-top
  host = [getattr(d, "process_index", 0) for d in devices]
  gpu = devices[0].platform == "gpu"
  per_link = collections.defaultdict(float)
  per_kind = collections.defaultdict(float)
  for c in cost.collectives:
    crosses = any(len({host[i] for i in g if i < len(host)}) > 1 for g in c.groups)
    link = ("network" if crosses else "nvlink") if gpu else "ici"
    per_link[link] += c.bytes_sent * c.count
    per_kind[c.kind] += c.bytes_sent * c.count
  out = {"comm_gb_per_device": {k: v / 1e9 for k, v in sorted(per_link.items())},
         "comm_gb_by_collective": {k: v / 1e9 for k, v in sorted(per_kind.items())}}
  if chip is not None:
    out["comm_bound_s"] = sum(v / chip.link_bytes_per_s(k) for k, v in per_link.items())
  return out


def memory_budget(device, hbm_gib: float | None, gpu_mem_fraction: float,
                  reserved_gib: float = 0.0) -> tuple:
  """(chip or None, the plan's memory fields): `hbm_gib` (given, else the chip's, else 16) and
  `usable_gib`, what a program may take. On GPUs, XLA's pool is jax's preallocated fraction of
  HBM (the CUDA context and NCCL's buffers live outside it) less `reserved_gib` inside it
  (the cuDNN workspace, not built without a GPU)."""
  from igpt_jax import chips  # pylint: disable=g-import-not-at-top
  chip = chips.for_device(device)
  hbm_gib = hbm_gib or (chip.hbm_gib if chip else 16.0)
  fields = {"hbm_gib": hbm_gib, "usable_gib": hbm_gib}
  if device.platform == "gpu":
    fields.update(usable_gib=hbm_gib * gpu_mem_fraction - reserved_gib,
                  gpu_mem_fraction=gpu_mem_fraction)
  if chip is not None:
    fields["chip"] = chip.name
  return chip, fields


def compiled_costs(compiled, devices, chip, model_flops: float,
                   kernel_flops: float = 0.0) -> dict:
  """What a compiled program costs per device (hlo_cost.py): its FLOPs (plus `kernel_flops`,
  the model's count for custom-call kernels XLA does not see), HBM traffic, bytes per link
  and, on a known chip, the roofline against `model_flops` (chips.roofline)."""
  from igpt_jax import chips  # pylint: disable=g-import-not-at-top
  from igpt_jax import hlo_cost  # pylint: disable=g-import-not-at-top
  cost = hlo_cost.analyze(compiled.as_text(), len(devices))
  program_flops = cost.flops + kernel_flops
  out = {"model_tflop_per_device": model_flops / 1e12,
         "compiler_tflop_per_device": program_flops / 1e12,
         "flop_ratio": program_flops / model_flops if model_flops else 0.0,
         "hbm_gb_per_device": cost.hbm_bytes / 1e9,
         "custom_calls": sorted(t for t in cost.custom_calls if t not in hlo_cost.NO_FLOP_CALLS),
         "loops_counted_once": sum(1 for l in cost.loops if l[2] == "unknown")}
  out.update(communication(cost, devices, chip))
  if devices[0].platform == "gpu":
    out["sm"] = gpu_code_targets(compiled)
  if chip is not None:
    out.update(chips.roofline(model_flops, program_flops, cost.hbm_bytes,
                              out.get("comm_bound_s", 0.0), chip))
  return out


def gpu_code_targets(compiled) -> str | None:
  """The GPU architectures the executable holds code for ("sm_90a"), read from its serialized
  form (the PTX kernels XLA:GPU produced), or None where it cannot be serialized."""
  import re  # pylint: disable=g-import-not-at-top
  try:
    blob = compiled.runtime_executable().serialize()
  except Exception:  # pylint: disable=broad-except
    return None
  return ",".join(sorted({m.decode() for m in re.findall(rb"sm_[0-9]+a?", blob)})) or None


def plan(config, hbm_gib: float | None = None, devices=None, costs: bool = True,
         gpu_mem_fraction: float = 0.75, eval_forward: bool = True) -> dict:
  """Compiles the train step and evaluation forward of `config` on `devices` (default: the
  current ones; compile-only TPU and GPU devices work); returns the figures. `hbm_gib` default:
  the chip's, else 16. A program the compiler finds too large for HBM is an answer, not an
  error: "fits" is False and "compiler_says" holds the compiler's figures."""
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
  platform = devices[0].platform
  config_lib.validate(config, len(devices), platform=platform)
  mesh = sharding.make_mesh(config, devices)
  seq_len = config.image_size**2
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len), jnp.int32,
                                          sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=batch_sharding)}
  warmup = train_state.warmup_steps(config)
  model, _, tx = train_state.model_and_optimizer(config, warmup)
  abstract, shardings = train_state.abstract_train_state(model, tx, mesh, config)
  step_fn = train.jit_train_step(config, model, mesh, shardings)
  lr_values = train_state.lr_args(config, warmup)  # host numbers: compile-only devices hold none
  lr_args = jax.ShapeDtypeStruct(lr_values.shape, lr_values.dtype,
                                 sharding=sharding.replicated(mesh))
  params_b = per_device_bytes(abstract.params, shardings.params)
  opt_b = per_device_bytes(abstract.opt_state, shardings.opt_state)
  attention = model_lib.attention_lib.resolve(model.cfg.attention, model.cfg.compute_dtype,
                                              platform, kind)
  chip, budget = memory_budget(devices[0], hbm_gib, gpu_mem_fraction, reserved_gib=(
      chips.CUDNN_WORKSPACE_GIB if platform == "gpu" and attention == "cudnn" else 0.0))
  usable_gib = budget["usable_gib"]

  n_layers = config.model.num_layers
  model_flops = (flops.train_flops_per_token_of(model.cfg) * config.batch_size * seq_len
                 / len(devices))
  out = {
      "devices": len(devices),
      "device_kind": kind,
      "compiler": f"XLA:{platform.upper()}",
      "mesh": dict(mesh.shape),
      "parameters": model_lib.count_params(abstract.params),
      "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      "attention": attention,
      "params_gib_per_device": params_b / GIB,
      "optimizer_gib_per_device": opt_b / GIB,
      # A resume restores the checkpoint straight into the sharded state: one train state.
      "restore_peak_gib_per_device": (params_b + opt_b) / GIB,
      **budget,
      "model_tflop_per_device": model_flops / 1e12,
  }

  if params_b + opt_b > usable_gib * GIB:  # no compile can make this fit
    out.update({"fits": False, "compile_s": 0.0, "compiler_says": (
        f"parameters and optimizer state alone take {(params_b + opt_b) / GIB:.3g} GiB per "
        f"device, over the {usable_gib:.3g} GiB usable (not compiled)")})
    return out
  with sharding.use(mesh, config):
    t0 = time.time()
    try:
      compiled = step_fn.lower(abstract, batch, lr_args).compile()
    except Exception as e:  # pylint: disable=broad-except
      if "cuDNN not found" in str(e):
        raise errors.FlagError(
            "attention 'cudnn' (what 'auto' picks on NVIDIA GPUs in bfloat16) needs cuDNN to "
            "compile: pip install --no-deps 'nvidia-cudnn-cu12>=9.8,<10', or plan with "
            "--config.model.attention=pallas_gpu.") from e
      message = out_of_memory(e)
      if message is None:
        raise
      out.update({"fits": False, "compiler_says": message, "compile_s": time.time() - t0})
      return out
  out["compile_s"] = time.time() - t0
  temp_b, args_b = device_bytes(compiled.memory_analysis())
  total = max(args_b, params_b + opt_b) + temp_b
  out.update({"temp_gib_per_device": temp_b / GIB, "total_gib_per_device": total / GIB,
              "hbm_headroom": 1.0 - total / (usable_gib * GIB),
              "fits": total <= usable_gib * GIB})

  if eval_forward:
    # The evaluation forward (bits/dim, features): parameters only, no optimizer or gradients.
    eval_fn = jax.jit(
        lambda p, b: objectives.masked_loss_sums(
            model_lib.make_apply_fn(model), p, b, jax.random.PRNGKey(config.seed),
            objective=config.objective, mask_prob=config.mask_prob),
        in_shardings=(shardings.params, batch_sharding), out_shardings=sharding.replicated(mesh))
    eval_batch = dict(batch, mask=jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_,
                                                       sharding=batch_sharding))
    with sharding.use(mesh, config):
      t0 = time.time()
      try:
        eval_compiled = eval_fn.lower(abstract.params, eval_batch).compile()
        eval_temp_b = device_bytes(eval_compiled.memory_analysis())[0]
        out["eval_total_gib_per_device"] = (params_b + eval_temp_b) / GIB
      except Exception as e:  # pylint: disable=broad-except
        if out_of_memory(e) is None:
          raise
        out["eval_total_gib_per_device"] = float("inf")
      out["eval_compile_s"] = time.time() - t0

  if costs:
    kernel_flops = 0.0
    if attention in ("splash", "cudnn", "pallas_gpu"):
      # A kernel is a custom call whose FLOPs XLA does not see: add the model's count of
      # them (a causal kernel skips the blocks above the diagonal, as that count assumes).
      m = model.cfg
      kernel_flops = (flops.attention_train_flops_per_token(n_layers, m.width, m.seq_len,
                                                            m.causal)
                      * config.batch_size * seq_len / len(devices))
    out.update(compiled_costs(compiled, list(mesh.devices.flat), chip, model_flops,
                              kernel_flops))
  return out


def cost_lines(p: dict, per: str) -> list:
  """The report's lines of FLOPs, HBM traffic and bytes sent per link (`per`: what they are
  counted over, e.g. "per device and step")."""
  comm = ", ".join(f"{v:.3g} GB over {LINK_NAMES[k]}"
                   for k, v in p["comm_gb_per_device"].items()) or "nothing"
  ratio = f" ({p['flop_ratio']:.2f}x)" if "flop_ratio" in p else ""
  lines = [f"  {per}: {p['model_tflop_per_device']:.3g} model TFLOP, "
           f"{p['compiler_tflop_per_device']:.3g} in the compiled program{ratio}, "
           f"{p['hbm_gb_per_device']:.3g} GB of HBM traffic; sends {comm}"]
  if p["loops_counted_once"]:
    lines.append(f"  ({p['loops_counted_once']} loop(s) whose trip count could not be read "
                 "are counted once)")
  return lines


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
  lines = [
      f"{p['parameters']:,} parameters on {p['devices']} x {p['device_kind']} ({mesh}); global "
      f"batch {p['batch_size']} in {p['grad_accum_steps']} micro-batch(es), remat "
      f"{p['remat_policy']}, compute {p['dtype']}, attention {p['attention']}; figures from "
      f"{p['compiler']}",
  ]
  usable = (f"{p['usable_gib']:.1f} GiB usable of {p['hbm_gib']:g} GiB per device (jax's "
            f"{100 * p['gpu_mem_fraction']:.0f}% memory pool; the CUDA context and NCCL buffers "
            "live in the rest" + (", a cuDNN workspace is set aside" if p["attention"] == "cudnn"
                                  else "") + ")"
            if "gpu_mem_fraction" in p else f"{p['hbm_gib']:g} GiB per device")
  if "compiler_says" in p:
    lines += [
        f"  DOES NOT FIT in {usable}: " + (
            f"the compiler refused the train step after {p['compile_s']:.0f} s: "
            if p["compile_s"] else "") + p["compiler_says"],
        f"  per device: parameters {p['params_gib_per_device']:.2f} GiB | optimizer "
        f"{p['optimizer_gib_per_device']:.2f} GiB; try more fsdp devices, a remat policy, "
        "more micro-batches (grad_accum_steps), bfloat16, or a larger slice",
    ]
    return "\n".join(lines)
  verdict = "fits" if p["fits"] else "DOES NOT FIT"
  lines += [
      f"  per device: parameters {p['params_gib_per_device']:.2f} GiB | optimizer "
      f"{p['optimizer_gib_per_device']:.2f} GiB | activations & temporaries "
      f"{p['temp_gib_per_device']:.2f} GiB | total {p['total_gib_per_device']:.2f} GiB",
      f"  {verdict} in {usable} ({100 * p['hbm_headroom']:.0f}% headroom; train step compiled "
      f"in {p['compile_s']:.0f} s)",
      f"  restore peak {p['restore_peak_gib_per_device']:.2f} GiB per device (one train state: "
      "a checkpoint is read into its shards, nothing is allocated before it)",
  ]
  if "eval_total_gib_per_device" in p:
    lines.append(f"  evaluation forward: {p['eval_total_gib_per_device']:.2f} GiB per device "
                 f"(parameters and temporaries; compiled in {p['eval_compile_s']:.0f} s)")
  if "compiler_tflop_per_device" in p:
    lines += cost_lines(p, "per device and step")
  if "roofline_step_s" in p:
    lines.append(
        f"  roofline on {p['chip']}: step >= {1e3 * p['roofline_step_s']:.0f} ms "
        f"({p['bound_by']}-bound: compute {1e3 * p['compute_bound_s']:.0f} ms, HBM "
        f"{1e3 * p['memory_bound_s']:.0f} ms, communication {1e3 * p['comm_bound_s']:.0f} ms; "
        f"{1e3 * p['serial_step_s']:.0f} ms without overlap), MFU <= "
        f"{100 * p['mfu_bound']:.0f}% ({p['flops_used']}'s FLOP count)")
  return "\n".join(lines)
