r"""A linear probe at ImageNet scale within a host-memory budget: synthetic features on disk.

  python bench/probe_scale.py [--n=1281167 --dim=1536 --classes=1000 --budget_gib=8 --dir=/tmp/x]

Writes an ImageNet-sized feature split (`--n` x `--dim` float16, as `features.to_disk` would, in a
memory map: 3.9 GB at the defaults) with class structure, plus validation and test splits, then
runs `probe.fit_and_select` with `max_host_bytes` set to the budget, as `python -m
igpt_jax.evaluate` does with `eval.max_host_gib`. Prints the time of each phase, the probe's
accuracy, and the peak anonymous host memory (RssAnon, sampled every 20 ms: memory-mapped file
pages are page cache, not the process's own) beside the size of the features in float32.
"""

import argparse
import os
import threading
import time

import numpy as np

from igpt_jax import probe


def rss_anon_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  return 0


class PeakSampler(threading.Thread):
  def __init__(self):
    super().__init__(daemon=True)
    self.peak, self.running = rss_anon_bytes(), True

  def run(self):
    while self.running:
      self.peak = max(self.peak, rss_anon_bytes())
      time.sleep(0.02)


def write_split(path, n, dim, centers, rng, rows=65_536):
  x = np.lib.format.open_memmap(path + "_x.npy", "w+", np.float16, (n, dim))
  y = rng.integers(0, len(centers), n).astype(np.int32)
  for a in range(0, n, rows):
    b = min(n, a + rows)
    x[a:b] = centers[y[a:b]] + rng.standard_normal((b - a, dim), np.float32)
  x.flush()
  del x
  return np.load(path + "_x.npy", mmap_mode="r"), y


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1_281_167)
  parser.add_argument("--dim", type=int, default=1536)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--budget_gib", type=float, default=8.0)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--dir", default="/tmp/igpt_probe_scale")
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  rng = np.random.default_rng(0)
  centers = (0.15 * rng.standard_normal((args.classes, args.dim))).astype(np.float32)
  t0 = time.time()
  train = write_split(os.path.join(args.dir, "train"), args.n, args.dim, centers, rng)
  val = write_split(os.path.join(args.dir, "val"), 50_000, args.dim, centers, rng)
  test = write_split(os.path.join(args.dir, "test"), 50_000, args.dim, centers, rng)
  print(f"wrote {args.n:,} x {args.dim} float16 features "
        f"({args.n * args.dim * 2 / 1e9:.1f} GB on disk) in {time.time() - t0:.0f} s", flush=True)
  sampler = PeakSampler()
  base = rss_anon_bytes()
  sampler.start()
  t0 = time.time()
  r = probe.fit_and_select(train, val, test, num_classes=args.classes, l2_grid=(1e-4,),
                           sgd_epochs=args.epochs, max_host_bytes=args.budget_gib * 2**30,
                           log=print)
  sampler.running = False
  sampler.join()
  f32 = 4 * args.n * args.dim
  print(f"probe: solver {r.solver}, streamed {r.streamed}, {r.fit.iterations} steps, "
        f"{time.time() - t0:.0f} s; val {r.val_acc:.4f} test {r.test_acc:.4f}")
  print(f"peak anonymous host memory during the probe: {(sampler.peak - base) / 2**30:.2f} GiB "
        f"above the {base / 2**30:.2f} GiB before it (budget {args.budget_gib:g} GiB; the "
        f"training features in float32 would be {f32 / 2**30:.1f} GiB)")


if __name__ == "__main__":
  main()
