r"""Images/s of the key/value-cached sampler against the naive full-recompute sampler.

Both draw the same images (same model, seed and settings) in the same run, at each image size;
the cached sampler's advantage should grow with the sequence length (O(n) vs O(n^2) work per
image). Compile time is excluded (one warm-up call each); each figure is the median of --repeats.

  python bench/sampling.py                       # 16x16 and 32x32, a small model
  python bench/sampling.py --sizes=8,16,32 --layers=8 --width=256 --batch=8
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from igpt_jax import model as model_lib
from igpt_jax import decoding


def timed(fn, repeats):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="16,32", help="image sizes, comma separated")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--palette", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; model "
        f"{args.layers} layers x {args.width}, {args.heads} heads, palette {args.palette}; "
        f"batch {args.batch}")
  print(f"{'size':>6} {'tokens':>7} {'naive img/s':>12} {'cached img/s':>13} {'speed-up':>9}")
  for size in [int(s) for s in args.sizes.split(",")]:
    cfg = model_lib.ModelConfig(vocab_size=args.palette, seq_len=size * size,
                                num_layers=args.layers, width=args.width, num_heads=args.heads)
    m = model_lib.IGPT(cfg)
    params = nn.meta.unbox(m.init(jax.random.PRNGKey(0),
                                  jnp.zeros((1, cfg.seq_len), jnp.int32))["params"])
    params["wtet"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), params["wtet"].shape)
    apply_fn = lambda p, t, keep=None, m=m: m.apply({"params": p}, t, keep)
    prefix = jnp.zeros((args.batch, cfg.seq_len), jnp.int32)
    rng = jax.random.PRNGKey(0)
    naive = timed(lambda: decoding.sample_naive(apply_fn, params, rng, prefix), args.repeats)
    cached = timed(lambda: decoding.sample(cfg, params, rng, prefix), args.repeats)
    print(f"{size:>4}^2 {cfg.seq_len:>7} {args.batch / naive:>12.2f} {args.batch / cached:>13.2f} "
          f"{naive / cached:>8.1f}x", flush=True)


if __name__ == "__main__":
  main()
