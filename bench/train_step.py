r"""Training-step throughput and MFU of igpt_jax beside transformers' ImageGPT (PyTorch).

  python bench/train_step.py                                   # the CPU reference shape
  python bench/train_step.py --config=configs/s.py --config.batch_size=32 \
      --config.model.dtype=bfloat16 --torch=false              # iGPT-S on an accelerator

In one run it measures:
  * the device's own peak matmul FLOP/s (large jitted matmuls in float32 and in bfloat16, the
    best of 10 runs);
  * the jitted igpt_jax train step of --config (random tokens, the real optimizer, donated
    state): compile time, then the median step time of --steps steps after --warmup steps,
    tokens/s, model TFLOP/s (igpt_jax/flops.py states the count), MFU against the measured peak
    of the compute dtype, and peak memory (compiled memory analysis; the allocator's peak where
    the device reports one);
  * with PyTorch and transformers installed (and --torch), transformers'
    ImageGPTForCausalImageModeling at the same shape and batch: AdamW, dropout off, train mode,
    same median-of-steps timing, and the ratio of the two.

Figures are per run; record them in bench/README.md with the date, machine and commit.
"""

import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "cpu_reference.py"),
                                "The config whose train step to measure.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("torch", True, "Also time transformers' ImageGPT (if PyTorch is installed).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = one per CPU core.")
flags.DEFINE_integer("peak_size", 0, "Matmul side for the peak FLOP/s probe; 0 = 1024 and 2048 "
                     "on a CPU, 4096 and 8192 on an accelerator.")

GIB = 1024**3


def median_time(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_matmul_flops(dtype: str, sizes) -> float:
  """Peak FLOP/s of a jitted n x n x n matmul in `dtype` on the first device: the best of 10
  runs at each side in `sizes`, so a noisy machine does not understate the peak (and so
  overstate MFU)."""
  import jax  # pylint: disable=g-import-not-at-top
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    for _ in range(10):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
  return best


def bench_jax(config, steps: int, warmup: int) -> dict:
  """Times the igpt_jax train step of `config` on random tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import flops  # pylint: disable=g-import-not-at-top
  from igpt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import sharding  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  warmup = max(config.warmup_steps, 1)
  model, _, tx = train_state.model_and_optimizer(config, warmup)
  state, shardings = train_state.create_train_state(model, tx, mesh, config, seed=0)
  step_fn = train.jit_train_step(config, model, mesh, shardings)
  lr_args = train_state.lr_args(config, warmup, mesh)
  seq_len = config.image_size**2
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
      {"tokens": rng.integers(0, config.palette_size, (config.batch_size, seq_len), np.int32),
       "label": np.zeros((config.batch_size,), np.int32)}, mesh)

  with sharding.use(mesh, config):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, lr_args).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def step():
      holder[0], metrics = compiled(holder[0], batch, lr_args)
      jax.block_until_ready(metrics["loss"])
      return metrics

    for _ in range(warmup):
      metrics = step()
    step_s = median_time(step, steps)
  loss = float(metrics["loss"]) if warmup else float("nan")
  mem = compiled.memory_analysis()
  compiled_bytes = None
  if mem is not None:
    compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  tokens = config.batch_size * seq_len
  return {
      "params": model_lib.count_params(holder[0].params),
      "tokens_per_step": tokens,
      "compile_s": compile_s,
      "step_s": step_s,
      "tokens_per_s": tokens / step_s,
      "flops_per_token": flops.train_flops_per_token_of(model.cfg),
      "compiled_bytes_per_device": compiled_bytes,
      "allocator_peak_bytes": stats.get("peak_bytes_in_use"),
      "loss": loss,
  }


def bench_torch(config, steps: int, warmup: int, threads: int) -> dict | None:
  """transformers' ImageGPT training step at the shape and batch of `config`, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(0)
  seq_len = config.image_size**2
  hf_config = transformers.ImageGPTConfig(
      vocab_size=config.palette_size + 1, n_positions=seq_len, n_embd=config.model.width,
      n_layer=config.model.num_layers, n_head=config.model.num_heads,
      n_inner=config.model.mlp_ratio * config.model.width,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.ImageGPTForCausalImageModeling(hf_config).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                          betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                          weight_decay=config.weight_decay)
  # The sos id first, then the first seq_len - 1 pixels: transformers shifts labels inside.
  ids = torch.randint(0, config.palette_size, (config.batch_size, seq_len), device=device)
  ids[:, 0] = config.palette_size
  autocast = config.model.dtype == "bfloat16"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  for _ in range(max(warmup, 1)):
    step()
  step_s = median_time(step, steps)
  return {"version": f"torch {torch.__version__}, transformers {transformers.__version__}",
          "threads": torch.get_num_threads(), "step_s": step_s,
          "tokens_per_s": config.batch_size * seq_len / step_s}


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "-C", _HERE, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  c = FLAGS.config
  device = jax.devices()[0]
  sizes = [FLAGS.peak_size] if FLAGS.peak_size else (
      [1024, 2048] if device.platform == "cpu" else [4096, 8192])
  peak = {d: peak_matmul_flops(d, sizes) for d in ("float32", "bfloat16")}
  print(f"igpt_jax {_git_commit()} | jax {jax.__version__} | {jax.device_count()} x "
        f"{device.device_kind} ({device.platform}) | {os.cpu_count()} CPU cores | "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"peak matmul (best of sides {sizes}, one device): float32 "
        f"{peak['float32'] / 1e9:,.1f} GFLOP/s | bfloat16 {peak['bfloat16'] / 1e9:,.1f} GFLOP/s")
  print(f"shape: {c.model.num_layers} layers x {c.model.width}, {c.model.num_heads} heads, "
        f"{c.image_size}x{c.image_size} ({c.image_size**2} tokens), palette {c.palette_size}, "
        f"global batch {c.batch_size}, {c.objective}, compute {c.model.dtype}, remat "
        f"{c.model.remat_policy}, mesh {dict(c.mesh)}")

  r = bench_jax(c, FLAGS.steps, FLAGS.warmup)
  achieved = r["flops_per_token"] * r["tokens_per_s"]
  mfu = achieved / (peak[c.model.dtype] * jax.device_count())
  mem = r["compiled_bytes_per_device"]
  alloc = r["allocator_peak_bytes"]
  print(f"igpt_jax: {r['params']:,} params | compile {r['compile_s']:.1f}s | step "
        f"{r['step_s'] * 1e3:,.1f} ms (median of {FLAGS.steps}) | {r['tokens_per_s']:,.0f} "
        f"tokens/s | {achieved / 1e12:.3f} model TFLOP/s ({r['flops_per_token'] / 1e6:.1f} "
        f"MFLOP/token) | MFU {100 * mfu:.1f}% of measured {c.model.dtype} peak | memory "
        f"{'n/a' if mem is None else f'{mem / GIB:.2f} GiB'} compiled"
        f"{'' if alloc is None else f', {alloc / GIB:.2f} GiB allocator peak'} per device | "
        f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB | loss "
        f"{r['loss']:.3f}")
  if not FLAGS.torch:
    return
  t = bench_torch(c, FLAGS.steps, FLAGS.warmup, FLAGS.torch_threads)
  if t is None:
    print("PyTorch reference: skipped (torch/transformers not installed; "
          "pip install -e '.[test]' has them)")
    return
  torch_mfu = r["flops_per_token"] * t["tokens_per_s"] / (peak[c.model.dtype] *
                                                          jax.device_count())
  print(f"transformers ImageGPT ({t['version']}, {t['threads']} threads): step "
        f"{t['step_s'] * 1e3:,.1f} ms | {t['tokens_per_s']:,.0f} tokens/s | MFU "
        f"{100 * torch_mfu:.1f}%")
  print(f"igpt_jax / PyTorch: {r['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(_HERE))
  app.run(main)
