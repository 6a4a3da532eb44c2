r"""The raw-pixel baseline of the linear probe on a whole dataset, with its convergence.

  python bench/raw_pixel_probe.py --dataset=cifar10 [--data_dir=DIR] [--image_size=32]
  python bench/raw_pixel_probe.py --dataset=/data/cifar10_jpeg --data_dir=/tmp/tfds  # a folder

The baseline the paper's probes are read against: logistic regression on the standardised,
flattened RGB pixels (3,072 features at 32x32), fit by `probe.fit_and_select` with `python -m
igpt_jax.evaluate`'s defaults (the train split's tail `--holdout_fraction` held out to choose L2
on, `config.eval.probe_l2` swept and widened once at an edge, L-BFGS capped at `--max_iters`).
Prints, for every L2 swept, the validation and test accuracy, the iterations, the final gradient
norm and whether the fit converged before its cap, then the chosen probe; `--out` writes the same
as JSON.
"""

import argparse
import json
import time

from igpt_jax import config_lib
from igpt_jax import features as features_lib
from igpt_jax import input_pipeline
from igpt_jax import probe


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="cifar10",
                      help="tfds name or a <split>/<label>/<image> folder")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--holdout_fraction", type=float, default=0.1)
  parser.add_argument("--max_iters", type=int, default=None,
                      help="L-BFGS cap (default config.eval.probe_max_iters)")
  parser.add_argument("--out", default=None, help="JSON of the results")
  args = parser.parse_args()
  config = config_lib.base_config()
  config.dataset, config.data_dir = args.dataset, args.data_dir
  config.image_size, config.holdout_fraction = args.image_size, args.holdout_fraction
  max_iters = args.max_iters or config.eval.probe_max_iters
  t0 = time.time()
  source = input_pipeline.open_source(config)
  splits = [features_lib.raw_pixels(config, source, s) for s in ("train", "validation", "test")]
  print(f"raw pixels of {args.dataset} at {args.image_size}x{args.image_size}: "
        + ", ".join(f"{s} {x.shape}" for s, (x, _) in zip(("train", "validation", "test"), splits))
        + f" ({time.time() - t0:.0f} s)", flush=True)
  t0 = time.time()
  r = probe.fit_and_select(*splits, num_classes=source.num_classes,
                           l2_grid=tuple(config.eval.probe_l2), max_iters=max_iters)
  scaler = probe.Standardizer.fit(splits[0][0])  # fit_and_select's, for each strength's test
  rows = []
  for l2, fit in sorted(r.fits.items()):
    rows.append({"l2": l2, "val_acc": r.val_acc_by_l2[l2],
                 "test_acc": probe.accuracy(fit.params, *splits[2], transform=scaler),
                 **fit.record()})
    print(f"l2 {l2:<7g} val {rows[-1]['val_acc']:.4f} test {rows[-1]['test_acc']:.4f} | "
          f"{fit.iterations} iterations, gradient norm {fit.grad_norm:.2g}, "
          f"{'converged' if fit.converged else 'NOT converged (cap)'}")
  print(f"chosen l2 {r.l2:g}: test accuracy {r.test_acc:.4f}, "
        f"{'converged' if r.fit.converged else 'NOT converged'} ({r.fit.iterations} "
        f"iterations); {len(r.unconverged_l2)} of {len(r.fits)} fits hit the cap; "
        f"{time.time() - t0:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"dataset": args.dataset, "image_size": args.image_size, "max_iters": max_iters,
                 "num_train": len(splits[0][1]), "chosen_l2": r.l2, "fits": rows}, f, indent=2)

if __name__ == "__main__":
  main()
