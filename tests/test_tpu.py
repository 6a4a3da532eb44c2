"""What runs on TPU pods, compiled by the real XLA:TPU compiler without a TPU.

libtpu (the [tpu] extra) gives compile-only TPU devices for a topology name on this CPU host;
`jit(...).lower(...).compile()` then runs the TPU compiler, Pallas/Mosaic kernels included.
"""

import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import requires_gpu_compiler, requires_tpu_compiler, tiny_config
from conftest import run_tool
from igpt_jax import attention
from igpt_jax import chips
from igpt_jax import sharding

GIB = 1024**3


def tpu_devices(name: str):
  requires_tpu_compiler()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


@pytest.mark.parametrize("causal", [True, False])
def test_splash_attention_compiles_for_a_tpu_slice(causal):
  """`auto` resolves to the splash kernel under a mesh of TPU chips, and its forward and both
  backward kernels (dq, dkv) compile with Mosaic inside shard_map (batch over data, heads over
  tensor), at iGPT-S's head size and a 32x32 image's length."""
  devices = tpu_devices("v5e:2x2")
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
  mesh = sharding.make_mesh(config, devices)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  shape = jax.ShapeDtypeStruct((4, 1024, 8, 64), jnp.bfloat16, sharding=spec)

  def loss(q, k, v):
    out = attention.attention(q, k, v, causal=causal, impl="auto")
    return jnp.sum(out.astype(jnp.float32))

  with sharding.use(mesh, config):
    assert attention.resolve("auto", jnp.bfloat16) == "splash"
    assert attention.resolve("auto", jnp.float32) == "splash"
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') >= 3, "forward, dq and dkv kernels"
  mem = compiled.memory_analysis()
  assert 0 < mem.argument_size_in_bytes < chips.CHIPS["v5e"].hbm_gib * GIB


def test_a_mesh_that_splits_a_physical_axis_is_built_and_said(caplog):
  """data 2 x fsdp 32 on a v6e 8x8 torus needs half of one physical axis: `jax.make_mesh`
  refuses it, `sharding.make_mesh` splits that axis instead (every chip once) and says so in
  one warning; a shape that takes whole physical axes is built as before, without a word."""
  devices = tpu_devices("v6e:8x8")
  with pytest.raises(NotImplementedError):
    jax.make_mesh((2, 32, 1), ("data", "fsdp", "tensor"), devices=devices)
  split = sharding.make_mesh(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 32}), devices)
  assert dict(split.shape) == {"data": 2, "fsdp": 32, "tensor": 1}
  assert len({d.id for d in split.devices.flat}) == 64
  warned = [r.getMessage() for r in caplog.records if "splits a physical axis" in r.getMessage()]
  assert len(warned) == 1 and "'data': 2, 'fsdp': 32" in warned[0], warned
  caplog.clear()
  whole = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 64}), devices)
  assert dict(whole.shape) == {"data": 1, "fsdp": 64, "tensor": 1}
  assert not [r for r in caplog.records if "splits a physical axis" in r.getMessage()]


def test_plan_compiles_the_igpt_s_train_step_for_a_v5e_slice():
  """`python -m igpt_jax.plan --topology=v5e:2x2`: the real iGPT-S train step (bfloat16, batch
  8) compiled by the TPU compiler, with its memory figures, FLOPs and roofline."""
  requires_tpu_compiler()
  out = run_tool("plan", "--config=configs/s.py", "--topology=v5e:2x2", "--config.batch_size=8",
                 "--config.model.dtype=bfloat16", "--config.mesh.data=1",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--json", timeout=900,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"))  # XLA's warnings, checked
  assert out.returncode == 0, out.stderr[-3000:]
  p = json.loads(out.stdout.strip().splitlines()[-1])
  assert p["compiler"] == "XLA:TPU" and p["device_kind"] == "TPU v5 lite"
  assert p["devices"] == 4 and p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert p["attention"] == "splash"
  assert 76e6 < p["parameters"] < 77e6  # iGPT-S
  hbm = chips.CHIPS["v5e"].hbm_gib
  assert p["hbm_gib"] == hbm
  for key in ("params_gib_per_device", "optimizer_gib_per_device", "temp_gib_per_device",
              "eval_total_gib_per_device"):
    assert 0 < p[key] < hbm, key
  # Parameters and Adam's two moments, float32, split over fsdp x tensor = 4.
  assert p["params_gib_per_device"] == pytest.approx(p["parameters"] * 4 / 4 / GIB, rel=0.05)
  assert p["optimizer_gib_per_device"] == pytest.approx(2 * p["params_gib_per_device"], rel=0.05)
  assert p["total_gib_per_device"] < hbm and p["fits"]
  # The layer-loop-corrected compiler FLOPs are the model's, within remat-free overheads
  # (softmax, norms, the loss); a count of one layer instead of 24 would be ~20x too low.
  assert 0.9 < p["compiler_tflop_per_device"] / p["model_tflop_per_device"] < 1.3
  assert p["hbm_gb_per_device"] > 0
  assert 0 < p["mfu_bound"] <= 1 and p["roofline_step_s"] > 0
  assert "involuntary full rematerialization" not in out.stderr.lower()
  # libtpu on a machine without TPU chips, told it is a lone worker: no screen of errors.
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "host bounds" not in out.stderr


def test_plan_refuses_an_unknown_topology():
  requires_tpu_compiler()
  out = run_tool("plan", "--config=configs/quickstart.py", "--topology=v9z:3x3")
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--topology=v9z:3x3" in errors[0] and "v5e:16x16" in errors[0]
  assert "Traceback" not in out.stderr


def test_chip_rows_match_jax_device_kinds():
  assert chips.for_device_kind("TPU v5 lite").name == "TPU v5e"
  assert chips.for_device_kind("TPU v5").name == "TPU v5p"
  assert chips.for_device_kind("TPU v4").name == "TPU v4"
  assert chips.for_device_kind("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
  assert chips.for_device_kind("cpu") is None
  assert chips.for_device_kind("TPU v5p").hbm_gib == 95
  r = chips.roofline(1e12, 2e12, 1e9, 0.0, chips.CHIPS["v5e"])
  assert r["bound_by"] == "compute" and r["mfu_bound"] == pytest.approx(0.5)
  r = chips.roofline(1e12, 1e12, 819e9, 0.0, chips.CHIPS["v5e"])  # 1 s of HBM vs 5 ms of math
  assert r["bound_by"] == "HBM" and r["roofline_step_s"] == pytest.approx(1.0)
  r = chips.roofline(1e12, 1e12, 0.0, 2.0, chips.CHIPS["v5e"])
  assert r["bound_by"] == "communication" and r["serial_step_s"] == pytest.approx(
      2.0 + 1e12 / 197e12)
  # A count below the model's (work hidden in custom calls) never lifts MFU above 100%.
  r = chips.roofline(2e12, 1e12, 0.0, 0.0, chips.CHIPS["v5e"])
  assert r["mfu_bound"] == pytest.approx(1.0) and r["flops_used"] == "model"
  assert chips.CHIPS["v5e"].link_bytes_per_s("ici") == 200e9
  assert chips.CHIPS["h100"].link_bytes_per_s("network") == 50e9


def _plan_json(*flags, timeout=900):
  out = run_tool("plan", *flags, "--json", timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1]), out


def test_plan_counts_the_flops_of_fsdp_collective_matmuls():
  """With the weights split over 4 chips the TPU compiler loops over weight shards (windowed
  einsums); XLA's own cost analysis counts each loop once (0.29-0.36 of the model's FLOPs).
  Read from the program with the loops' trip counts, the count is the model's; the gathers of
  the bfloat16 weights and the scattered gradients are the communication."""
  requires_tpu_compiler()
  p, _ = _plan_json("--config=configs/s.py", "--topology=v5e:2x2", "--config.batch_size=8",
                    "--config.model.num_layers=4", "--config.model.dtype=bfloat16",
                    "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=1")
  assert 0.9 < p["flop_ratio"] < 1.3 and p["loops_counted_once"] == 0
  # Per layer 12 d^2 weights; forward and backward gather bf16 weights (3/4 of them from the
  # other chips) and the gradients are reduce-scattered: at least 2 x 3/4 x 2 bytes each.
  weights = 4 * 12 * 512**2
  assert p["comm_gb_per_device"]["ici"] * 1e9 > 2 * 0.75 * 2 * weights
  assert 0 < p["comm_bound_s"] < p["serial_step_s"] and 0 < p["mfu_bound"] <= 1


def test_plan_says_does_not_fit_when_the_tpu_compiler_runs_out_of_memory():
  requires_tpu_compiler()
  flags = ["--config=configs/s.py", "--topology=v5e:2x2", "--config.batch_size=1024",
           "--config.model.num_layers=4", "--config.mesh.data=1", "--config.mesh.fsdp=4",
           "--config.mesh.tensor=1"]
  p, _ = _plan_json(*flags)
  assert p["fits"] is False and "exceed" in p["compiler_says"]
  out = run_tool("plan", *flags, timeout=900)
  assert out.returncode == 0 and "Traceback" not in out.stderr
  assert "DOES NOT FIT in 16 GiB per device: the compiler refused" in out.stdout


def test_plan_compiles_the_igpt_s_train_step_for_8_h100s():
  """The XLA:GPU compiler (jax-cuda12-plugin, a target config, no GPU): iGPT-S in bfloat16 on
  one host of 8 H100s. Memory per device within HBM, FLOPs within 0.9-1.3x the model's, sm_90
  code, the cuDNN attention kernel in the program, and the weights' traffic on NVLink."""
  requires_gpu_compiler()
  p, _ = _plan_json("--config=configs/s.py", "--topology=h100:1x8",
                    "--config.model.dtype=bfloat16", "--config.mesh.data=1",
                    "--config.mesh.fsdp=8", "--config.mesh.tensor=1")
  assert p["compiler"] == "XLA:GPU" and p["device_kind"].startswith("NVIDIA H100")
  assert p["devices"] == 8 and p["attention"] == "cudnn"
  assert 0 < p["total_gib_per_device"] < p["usable_gib"] < 80 and p["fits"]
  assert p["usable_gib"] == pytest.approx(80 * 0.75 - chips.CUDNN_WORKSPACE_GIB)
  assert 0.9 < p["flop_ratio"] < 1.3
  assert any("cudnn" in c.lower() for c in p["custom_calls"]), p["custom_calls"]
  assert p["sm"] == "sm_90a"
  assert set(p["comm_gb_per_device"]) == {"nvlink"} and p["comm_bound_s"] > 0
  assert 0 < p["mfu_bound"] <= 1


def test_plan_puts_cross_host_collectives_on_the_network():
  requires_gpu_compiler()
  p, _ = _plan_json("--config=configs/s.py", "--topology=h100:2x4", "--config.batch_size=16",
                    "--config.model.num_layers=2", "--config.model.dtype=bfloat16",
                    "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=1")
  # fsdp within a host (NVLink), the data-parallel gradient sum across the two hosts.
  assert p["comm_gb_per_device"].get("network", 0) > 0
  assert p["comm_gb_per_device"].get("nvlink", 0) > 0


def test_plan_compiles_the_pallas_gpu_attention_kernel_for_sm_90a():
  """`model.attention=pallas_gpu`: the Triton flash-attention kernel (forward and backward)
  inside the iGPT-S train step, compiled by XLA:GPU to sm_90a code for 8 H100s."""
  requires_gpu_compiler()
  p, _ = _plan_json("--config=configs/s.py", "--topology=h100:1x8", "--config.batch_size=16",
                    "--config.model.num_layers=2", "--config.model.dtype=bfloat16",
                    "--config.model.attention=pallas_gpu", "--config.mesh.data=1",
                    "--config.mesh.fsdp=8", "--config.mesh.tensor=1")
  assert p["attention"] == "pallas_gpu" and p["sm"] == "sm_90a" and p["fits"]
  assert any("triton" in c.lower() for c in p["custom_calls"]), p["custom_calls"]
  assert 0.9 < p["flop_ratio"] < 1.3


@pytest.mark.parametrize("topology", ["h100:1x8", "v5e:2x4"])
def test_sampler_plan_for_gpus_and_a_tpu_slice(topology):
  """`plan --sample_batch`: the cached sampler of a 2-layer iGPT-S (16x16, bfloat16) compiled
  for 8 H100s and for a v5e slice, images over data and heads over tensor. The cache per device
  is the formula's, the compiled FLOPs the weights' share of the model's, and on the H100s the
  draw is HBM-bound (XLA:TPU keeps this small model's arrays in on-chip memory: not there)."""
  if topology.startswith("h100"):
    requires_gpu_compiler()
  else:
    requires_tpu_compiler()
  p, _ = _plan_json("--config=configs/s.py", f"--topology={topology}", "--sample_batch=16",
                    "--config.model.num_layers=2", "--config.model.dtype=bfloat16",
                    "--config.image_size=16", "--config.mesh.data=4", "--config.mesh.fsdp=1",
                    "--config.mesh.tensor=2")
  assert p["devices"] == 8 and p["positions"] == 256 and p["fits"]
  # 2 layers x (16 / 4 images) x 256 positions x (512 / 2 channels) x keys and values, bf16.
  assert p["kv_cache_gib_per_device"] * GIB == 2 * 2 * 4 * 256 * 256 * 2
  assert p["temp_gib_per_device"] >= p["kv_cache_gib_per_device"]
  assert p["loops_counted_once"] == 0
  # The compilers may turn the attention's matrix-vector products (one query per image) into
  # multiply-reduce fusions, which hlo_cost does not count as matmul FLOPs (at 32x32 the
  # compiled count is 0.90 of the model's); the weights' matmuls are always counted.
  ratio = p["compiler_tflop_per_device"] / p["model_tflop_per_device"]
  assert 0.85 < ratio <= 1.0, ratio
  if topology.startswith("h100"):
    # Every step reads the weights (cast to bfloat16 once, before the loops: half the float32
    # parameters' bytes) and the cache from HBM; a cast in the step read more than all of them.
    weights_gb = p["params_gib_per_device"] * GIB / 2 / 1e9
    assert p["bound_by"] == "HBM"
    assert 256 * weights_gb < p["hbm_gb_per_device"] < 256 * 4 * weights_gb
  assert p["pixels_per_s_bound"] == pytest.approx(16 * 256 / p["roofline_batch_s"])
  assert p["roofline_step_ms"] == pytest.approx(1e3 * p["roofline_batch_s"] / 256)
