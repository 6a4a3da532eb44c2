r"""Memory and speed plan of a config on devices you do not have: compile, allocate nothing.

  python -m igpt_jax.plan --config=configs/l.py --topology=v4:8x8x4 \
      [--config.mesh.fsdp=64 --config.mesh.tensor=2] [--json]
  python -m igpt_jax.plan --config=configs/xl.py --topology=h100:8x8   # 8 hosts of 8 H100s
  python -m igpt_jax.plan --config=configs/l.py --search=v5e [--max_chips=64]
  python -m igpt_jax.plan --config=configs/l.py --topology=h100:1x8 --sample_batch=64

With `--topology`, the devices are compile-only devices known to a real compiler without the
hardware: a TPU slice (v4:2x2x1 ... v4:8x8x16, v5e:2x2 ... v5e:16x16, v5p:..., v6e:...) for
libtpu's XLA:TPU compiler (`pip install -e ".[tpu]"`), or NVIDIA GPUs as hosts x GPUs per host
(h100:1x8, h200:4x8) for jax-cuda12-plugin's XLA:GPU compiler with the target configs in
igpt_jax/gpu_targets/. Without it, `--devices` fake CPU devices stand in (the CPU compiler).
`--search` tries many slices and settings (plan_search.py). `--sample_batch=N` plans the
key/value-cached sampler for N images at a time instead (sample_plan.py).

Builds the config's mesh over the devices, abstract (shape-only) train state and batch with
their shardings, lowers and compiles the real train step and the evaluation forward, and prints
the parameter count, bytes per device for parameters, optimizer state and the compiler's
temporary buffers, whether the total fits the usable HBM (`--hbm_gib` overrides the chip's; on
GPUs jax's memory pool, `--gpu_mem_fraction` of it), the peak of a resume, compile times, and,
read from the compiled program with every loop counted as often as it runs (hlo_cost.py), the
step's FLOPs, HBM traffic and bytes sent per link, with the roofline step time, what sets it and
the MFU bound they imply (chips.py). A Pallas or cuDNN attention kernel is a custom call whose
FLOPs the program does not show: the model's count of attention FLOPs is added for it. A
compile that runs out of memory is an answer ("does not fit", with the compiler's figures).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from igpt_jax import cli  # absl and the error type only: jax is not imported yet
from igpt_jax import planner  # imports no jax: devices are set up first

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config to plan for.", lock_config=True)
flags.DEFINE_string("topology", None, "A TPU topology (v5e:16x16, v4:8x8x4, v5p:4x4x4, ...) or "
                    "NVIDIA GPUs as hosts x GPUs per host (h100:1x8, h200:4x8): compile for "
                    "them with the TPU or GPU compiler ([plan] extra).")
flags.DEFINE_integer("devices", 8, "Without --topology: devices to plan for (faked on the CPU).")
flags.DEFINE_float("hbm_gib", None, "Memory per device, GiB (default: the chip's; 16 for fake "
                   "CPU devices; v5e 16, v4 32, H100 80).")
flags.DEFINE_bool("costs", True, "Read FLOPs, HBM traffic and collectives from the compiled "
                  "program and give the roofline.")
flags.DEFINE_float("gpu_mem_fraction", 0.75, "GPUs: the fraction of HBM jax's memory pool takes "
                   "(XLA_PYTHON_CLIENT_MEM_FRACTION; jax's default 0.75).")
flags.DEFINE_string("search", None, "A chip kind (v4, v5e, v5p, v6e, h100, h200): try its slices, "
                    "meshes, remat policies and micro-batch counts; print the best ranked by "
                    "chip-hours for config.total_steps.")
flags.DEFINE_list("slices", [], "With --search: only these slices (v5e:8x8,v5e:16x16).")
flags.DEFINE_integer("max_chips", 0, "With --search: the largest slice to try, in chips.")
flags.DEFINE_float("search_budget_s", 1800, "With --search: stop compiling new candidates after "
                   "this many seconds.")
flags.DEFINE_float("min_headroom", 0.1, "With --search: the share of usable HBM a candidate "
                   "must leave free to count as fitting.")
flags.DEFINE_string("cache_dir", None, "With --search: where compiled plans are cached "
                    "(default ~/.cache/igpt_jax/plans).")
flags.DEFINE_integer("sample_batch", 0, "Plan the key/value-cached sampler instead of the train "
                     "step: memory, cache and a pixels/s bound for this many images at a time "
                     "(next-pixel configs).")
flags.DEFINE_bool("json", False, "Print the figures as one JSON object instead of text.")
flags.mark_flags_as_required(["config"])
flags.register_validator("devices", lambda n: n > 0, "--devices must be a positive count.")
flags.register_validator("gpu_mem_fraction", lambda f: 0 < f <= 1,
                         "--gpu_mem_fraction must be in (0, 1].")
flags.register_validator("hbm_gib", lambda g: g is None or g > 0,
                         "--hbm_gib must be > 0 (memory per device: v5e 16, v4 32, H100 80).")

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.search and FLAGS.topology:
    raise app.UsageError("--search tries many slices; give --slices instead of --topology.")
  if FLAGS.search and FLAGS.sample_batch:
    raise app.UsageError("--search ranks train-step plans; plan the sampler on one --topology.")
  if FLAGS.sample_batch < 0:
    raise app.UsageError("--sample_batch must be >= 0 (0 plans the train step).")
  planner.use_fake_devices(1 if FLAGS.topology or FLAGS.search else FLAGS.devices)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # optax's and orbax's INFO lines

  def search_and_print(config):
    from igpt_jax import plan_search  # pylint: disable=g-import-not-at-top
    config_path = config_flags.get_config_filename(FLAGS["config"])
    print(f"Searching {FLAGS.search} slices for {config_path} (batch {config.batch_size}, "
          f"{config.total_steps:,} steps; budget {FLAGS.search_budget_s:.0f} s):",
          file=sys.stderr, flush=True)
    result = plan_search.search(
        config, FLAGS.search, devices_fn=planner.topology_devices, slices=FLAGS.slices,
        plan_fn=lambda c, **kw: planner.plan(
            c, FLAGS.hbm_gib, gpu_mem_fraction=FLAGS.gpu_mem_fraction, **kw),
        max_chips=FLAGS.max_chips, budget_s=FLAGS.search_budget_s,
        min_headroom=FLAGS.min_headroom,
        cache_dir=FLAGS.cache_dir or plan_search.default_cache_dir(),
        cache_salt=f"hbm_gib={FLAGS.hbm_gib} gpu_mem_fraction={FLAGS.gpu_mem_fraction}",
        log=lambda m: print(m, file=sys.stderr, flush=True))
    if FLAGS.json:
      print(json.dumps(result))
    else:
      print(plan_search.report(result, config_path, plan_search.config_overrides(sys.argv),
                               config.total_steps))

  if FLAGS.search:
    cli.run_reporting_user_errors(search_and_print, FLAGS.config)
    return

  def plan_and_print(config):
    devices = planner.topology_devices(FLAGS.topology) if FLAGS.topology else None
    if FLAGS.sample_batch:
      from igpt_jax import sample_plan  # pylint: disable=g-import-not-at-top
      p = sample_plan.plan(config, FLAGS.sample_batch, FLAGS.hbm_gib, devices=devices,
                           costs=FLAGS.costs, gpu_mem_fraction=FLAGS.gpu_mem_fraction)
      print(json.dumps(p) if FLAGS.json else sample_plan.format_plan(p), flush=True)
      return
    p = planner.plan(config, FLAGS.hbm_gib, devices=devices, costs=FLAGS.costs,
                     gpu_mem_fraction=FLAGS.gpu_mem_fraction)
    print(json.dumps(p) if FLAGS.json else planner.format_plan(p), flush=True)

  cli.run_reporting_user_errors(plan_and_print, FLAGS.config)


if __name__ == "__main__":
  cli.run(main)
