r"""The README's memory table: `python -m igpt_jax.plan` for each row, printed as markdown.

  python bench/memory_plans.py            # every row (~2 minutes on a laptop CPU)
  python bench/memory_plans.py --rows=0,3 # some rows

Each row compiles the real train step on fake CPU devices from shape-only inputs (nothing is
allocated), in its own process (the fake device count is fixed when jax starts).
"""

import argparse
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (model label, devices label, device count, HBM GiB, config, overrides, settings label)
ROWS = [
    ("iGPT-L 1.36B, 32²", "8 (8×H100, 80 GB)", 8, 80, "l",
     ["mesh.data=1", "mesh.fsdp=8", "batch_size=8", "model.remat_policy=full"],
     "batch 1/device, `full` remat"),
    ("iGPT-L", "8 (8×H100)", 8, 80, "l",
     ["mesh.data=1", "mesh.fsdp=8", "batch_size=8"], "batch 1/device, `dots_saveable`"),
    ("iGPT-L", "8 (8×H100)", 8, 80, "l", ["mesh.data=1", "mesh.fsdp=8"],
     "batch 128, `dots_saveable`"),
    ("iGPT-L", "8 (8×H100)", 8, 80, "l",
     ["mesh.data=1", "mesh.fsdp=8", "grad_accum_steps=2"], "batch 128 in 2 micro-batches"),
    ("iGPT-L", "8 (8×H100)", 8, 80, "l",
     ["mesh.data=1", "mesh.fsdp=8", "model.remat_policy=full"], "batch 128, `full` remat"),
    ("iGPT-L", "256 (v4-256, 32 GiB)", 256, 32, "l",
     ["mesh.data=2", "mesh.fsdp=64", "mesh.tensor=2"], "batch 128, `dots_saveable`"),
    ("iGPT-L", "256 (v5e-256, 16 GiB)", 256, 16, "l",
     ["mesh.data=1", "mesh.fsdp=128", "mesh.tensor=2"], "batch 128, `dots_saveable`"),
    ("iGPT-XL 6.8B, 64²", "256 (v4-256)", 256, 32, "xl",
     ["mesh.data=1", "mesh.fsdp=64", "mesh.tensor=4"], "batch 64, `full`"),
    ("iGPT-XL", "64 (8 nodes × 8 H100)", 64, 80, "xl",
     ["mesh.data=1", "mesh.fsdp=16", "mesh.tensor=4", "model.dtype=bfloat16"], "batch 64, bf16"),
    ("iGPT-XL", "8 (8×H100)", 8, 80, "xl",
     ["mesh.data=1", "mesh.fsdp=8", "model.dtype=bfloat16"], "batch 64, bf16"),
]


def plan_row(row) -> str:
  model, devices_label, devices, hbm, config, overrides, settings = row
  cmd = [sys.executable, "-m", "igpt_jax.plan", f"--config=configs/{config}.py",
         f"--devices={devices}", f"--hbm_gib={hbm}", "--json"]
  cmd += [f"--config.{o}" for o in overrides]
  out = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=900)
  if out.returncode:
    return f"| {model} | {devices_label} | failed: {out.stderr.strip().splitlines()[-1]} |"
  p = json.loads(out.stdout.strip().splitlines()[-1])
  mesh = " × ".join(str(n) for n in p["mesh"].values())
  state = p["params_gib_per_device"] + p["optimizer_gib_per_device"]
  return (f"| {model} | {devices_label} | {mesh} | {settings} | {state:.2f} GiB | "
          f"{p['temp_gib_per_device']:.2f} GiB | {p['total_gib_per_device']:.2f} GiB | "
          f"{'fits' if p['fits'] else 'does not fit'} | {p['compile_s']:.0f} s |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="", help="comma-separated row numbers; all if empty")
  args = parser.parse_args()
  rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
  print("| model | devices | mesh (data × fsdp × tensor) | settings | params + Adam / device | "
        "activations & temps / device | total | verdict | compile |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(plan_row(row), flush=True)


if __name__ == "__main__":
  main()
