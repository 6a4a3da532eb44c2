"""Memory and speed plan of the sampler (`decoding.sample`) on devices you may not have.

`plan(config, batch, devices=...)` compiles the key/value-cached sampler of a next-pixel config
for `batch` unconditional images at once, on the config's mesh over the devices (compile-only
TPU or GPU devices from `planner.topology_devices`, or the current ones), with the parameters
laid out as training lays them out: images over data x fsdp, heads over tensor. Nothing is
allocated. It returns, per device: the parameters, the key/value cache (2 x layers x images x
positions x width in the compute dtype, split like the images and heads), the compiler's
temporaries (which hold the cache) and whether it all fits; and, read from the compiled program
with every decoding loop counted as often as it runs (hlo_cost.py), the FLOPs, HBM traffic and
bytes sent per link of drawing the whole batch, with the roofline time (chips.py) and the
pixels/s and images/s it bounds. The TPU and GPU compilers turn the attention's matrix-vector
products (one query per image and step) into multiply-reduce fusions, which hlo_cost does not
count as matmuls: the compiled count is the weights' matmuls, a little under the model's, and
the roofline takes the larger of the two. The roofline leaves out what a step costs beyond its
FLOPs and bytes (kernel launches, loop overhead), which at small batches can dominate a real
step.
"""

from igpt_jax import errors
from igpt_jax import planner


def plan(config, batch: int, hbm_gib: float | None = None, devices=None, costs: bool = True,
         gpu_mem_fraction: float = 0.75) -> dict:
  """The sampler's figures for `batch` images of `config` on `devices` (see the module doc)."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import decoding  # pylint: disable=g-import-not-at-top
  from igpt_jax import flops  # pylint: disable=g-import-not-at-top
  from igpt_jax import kv_cache  # pylint: disable=g-import-not-at-top
  from igpt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import sharding  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top

  devices = list(jax.devices() if devices is None else devices)
  platform = devices[0].platform
  chip, budget = planner.memory_budget(devices[0], hbm_gib, gpu_mem_fraction)
  usable_gib = budget["usable_gib"]
  config_lib.validate(config, len(devices), platform=platform)
  if config.objective != "next_pixel":
    raise errors.FlagError(
        f"--sample_batch: config.objective={config.objective!r} is sampled by iterative "
        "infilling (full forward passes, no key/value cache); the sampler plan is for "
        "next-pixel models. Plan its evaluation forward with the train-step plan instead.")
  mesh = sharding.make_mesh(config, devices)
  image_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch <= 0 or batch % image_shards:
    raise errors.FlagError(
        f"--sample_batch={batch}: must be a positive multiple of the mesh's data x fsdp size "
        f"({image_shards}), over which the images are split.")
  model, _, tx = train_state.model_and_optimizer(config, train_state.warmup_steps(config))
  model_cfg = model.cfg
  abstract, shardings = train_state.abstract_train_state(model, tx, mesh, config)
  params_b = planner.per_device_bytes(abstract.params, shardings.params)
  n = model_cfg.seq_len
  heads_split = mesh.shape["tensor"] if model_cfg.num_heads % mesh.shape["tensor"] == 0 else 1
  cache_b = kv_cache.bytes_per_image(model_cfg) * (batch // image_shards) // heads_split
  out = {
      "program": "sampler",
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "compiler": f"XLA:{platform.upper()}",
      "mesh": dict(mesh.shape),
      "parameters": model_lib.count_params(abstract.params),
      "sample_batch": batch,
      "image_size": config.image_size,
      "positions": n,
      "decoding_block": decoding.default_block(n),
      "dtype": config.model.dtype,
      "params_gib_per_device": params_b / planner.GIB,
      "kv_cache_gib_per_device": cache_b / planner.GIB,
      **budget,
  }

  batch_sharding = sharding.batch_sharding(mesh)
  prefix = jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  # group=batch: the whole batch at each step, as on accelerators (`decoding.default_group`
  # would pick for this process's own CPU).
  draw = jax.jit(lambda p, r, x: decoding.sample(model_cfg, p, r, x, group=batch),
                 in_shardings=(shardings.params, sharding.replicated(mesh), batch_sharding),
                 out_shardings=batch_sharding)
  with sharding.use(mesh, config):
    t0 = time.time()
    try:
      compiled = draw.lower(abstract.params, rng, prefix).compile()
    except Exception as e:  # pylint: disable=broad-except
      message = planner.out_of_memory(e)
      if message is None:
        raise
      out.update({"fits": False, "compiler_says": message, "compile_s": time.time() - t0})
      return out
  out["compile_s"] = time.time() - t0
  temp_b = planner.device_bytes(compiled.memory_analysis())[0]
  total = params_b + temp_b
  out.update({"temp_gib_per_device": temp_b / planner.GIB,
              "total_gib_per_device": total / planner.GIB,
              "hbm_headroom": 1.0 - total / (usable_gib * planner.GIB),
              "fits": total <= usable_gib * planner.GIB})
  if costs:
    model_flops = flops.sample_flops_per_token_of(model_cfg) * batch * n / len(devices)
    out.update(planner.compiled_costs(compiled, list(mesh.devices.flat), chip, model_flops))
    if chip is not None:
      # The roofline's "step" is the whole batch here; a decoding step is one pixel of each.
      seconds = out.pop("roofline_step_s")
      out.pop("serial_step_s")
      out.update({"roofline_batch_s": seconds,
                  "roofline_step_ms": 1e3 * seconds / n,
                  "pixels_per_s_bound": batch * n / seconds if seconds else float("inf"),
                  "images_per_s_bound": batch / seconds if seconds else float("inf")})
  return out


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
  size = p["image_size"]
  lines = [
      f"sampler of {p['parameters']:,} parameters on {p['devices']} x {p['device_kind']} "
      f"({mesh}): {p['sample_batch']} images of {size}x{size} ({p['positions']:,} pixels each, "
      f"decoded in blocks of {p['decoding_block']}) at a time, compute {p['dtype']}; figures "
      f"from {p['compiler']}"]
  usable = (f"{p['usable_gib']:.1f} GiB usable of {p['hbm_gib']:g} GiB per device (jax's "
            f"{100 * p['gpu_mem_fraction']:.0f}% memory pool)" if "gpu_mem_fraction" in p
            else f"{p['hbm_gib']:g} GiB per device")
  if "compiler_says" in p:
    lines.append(f"  DOES NOT FIT in {usable}: the compiler refused it after "
                 f"{p['compile_s']:.0f} s: {p['compiler_says']}; try fewer images at a time")
    return "\n".join(lines)
  lines += [
      f"  per device: parameters {p['params_gib_per_device']:.2f} GiB | key/value cache "
      f"{p['kv_cache_gib_per_device']:.2f} GiB | temporaries (the cache included) "
      f"{p['temp_gib_per_device']:.2f} GiB | total {p['total_gib_per_device']:.2f} GiB",
      f"  {'fits' if p['fits'] else 'DOES NOT FIT'} in {usable} ({100 * p['hbm_headroom']:.0f}% "
      f"headroom; compiled in {p['compile_s']:.0f} s)",
  ]
  if "compiler_tflop_per_device" in p:
    lines += planner.cost_lines(p, "per device for the batch")
  if "roofline_batch_s" in p:
    lines.append(
        f"  roofline on {p['chip']}: the batch takes >= {p['roofline_batch_s']:.3g} s "
        f"({p['bound_by']}-bound; compute {p['compute_bound_s']:.3g} s, HBM "
        f"{p['memory_bound_s']:.3g} s), a step (one pixel of every image) >= "
        f"{p['roofline_step_ms']:.3g} ms: at most {p['pixels_per_s_bound']:,.0f} pixels/s, "
        f"{p['images_per_s_bound']:.3g} images/s on these {p['devices']} devices (per-step "
        "launch and loop overheads not included)")
  return "\n".join(lines)
