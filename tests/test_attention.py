"""The attention kernels and the MLP's hand-written backward match the plain computation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_fake_devices
from igpt_jax import attention
from igpt_jax import model as model_lib

SHAPES = [  # batch, length, heads, head_dim, block
    (2, 64, 4, 16, 128),  # one block (block > length)
    (3, 144, 2, 8, 32),  # 12x12 image: block 32 does not divide 144 -> 24; odd slice count
    (2, 256, 4, 32, 64),  # four causal blocks
]


def qkv_and_cotangent(shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  # Scaled so the softmax is far from uniform (scores of a few units).
  return [(2.0 * jax.random.normal(k, shape)).astype(dtype) for k in keys]


def value_and_grads(impl, q, k, v, ct, *, causal, block=128):
  def f(q, k, v):
    out = attention.attention(q, k, v, causal=causal, impl=impl, block=block)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, length, heads, head_dim, block", SHAPES)
def test_blockwise_matches_dense(batch, length, heads, head_dim, block, causal):
  q, k, v, ct = qkv_and_cotangent((batch, length, heads, head_dim))
  out_d, grads_d = value_and_grads("dense", q, k, v, ct, causal=causal)
  out_b, grads_b = value_and_grads("blockwise", q, k, v, ct, causal=causal, block=block)
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_d), rtol=1e-5, atol=1e-5)
  for name, gb, gd in zip("qkv", grads_b, grads_d):
    gd = np.asarray(gd)
    np.testing.assert_allclose(np.asarray(gb), gd, atol=1e-5 * np.abs(gd).max(), err_msg=name)


def test_blockwise_is_causal():
  """Changing the last position's key/value changes no earlier output."""
  q, k, v, _ = qkv_and_cotangent((2, 64, 2, 8))
  out = attention.attention(q, k, v, causal=True, impl="blockwise", block=16)
  out2 = attention.attention(q, k.at[:, -1].add(5.0), v.at[:, -1].add(5.0), causal=True,
                             impl="blockwise", block=16)
  np.testing.assert_array_equal(np.asarray(out[:, :-1]), np.asarray(out2[:, :-1]))
  assert not np.allclose(np.asarray(out[:, -1]), np.asarray(out2[:, -1]))


def test_blockwise_bfloat16_close_to_float32_reference():
  q, k, v, ct = qkv_and_cotangent((2, 128, 2, 32))
  out_ref, grads_ref = value_and_grads("dense", q, k, v, ct, causal=True)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v, ct)]
  out, grads = value_and_grads("blockwise", *bf, causal=True, block=32)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  scale = float(jnp.max(jnp.abs(out_ref)))
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - out_ref))) < 0.03 * scale
  for g, g_ref in zip(grads, grads_ref):
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - g_ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(g_ref)))


def test_blockwise_keeps_no_batch_heads_length_squared_tensor():
  """Dense materialises [batch, heads, length, length] scores (and keeps them for the
  backward); blockwise works on two (batch, head) slices and one query block at a time."""
  batch, length, heads = 2, 1024, 16
  q, k, v, ct = qkv_and_cotangent((batch, length, heads, 16))

  def temp_bytes(impl):
    f = jax.jit(jax.grad(lambda q, k, v, ct: jnp.sum(
        attention.attention(q, k, v, causal=True, impl=impl) * ct), argnums=(0, 1, 2)))
    return f.lower(q, k, v, ct).compile().memory_analysis().temp_size_in_bytes

  scores_bytes = batch * heads * length * length * 4
  assert temp_bytes("dense") >= scores_bytes
  assert temp_bytes("blockwise") < scores_bytes / 4  # inputs, grads and one block of scores


@pytest.mark.skipif(not attention.on_nvidia_gpu(), reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_plain_path(causal):
  """The fused cuDNN kernel against the plain path on the same bfloat16 inputs."""
  q, k, v, ct = [x.astype(jnp.bfloat16) for x in qkv_and_cotangent((2, 1024, 8, 64))]
  out_p, grads_p = value_and_grads("dense", q, k, v, ct, causal=causal)
  out_c, grads_c = value_and_grads("cudnn", q, k, v, ct, causal=causal)
  np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_p, np.float32),
                             atol=2e-2, rtol=2e-2)
  for gc, gp in zip(grads_c, grads_p):
    np.testing.assert_allclose(np.asarray(gc, np.float32), np.asarray(gp, np.float32),
                               atol=5e-2, rtol=5e-2)


def test_auto_resolves_by_backend():
  expected = "cudnn" if attention.on_nvidia_gpu() else "blockwise"
  assert attention.resolve("auto", jnp.bfloat16) == expected
  assert attention.resolve("auto", jnp.float32) == ("dense" if expected == "cudnn" else expected)
  assert attention.resolve("dense", jnp.bfloat16) == "dense"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_never_resolves_to_the_cpu_loop_on_an_accelerator(dtype):
  """`blockwise` (a loop tuned for a CPU's cache) is the CPU's choice only."""
  resolved = {(p, kind): attention.resolve("auto", dtype, platform=p, device_kind=kind)
              for p, kind in (("tpu", "TPU v5 lite"), ("tpu", "TPU v4"), ("gpu", "NVIDIA H100"),
                              ("gpu", "NVIDIA H200"), ("gpu", "AMD Instinct MI300X"),
                              ("cpu", "cpu"))}
  assert resolved[("tpu", "TPU v5 lite")] == resolved[("tpu", "TPU v4")] == "splash"
  assert resolved[("gpu", "NVIDIA H100")] == ("cudnn" if dtype == jnp.bfloat16 else "dense")
  assert resolved[("gpu", "AMD Instinct MI300X")] == "dense"
  assert resolved[("cpu", "cpu")] == "blockwise"
  assert [k for k, v in resolved.items() if v == "blockwise"] == [("cpu", "cpu")]


def assert_kernel_matches_dense(impl, shape, causal):
  """Outputs and q/k/v gradients of `impl` equal the dense reference to float32 rounding."""
  q, k, v, ct = qkv_and_cotangent(shape)
  out_d, grads_d = value_and_grads("dense", q, k, v, ct, causal=causal)
  out_k, grads_k = value_and_grads(impl, q, k, v, ct, causal=causal)
  np.testing.assert_allclose(out_k, out_d, atol=2e-5, rtol=1e-5)
  for gk, gd in zip(grads_k, grads_d):
    np.testing.assert_allclose(gk, gd, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, length, heads, head_dim", [
    (2, 256, 2, 64),  # two 128-wide tiles
    (1, 144, 3, 16),  # 12x12 image: not a multiple of 128, one whole-length tile
])
def test_splash_matches_dense(batch, length, heads, head_dim, causal):
  """The TPU splash kernel, run in Pallas interpret mode on the CPU: outputs and q/k/v
  gradients equal the dense reference to float32 rounding."""
  assert_kernel_matches_dense("splash", (batch, length, heads, head_dim), causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, length, heads, head_dim", [
    (1, 128, 2, 32),  # two 64-wide blocks
    (2, 40, 1, 16),  # not a multiple of any block: padded to 64, the padded keys masked
])
def test_pallas_gpu_matches_dense(batch, length, heads, head_dim, causal):
  """The Pallas GPU (Triton) flash-attention kernel, run in Pallas interpret mode on the CPU:
  outputs and q/k/v gradients equal the dense reference to float32 rounding."""
  assert_kernel_matches_dense("pallas_gpu", (batch, length, heads, head_dim), causal)


def test_model_output_is_the_same_with_every_cpu_kernel():
  cfg = model_lib.ModelConfig(vocab_size=32, seq_len=64, num_layers=2, width=32, num_heads=4)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 32)
  m = model_lib.IGPT(cfg)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), tokens)["params"])
  params["wtet"] = 0.5 * jax.random.normal(jax.random.PRNGKey(2), params["wtet"].shape)
  outs = {}
  for impl in ("dense", "blockwise"):
    model = model_lib.IGPT(dataclasses.replace(cfg, attention=impl, attention_block=16))
    outs[impl] = np.asarray(model.apply({"params": params}, tokens))
  np.testing.assert_allclose(outs["blockwise"], outs["dense"], atol=1e-5)


def composed_mlp(x, w_fc, w_proj):
  return model_lib.quick_gelu(x @ w_fc) @ w_proj


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_mlp_backward_matches_autodiff(dtype, tol):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (2, 16, 32)).astype(dtype)
  w_fc = (0.3 * jax.random.normal(keys[1], (32, 128))).astype(dtype)
  w_proj = (0.3 * jax.random.normal(keys[2], (128, 32))).astype(dtype)
  ct = jax.random.normal(keys[3], (2, 16, 32)).astype(dtype)
  loss = lambda f: (lambda *a: jnp.sum((f(*a) * ct).astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(model_lib.mlp(x, w_fc, w_proj), np.float32),
                             np.asarray(composed_mlp(x, w_fc, w_proj), np.float32),
                             rtol=tol, atol=tol)
  got = jax.grad(loss(model_lib.mlp), argnums=(0, 1, 2))(x, w_fc, w_proj)
  want = jax.grad(loss(composed_mlp), argnums=(0, 1, 2))(x, w_fc, w_proj)
  for name, g, w in zip(("x", "w_fc", "w_proj"), got, want):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=name)


SHARDED_SCRIPT = r"""
import json, sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from conftest import tiny_config
from igpt_jax import attention, sharding
config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
mesh = sharding.make_mesh(config)
keys = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v, ct = [2.0 * jax.random.normal(key, (4, 128, 4, 16)) for key in keys]
impl = sys.argv[1]
spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
q, k, v, ct = [jax.device_put(x, spec) for x in (q, k, v, ct)]
errs = {}
for causal in (True, False):
  def grads(impl):
    f = lambda q, k, v: jnp.sum(attention.attention(q, k, v, causal=causal, impl=impl,
                                                    block=32) * ct)
    with sharding.use(mesh, config):
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
  (_, gd), (_, gb) = grads("dense"), grads(impl)
  # Max abs error over the max magnitude: of the outputs, then of each gradient.
  with sharding.use(mesh, config):
    od, ob = [jax.jit(lambda q, k, v, impl=impl: attention.attention(
        q, k, v, causal=causal, impl=impl, block=32))(q, k, v) for impl in ("dense", impl)]
  errs[str(causal)] = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                       for a, b in zip((od, *gd), (ob, *gb))]
  errs[str(causal) + "_sharding"] = str(gb[0].sharding.spec)
print("ERRS", json.dumps(errs))
"""


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_kernels_under_a_data_fsdp_tensor_mesh(impl):
  """8 fake devices, batch over data x fsdp and heads over tensor: shard_map path == dense."""
  errs = run_on_fake_devices(SHARDED_SCRIPT, impl, tag="ERRS", timeout=300)
  for causal in ("True", "False"):
    assert max(errs[causal]) < 1e-5, errs
    assert "tensor" in errs[causal + "_sharding"], errs

