r"""The paper's Figure 3 from one run: linear-probe accuracy against validation bits/dim.

  python bench/probe_curve.py WORKDIR [--evaluator=cifar10] [--out=docs/probe_curve.png]

Reads WORKDIR/metrics.jsonl of a run with an in-training linear-probe evaluator (e.g.
configs/cifar10_curve.py) and validation bits/dim at the same steps; plots each layer's test
accuracy against bits/dim (lower bits/dim = later in training, so the curve reads right to left),
the best layer's as a thick line, the concatenated-layer probe (config.eval.concat_layers) when
there is one, and the raw-pixel baseline (--raw_pixels, else the evaluator's own when it fit
one); prints the table.
"""

import argparse
import os

from matplotlib.figure import Figure

from igpt_jax import metric_writer


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--evaluator", default="cifar10")
  parser.add_argument("--raw_pixels", type=float, default=None,
                      help="raw-pixel test accuracy to draw as a baseline (0-1); default: the "
                      "evaluator's own (raw_pixel_baseline=True), if it logged one")
  parser.add_argument("--target_points", type=float, default=None,
                      help="with --raw_pixels: also draw raw pixels + this many points")
  parser.add_argument("--out", default="docs/probe_curve.png")
  args = parser.parse_args()
  prefix = f"probe/{args.evaluator}/layer"
  rows = {s: r for s, r in metric_writer.read(args.workdir).items()
          if "val_bits_per_dim" in r and any(k.startswith(prefix) for k in r)}
  steps = sorted(rows)
  layers = sorted({int(k[len(prefix):].split("/")[0]) for r in rows.values() for k in r
                   if k.startswith(prefix)})
  concat = f"probe/{args.evaluator}/concat/test_acc"
  has_concat = any(concat in r for r in rows.values())
  if args.raw_pixels is None:  # the evaluator's own baseline (raw_pixel_baseline=True)
    args.raw_pixels = next((r[f"probe/{args.evaluator}/raw_pixel_test_acc"] for r in
                            rows.values() if f"probe/{args.evaluator}/raw_pixel_test_acc" in r),
                           None)
  columns = [f"layer {l}" for l in layers] + (["layers concatenated"] if has_concat else [])
  print("| step | val bits/dim | " + " | ".join(columns) + " |")
  print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
  pct = lambda a: f"{100 * a:.1f}%" if a is not None else ""
  for s in steps:
    accs = [rows[s].get(f"{prefix}{l}/test_acc") for l in layers]
    accs += [rows[s].get(concat)] if has_concat else []
    print(f"| {s} | {rows[s]['val_bits_per_dim']:.3f} | " + " | ".join(map(pct, accs)) + " |")
  if args.raw_pixels is not None:
    print(f"| raw pixels | | {pct(args.raw_pixels)} |")
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  bpd = [rows[s]["val_bits_per_dim"] for s in steps]
  best = max(layers, key=lambda l: rows[steps[-1]].get(f"{prefix}{l}/val_acc", 0))
  for l in layers:
    acc = [100 * rows[s][f"{prefix}{l}/test_acc"] for s in steps]
    ax.plot(bpd, acc, "o-", lw=3 if l == best else 1, label=f"layer {l}")
  if has_concat:
    ax.plot(bpd, [100 * rows[s][concat] for s in steps], "s--", c="k", lw=2,
            label="layers concatenated")
  if args.raw_pixels is not None:
    ax.axhline(100 * args.raw_pixels, ls="--", c="gray", label="raw pixels")
    if args.target_points is not None:
      ax.axhline(100 * args.raw_pixels + args.target_points, ls=":", c="gray",
                 label=f"raw pixels + {args.target_points:g}")
  ax.invert_xaxis()
  ax.set_xlabel("validation bits/dim (training goes right to left)")
  ax.set_ylabel("linear probe test accuracy (%)")
  ax.set_title(f"{args.evaluator}: probe accuracy vs. generative loss, steps {steps[0]}-"
               f"{steps[-1]}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
