r"""Images/s of the key/value-cached sampler beside transformers' ImageGPT `generate`.

In one run, for each model shape, image size and batch: the same random weights (exported to
transformers through `igpt_jax.weights.to_hf_state`) draw `batch` unconditional images with
igpt_jax's sampler (`decoding.sample`) and with transformers' `generate(do_sample=True,
top_k=0, use_cache=True)` (PyTorch, its own key/value cache); images/s of each and their
ratio, and how many images the sampler decodes together at each step (`decoding.default_group`:
on a CPU, groups whose key/value cache stays in the processor's cache). Compile time is excluded
(one warm-up call, which also checks that the seed draws the same images again); each figure is
the median of --repeats calls. `--naive` adds the release's full-recompute sampler (slow:
O(n^2) work per image).

Then the cost of one decoding step at two positions (p = N/8 and 7N/8) of the largest size:
the time of the block that holds each position divided by its length.

  python bench/sampling.py                                  # the bench/README.md table
  python bench/sampling.py --sizes=16,32 --batches=4 --models=2x64
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from igpt_jax import decoding
from igpt_jax import kv_cache
from igpt_jax import model as model_lib
from igpt_jax import weights


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_model(layers, width, heads, palette, seq_len):
  cfg = model_lib.ModelConfig(vocab_size=palette, seq_len=seq_len, num_layers=layers,
                              width=width, num_heads=heads)
  m = model_lib.IGPT(cfg)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0),
                                jnp.zeros((1, seq_len), jnp.int32))["params"])
  # The output head is zero at init (uniform colors); random values make the images depend on
  # every earlier pixel, as a trained model's do.
  params["wtet"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), params["wtet"].shape)
  return cfg, params


def torch_generate(params, cfg, batch, threads):
  """A callable drawing `batch` images with transformers' generate, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if threads:
    torch.set_num_threads(threads)
  hf_cfg = transformers.ImageGPTConfig(**{
      k: v for k, v in weights.hf_config_dict(params, cfg.num_heads).items()
      if k not in ("model_type", "architectures")})
  model = transformers.ImageGPTForCausalImageModeling(hf_cfg).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.to_hf_state(params).items()},
                        strict=False)
  sos = torch.full((batch, 1), cfg.vocab_size, dtype=torch.long)

  def generate():
    with torch.no_grad():
      out = model.generate(input_ids=sos, max_length=cfg.seq_len + 1, do_sample=True, top_k=0,
                           use_cache=True, pad_token_id=0)
    assert out.shape == (batch, cfg.seq_len + 1)
    return out

  return generate


def step_costs(cfg, params, batch, repeats, group=0):
  """Seconds per decoding step at p = N/8 and p = 7N/8: the time of the block holding p (its
  whole loop, jitted alone after the blocks before it) over its length."""
  n = cfg.seq_len
  block = decoding.default_block(n)
  costs = {}
  for p in (n // 8, 7 * n // 8):
    lo = p // block * block
    hi = min(n, lo + block)

    run_block = jax.jit(functools.partial(
        decoding.draw_block, cfg, kv_cache.for_decoding(params, cfg), jax.random.PRNGKey(0),
        lo=lo, hi=hi, prefix_len=0, cfg=decoding.SamplingConfig(), group=group))
    carry = (jnp.zeros((batch, n), jnp.int32), kv_cache.empty(cfg, batch, lo))
    jax.block_until_ready(run_block(carry))
    costs[p] = median_time(lambda: jax.block_until_ready(run_block(carry)), repeats) / (hi - lo)
  return costs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="16,32,64", help="image sizes, comma separated")
  parser.add_argument("--batches", default="4,32", help="batch sizes, comma separated")
  parser.add_argument("--models", default="2x64,8x256", help="LAYERSxWIDTH, comma separated")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--palette", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--naive", action="store_true", help="also time the naive sampler")
  parser.add_argument("--whole_batch", action="store_true",
                      help="decode the whole batch at each step (no groups), for comparison")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch.set_num_threads; 0 = torch's default (one per core)")
  parser.add_argument("--max_seconds", type=float, default=600,
                      help="skip a reference call expected to take longer than this")
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{args.heads} heads, palette {args.palette}, random weights, compile excluded, median "
        f"of {args.repeats}", flush=True)
  header = (f"{'model':>6} {'image':>6} {'batch':>5} {'igpt_jax img/s':>15} "
            f"{'transformers img/s':>19} {'ratio':>7} {'same seed, same images':>23} "
            f"{'group':>6}")
  if args.naive:
    header += f" {'naive img/s':>12}"
  print(header, flush=True)
  sizes = [int(s) for s in args.sizes.split(",")]
  for model in args.models.split(","):
    layers, width = (int(x) for x in model.split("x"))
    for size in sizes:
      cfg, params = random_model(layers, width, args.heads, args.palette, size * size)
      for batch in (int(b) for b in args.batches.split(",")):
        rng = jax.random.PRNGKey(0)
        prefix = jnp.zeros((batch, cfg.seq_len), jnp.int32)
        group = batch if args.whole_batch else decoding.default_group(cfg, batch)
        draw = lambda: np.asarray(decoding.sample(cfg, params, rng, prefix, group=group))
        first = draw()  # compiles
        ours = median_time(draw, args.repeats)
        same = all(np.array_equal(first, draw()) for _ in range(1))
        ref = torch_generate(params, cfg, batch, args.torch_threads)
        theirs = float("nan")
        if ref is not None:
          t0 = time.perf_counter()
          ref()  # warm-up, and an estimate of one call
          once = time.perf_counter() - t0
          theirs = once if once * args.repeats > args.max_seconds else median_time(
              ref, args.repeats)
        line = (f"{model:>6} {size:>4}^2 {batch:>5} {batch / ours:>15.2f} "
                f"{batch / theirs:>19.2f} {theirs / ours:>6.1f}x {str(same):>23} "
                f"{group:>6}")
        if args.naive:
          apply_fn = lambda p, t, m=model_lib.IGPT(cfg): m.apply({"params": p}, t)
          naive = lambda: np.asarray(decoding.sample_naive(apply_fn, params, rng, prefix))
          naive()
          line += f" {batch / median_time(naive, args.repeats):>12.2f}"
        print(line, flush=True)

  cfg, params = random_model(2, 64, args.heads, args.palette, max(sizes) ** 2)
  batch = max(int(b) for b in args.batches.split(","))
  costs = step_costs(cfg, params, batch, args.repeats, batch if args.whole_batch else 0)
  (early, t_early), (late, t_late) = sorted(costs.items())
  print(f"\none decoding step, 2x64, {max(sizes)}^2, batch {batch}: p={early} {t_early * 1e3:.2f} "
        f"ms, p={late} {t_late * 1e3:.2f} ms ({t_late / t_early:.1f}x)", flush=True)


if __name__ == "__main__":
  main()
