r"""The README's memory table: `python -m igpt_jax.plan` for each row, printed as markdown.

  python bench/memory_plans.py            # every row (TPU rows: minutes each on a laptop CPU)
  python bench/memory_plans.py --rows=0,3 # some rows

TPU rows compile the real train step for a TPU topology with the XLA:TPU compiler (libtpu, the
[tpu] extra; no TPU needed), GPU rows for H100 hosts with the XLA:GPU compiler (jax-cuda12-plugin
and a target config; no GPU needed). Each carries the roofline: FLOPs, HBM bytes and bytes sent
per step, read from the compiled program, the step-time bound and what sets it, and the MFU
bound. Nothing is allocated: shape-only inputs. Each row runs in its own process, with XLA's warnings shown, and
says whether the SPMD partitioner reported an "involuntary full rematerialization".
"""

import argparse
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (model label, devices label, target, config, overrides, settings label); target is a
# `--topology` (TPU slice, or GPU hosts x GPUs per host).
ROWS = [
    ("iGPT-L 1.36B, 32²", "v5e-256 (256 chips, 16 GiB)", "v5e:16x16", "l",
     ["mesh.data=1", "mesh.fsdp=128", "mesh.tensor=2"], "batch 128, `dots_saveable`, f32"),
    ("iGPT-L", "v5e-256", "v5e:16x16", "l",
     ["mesh.data=1", "mesh.fsdp=128", "mesh.tensor=2", "model.dtype=bfloat16"],
     "batch 128, `dots_saveable`, bf16"),
    # Mesh axes are products of whole torus axes (4x4x4: 16 = 4 x 4, not 32).
    ("iGPT-L", "v4-128 (64 chips, 32 GiB)", "v4:4x4x4", "l",
     ["mesh.data=1", "mesh.fsdp=16", "mesh.tensor=4"], "batch 128, `dots_saveable`, f32"),
    ("iGPT-L", "v4-512 (256 chips)", "v4:8x8x4", "l",
     ["mesh.data=1", "mesh.fsdp=64", "mesh.tensor=4"], "batch 128, `dots_saveable`, f32"),
    ("iGPT-L", "v5p-128 (64 chips, 95 GiB)", "v5p:4x4x4", "l",
     ["mesh.data=1", "mesh.fsdp=16", "mesh.tensor=4"], "batch 128, `dots_saveable`, f32"),
    ("iGPT-XL 6.8B, 64²", "v5p-256 (128 chips)", "v5p:4x4x8", "xl",
     ["mesh.data=1", "mesh.fsdp=32", "mesh.tensor=4"], "batch 64, `full`, f32"),
    ("iGPT-XL", "v4-512 (256 chips)", "v4:8x8x4", "xl",
     ["mesh.data=1", "mesh.fsdp=64", "mesh.tensor=4"], "batch 64, `full`, f32"),
    ("iGPT-XL", "v5e-256", "v5e:16x16", "xl",
     ["mesh.data=1", "mesh.fsdp=64", "mesh.tensor=4", "model.dtype=bfloat16"],
     "batch 64, `full`, bf16"),
    ("iGPT-L 1.36B, 32²", "8×H100 (80 GB)", "h100:1x8", "l",
     ["mesh.data=1", "mesh.fsdp=8", "batch_size=8", "model.remat_policy=full"],
     "batch 1/device, `full` remat"),
    ("iGPT-L", "8×H100", "h100:1x8", "l", ["mesh.data=1", "mesh.fsdp=8"],
     "batch 128, `dots_saveable`"),
    ("iGPT-L", "8×H100", "h100:1x8", "l",
     ["mesh.data=1", "mesh.fsdp=8", "grad_accum_steps=2"], "batch 128 in 2 micro-batches"),
    ("iGPT-L", "8×H100", "h100:1x8", "l",
     ["mesh.data=1", "mesh.fsdp=8", "model.remat_policy=full"], "batch 128, `full` remat"),
    ("iGPT-XL", "64 (8 nodes × 8 H100)", "h100:8x8", "xl",
     ["mesh.data=1", "mesh.fsdp=16", "mesh.tensor=4", "model.dtype=bfloat16"], "batch 64, bf16"),
    ("iGPT-XL", "8×H100", "h100:1x8", "xl",
     ["mesh.data=1", "mesh.fsdp=8", "model.dtype=bfloat16"], "batch 64, bf16"),
]


def plan_row(row) -> str:
  model, devices_label, target, config, overrides, settings = row
  cmd = [sys.executable, "-m", "igpt_jax.plan", f"--config=configs/{config}.py", "--json"]
  cmd += [f"--topology={target}"] + [f"--config.{o}" for o in overrides]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # XLA's partitioner warnings
  out = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=3600, env=env)
  if out.returncode:
    return f"| {model} | {devices_label} | failed: {out.stderr.strip().splitlines()[-1]} |"
  p = json.loads(out.stdout.strip().splitlines()[-1])
  mesh = " × ".join(str(n) for n in p["mesh"].values())
  state = p["params_gib_per_device"] + p["optimizer_gib_per_device"]
  remat = "involuntary full rematerialization" in out.stderr.lower()
  if "compiler_says" in p:  # the compiler ran out of memory
    return (f"| {model} | {devices_label} | {mesh} | {settings} | {p['compiler']} | "
            f"{state:.2f} GiB | — | — | does not fit: {p['compiler_says'][:80]} | — | "
            f"{'yes' if remat else 'no'} | {p['compile_s']:.0f} s |")
  verdict = (f"fits, {100 * p['hbm_headroom']:.0f}% free" if p["fits"] else "does not fit")
  comm = ", ".join(f"{v:.2g} GB {k}" for k, v in p.get("comm_gb_per_device", {}).items())
  roofline = (f"{1e3 * p['roofline_step_s']:.0f} ms ({p['bound_by']}; compute "
              f"{1e3 * p['compute_bound_s']:.0f}, HBM {1e3 * p['memory_bound_s']:.0f}, comm "
              f"{1e3 * p['comm_bound_s']:.0f} ms: {comm or 'none'}), MFU ≤ "
              f"{100 * p['mfu_bound']:.0f}%; compiler/model FLOPs {p['flop_ratio']:.2f}"
              if "roofline_step_s" in p else "—")
  return (f"| {model} | {devices_label} | {mesh} | {settings} | {p['compiler']} | "
          f"{state:.2f} GiB | {p['temp_gib_per_device']:.2f} GiB | "
          f"{p['total_gib_per_device']:.2f} GiB of {p['usable_gib']:.3g} | {verdict} | "
          f"{roofline} | "
          f"{'yes' if remat else 'no'} | {p['compile_s']:.0f} s |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default="", help="comma-separated row numbers; all if empty")
  args = parser.parse_args()
  rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
  print("| model | devices | mesh (data × fsdp × tensor) | settings | compiler | params + Adam "
        "/ device | activations & temps / device | total of usable HBM | verdict | roofline step "
        "(what sets it), MFU bound, compiler/model FLOPs | involuntary remat | compile |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(plan_row(row), flush=True)


if __name__ == "__main__":
  main()
