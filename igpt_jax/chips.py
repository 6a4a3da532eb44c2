"""Accelerator chips' peak figures, and the roofline bound they put on a step.

One row per chip: peak dense bfloat16 FLOP/s, HBM bandwidth and capacity, and the bandwidth of
the links collectives use, per chip (the unit a TPU topology name counts, and what JAX shows as
one device: v4 and v5p chips' two TensorCores act as one "megacore" device). Sources, the
vendors' spec pages:

  v4    cloud.google.com/tpu/docs/v4      275 TFLOP/s bf16, 1,228 GB/s, 32 GiB; ICI 2,400 Gbps
  v5e   cloud.google.com/tpu/docs/v5e     197 TFLOP/s bf16,   819 GB/s, 16 GiB; ICI 400 GB/s
                                          bidirectional (1,600 Gbps); 2 x 100 Gbps NIC per
                                          8-chip host
  v5p   cloud.google.com/tpu/docs/v5p     459 TFLOP/s bf16, 2,765 GB/s, 95 GiB; ICI 1,200 GB/s
                                          bidirectional (4,800 Gbps); DCN 50 Gbps per chip
  v6e   cloud.google.com/tpu/docs/v6e     918 TFLOP/s bf16, 1,640 GB/s, 32 GiB; ICI 3,584 Gbps
  H100  nvidia.com/en-us/data-center/h100 (SXM)  989 TFLOP/s dense bf16, 3.35 TB/s, 80 GB;
                                          NVLink 900 GB/s (both directions)
  H200  nvidia.com/en-us/data-center/h200 (SXM)  989 TFLOP/s dense bf16, 4.8 TB/s, 141 GB;
                                          NVLink 900 GB/s
  GPU hosts' network: one 400 Gb/s ConnectX-7 NIC per GPU (NVIDIA DGX H100/H200 reference
  design), 50 GB/s per GPU each way.

Link figures here are one direction (what a device can send while it receives as much): half a
bidirectional figure; a Gbps figure over 8. TPU DCN (between slices) is 50 Gbps per v5p chip
and 25 Gbps per v5e chip; v4 and v6e take v5e's.

The roofline: a step takes at least max(FLOPs / peak FLOP/s, bytes / HBM bandwidth, bytes sent
/ link bandwidth), so model FLOPs utilisation is at most (model FLOPs / peak) / that time. It
assumes perfect overlap of compute, memory traffic and communication: an upper bound, not a
prediction. Their sum (no overlap) is reported beside it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float  # FLOP/s, dense
  hbm_bytes_per_s: float
  hbm_gib: float
  ici_bytes_per_s: float = 0.0      # TPU: within a slice; GPU: NVLink within a host
  network_bytes_per_s: float = 0.0  # TPU: DCN between slices; GPU: between hosts

  def link_bytes_per_s(self, link: str) -> float:
    return self.network_bytes_per_s if link in ("network", "dcn") else self.ici_bytes_per_s


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1228e9, 32, 2400e9 / 8, 25e9 / 8),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16, 400e9 / 2, 25e9 / 8),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95, 1200e9 / 2, 50e9 / 8),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32, 3584e9 / 8, 25e9 / 8),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3350e9, 80, 900e9 / 2, 400e9 / 8),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 4800e9, 141, 900e9 / 2, 400e9 / 8),
}

# Set aside in XLA's GPU memory pool for the cuDNN attention workspace, which the compiler does
# not size without a GPU (cuDNN's flash-attention workspaces are tens to hundreds of MiB).
CUDNN_WORKSPACE_GIB = 0.5

# JAX's `device_kind` strings -> rows above.
_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p",
          "tpu v5": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e", "nvidia h100": "h100",
          "nvidia h200": "h200"}


def for_device_kind(kind: str) -> Chip | None:
  """The row of a JAX `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...), or None."""
  kind = kind.lower()
  for prefix in sorted(_KINDS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
    if kind.startswith(prefix):
      return CHIPS[_KINDS[prefix]]
  return None


def for_device(device) -> Chip | None:
  """The row of a JAX device. A v4 or v5p chip has two TensorCores; where JAX shows each core
  as its own device (`num_cores` 1: libtpu's compile-only v4 topologies do), the device is half
  a chip: half its FLOP/s, bandwidth and HBM."""
  chip = for_device_kind(device.device_kind)
  if chip is not None and chip.name in ("TPU v4", "TPU v5p") and getattr(
      device, "num_cores", 2) == 1:
    chip = Chip(f"{chip.name} (one TensorCore)", chip.peak_bf16_flops / 2,
                chip.hbm_bytes_per_s / 2, chip.hbm_gib / 2, chip.ici_bytes_per_s / 2,
                chip.network_bytes_per_s / 2)
  return chip


def roofline(model_flops: float, flops: float, hbm_bytes: float, comm_s: float,
             chip: Chip) -> dict:
  """Lower bound on a step's time per device from the FLOPs it executes (`flops`: the
  compiler's count, remat recomputation included; never taken below the model's), its HBM
  traffic and its communication time, and the bound on model FLOPs utilisation it implies."""
  used = "compiler" if flops >= model_flops else "model"
  compute_s = max(flops, model_flops) / chip.peak_bf16_flops
  memory_s = hbm_bytes / chip.hbm_bytes_per_s
  times = {"compute": compute_s, "HBM": memory_s, "communication": comm_s}
  step_s = max(times.values())
  return {"compute_bound_s": compute_s, "memory_bound_s": memory_s, "comm_bound_s": comm_s,
          "roofline_step_s": step_s, "serial_step_s": sum(times.values()),
          "bound_by": max(times, key=times.get), "flops_used": used,
          "mfu_bound": model_flops / chip.peak_bf16_flops / step_s if step_s > 0 else 0.0}
