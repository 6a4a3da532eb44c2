"""Multi-head attention kernels, all exact, selected by `ModelConfig.attention`.

q, k, v: [batch, length, heads, head_dim] in, [batch, length, heads, head_dim] out.

  dense      the plain reference: the whole [batch, heads, q, k] score tensor, masked and
             softmaxed (what `transformers` does). Memory and traffic grow as length^2 per layer.
  blockwise  flash-attention's algorithm in plain JAX, for CPUs (and any backend without a
             fused kernel): queries in blocks of `block`; causal blocks read only the keys at or
             before them (the masked upper triangle is never computed); no score tensor is kept
             for the backward pass (a custom VJP recomputes each block from q, k and the saved
             log-sum-exp). The work is mapped over small groups of (batch x head) slices so each
             block's scores stay in cache; that, not the FLOPs, is what bounds attention on a CPU.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: the fused cuDNN kernel on
             NVIDIA GPUs (bfloat16/float16 compute).
  pallas_gpu the Pallas (Triton) flash-attention kernel from jax's own kernel library
             (`jax.experimental.pallas.ops.gpu.attention`), forward and backward, per device
             inside `shard_map`. Lengths that are not a multiple of its block are padded, the
             padded keys masked. Unlike cuDNN's kernel it compiles to PTX without a GPU, so
             `plan --topology=h100:...` checks all of it; on other backends it runs in Pallas
             interpret mode (tests only: slow).
  splash     the Pallas TPU splash-attention kernel (causal or full mask; blocks above the
             diagonal skipped), run per device inside `shard_map` over the batch and head axes.
             On other backends it runs in Pallas interpret mode (tests only: slow).
  auto       by platform: splash on TPUs; cudnn on NVIDIA GPUs with bfloat16/float16 compute
             (NVIDIA's tuned fused kernel; pallas_gpu is the one to pick where cuDNN is missing
             or to check a GPU program completely without a GPU) and dense (XLA's fused path,
             not a loop) with float32; blockwise on CPUs.

All agree to float rounding (tests/test_attention.py).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "pallas_gpu", "splash")
PALLAS_GPU_BLOCK = 64  # query and key block of the Pallas GPU kernel's forward pass
_MASKED = -1e30  # finite, so a fully masked row would give a uniform softmax, never NaN.
_GROUP = 2  # (batch x head) slices per mapped step of the blockwise kernel.


def resolve(impl: str, dtype, platform: str | None = None, device_kind: str | None = None) -> str:
  """The implementation `auto` stands for on `platform` ("cpu", "gpu", "tpu"; default: that of
  the devices being traced for, see `current_platform`)."""
  if impl != "auto":
    return impl
  if platform is None:
    platform, device_kind = current_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    nvidia = "nvidia" in (device_kind or "nvidia").lower()
    if nvidia and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return "cudnn"
    return "dense"
  return "blockwise"


def current_platform() -> tuple[str, str]:
  """(platform, device kind) of the mesh being traced under (`sharding.use`), else of the
  default devices. A mesh of compile-only TPU devices (`igpt_jax.plan --topology` on a CPU host)
  counts as TPU."""
  mesh = _context_mesh()
  device = getattr(mesh, "abstract_device", None) or jax.devices()[0]
  return device.platform, device.device_kind


def on_nvidia_gpu() -> bool:
  platform, kind = current_platform()
  return platform == "gpu" and "nvidia" in kind.lower()


def causal_mask(length: int) -> jax.Array:
  return jnp.tril(jnp.ones((length, length), dtype=bool))


def attention(q, k, v, *, causal: bool, impl: str = "dense", block: int = 128):
  """Attention of q over k, v ([batch, length, heads, head_dim]); see the module docstring."""
  impl = resolve(impl, q.dtype)
  if impl == "dense":
    return dense(q, k, v, causal_mask(q.shape[1]) if causal else None)
  if impl == "blockwise":
    return blockwise(q, k, v, causal=causal, block=block)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  if impl == "splash":
    return splash(q, k, v, causal=causal)
  if impl == "pallas_gpu":
    return pallas_gpu(q, k, v, causal=causal)
  raise ValueError(f"attention implementation {impl!r}; use one of {IMPLEMENTATIONS}")


def dense(q, k, v, mask):
  """mask: bool [q_length, kv_length] (True = may attend), or None for none."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [batch, q_length, heads, head_dim]


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def blockwise(q, k, v, *, causal: bool, block: int = 128):
  """The blockwise kernel on each device's own (batch, heads) shard.

  Under a mesh it runs inside `shard_map` (batch and heads split as the logical rules split
  `act_batch` and `act_heads`; the length is whole on every device), so the map over slices is
  a local loop and never a loop over a sharded axis.
  """
  return per_shard(functools.partial(_blockwise_local, causal=causal, block=block), q, k, v)


def per_shard(kernel, q, k, v):
  """`kernel(q, k, v)` on each device's own (batch, heads) shard: under a mesh, inside
  `shard_map` with batch and heads split as the logical rules split `act_batch` and
  `act_heads` (the length whole on every device); without one, directly."""
  mesh = _context_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q, k, v)
  spec = _divisible_spec(nn.logical_to_mesh_axes(("act_batch", None, "act_heads", None)),
                         q.shape, mesh)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def _divisible_spec(spec, shape, mesh):
  """`spec` with the mesh axes of any dimension they do not divide dropped (that dimension is
  then whole on every device: e.g. the batch of 1 that traces the model's init)."""
  dims = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    dims.append(axes if size % math.prod(mesh.shape[n] for n in names) == 0 else None)
  return jax.sharding.PartitionSpec(*dims)


def _context_mesh():
  """The mesh of the enclosing `sharding.use` (jax.set_mesh), or None."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  return None if mesh is None or mesh.empty else mesh


def _blockwise_local(q, k, v, *, causal: bool, block: int):
  batch, length, heads, head_dim = q.shape
  block = _largest_divisor(length, block)
  group = _largest_divisor(batch * heads, _GROUP)

  def to_groups(x):  # [b, l, h, d] -> [b*h / group, group, l, d]
    return x.transpose(0, 2, 1, 3).reshape(-1, group, length, x.shape[-1])

  scale = 1.0 / math.sqrt(head_dim)
  out = _blockwise(to_groups(q * jnp.asarray(scale, q.dtype)), to_groups(k), to_groups(v),
                   causal, block)
  return out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)


def _visible_keys(i: int, block: int, causal: bool, length: int) -> int:
  """How many keys query block i may see: those up to its last query, or all."""
  return (i + 1) * block if causal else length


def _visible(i: int, block: int, kv: int):
  """bool [block, kv]: query i * block + r may see key c (c <= its position)."""
  return jnp.arange(i * block, i * block + block)[:, None] >= jnp.arange(kv)[None, :]


def _block_scores(q_blk, k, i: int, block: int, causal: bool):
  """float32 scores of query block i [g, block, kv] over the keys it may see, kv its count."""
  kv = _visible_keys(i, block, causal, k.shape[1])
  s = jnp.einsum("gqd,gkd->gqk", q_blk, k[:, :kv], preferred_element_type=jnp.float32)
  if causal:
    s = jnp.where(_visible(i, block, kv), s, _MASKED)
  return s, kv


def _forward_group(q, k, v, causal, block):
  """One group [g, l, d] (q pre-scaled) -> (out [g, l, d], log-sum-exp [g, l, 1] float32)."""
  outs, lses = [], []
  for i in range(q.shape[1] // block):
    s, kv = _block_scores(q[:, i * block:(i + 1) * block], k, i, block, causal)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("gqk,gkd->gqd", e.astype(v.dtype), v[:, :kv],
                   preferred_element_type=jnp.float32) / total
    outs.append(o.astype(v.dtype))
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _backward_group(q, k, v, out, lse, d_out, causal, block):
  """Gradients of one group w.r.t. (pre-scaled q, k, v), recomputing each block's scores.

  The scores are recomputed transposed, [g, kv, block], so that the dv and dk products are
  plain (non-transposed) batched matmuls, which the CPU's fast matmul path takes; with the
  scores the other way round both fell back to a 3x slower path (fwd + bwd 207 -> 160-179 ms
  per layer at the bench/train_step.py reference shape).
  """
  f32 = jnp.float32
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  dq = []
  dk = jnp.zeros(k.shape, f32)
  dv = jnp.zeros(v.shape, f32)
  for i in range(q.shape[1] // block):
    rows = slice(i * block, (i + 1) * block)
    kv = _visible_keys(i, block, causal, k.shape[1])
    s_t = jnp.einsum("gkd,gqd->gkq", k[:, :kv], q[:, rows], preferred_element_type=f32)
    if causal:
      s_t = jnp.where(_visible(i, block, kv).T, s_t, _MASKED)
    p_t = jnp.exp(s_t - jnp.swapaxes(lse[:, rows], 1, 2))  # [g, kv, block]
    do = d_out[:, rows]
    dv = dv.at[:, :kv].add(jnp.einsum("gkq,gqd->gkd", p_t.astype(do.dtype), do,
                                      preferred_element_type=f32))
    dp_t = jnp.einsum("gkd,gqd->gkq", v[:, :kv], do, preferred_element_type=f32)
    ds_t = (p_t * (dp_t - jnp.swapaxes(delta[:, rows], 1, 2))).astype(q.dtype)
    dk = dk.at[:, :kv].add(jnp.einsum("gkq,gqd->gkd", ds_t, q[:, rows],
                                      preferred_element_type=f32))
    dq.append(jnp.einsum("gkq,gkd->gqd", ds_t, k[:, :kv], preferred_element_type=f32))
  return (jnp.concatenate(dq, axis=1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, causal, block):  # [groups, g, l, d] each; q pre-scaled
  return _blockwise_fwd(q, k, v, causal, block)[0]


def _blockwise_fwd(q, k, v, causal, block):
  out, lse = jax.lax.map(lambda x: _forward_group(*x, causal, block), (q, k, v))
  return out, (q, k, v, out, lse)


def _blockwise_bwd(causal, block, residuals, d_out):
  return jax.lax.map(lambda x: _backward_group(*x, causal, block), (*residuals, d_out))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- splash attention (Pallas, TPU) -----------------------------------------------------------

SPLASH_BLOCK = 512  # query/key tile of the splash kernel (a multiple of 128 dividing the length)
_LANES = 128  # TPU vector lanes: splash tiles are multiples of this; shorter lengths are padded


def splash(q, k, v, *, causal: bool, block: int = SPLASH_BLOCK, interpret: bool | None = None):
  """The Pallas splash-attention kernel on each device's own (batch, heads) shard.

  q, k, v: [batch, length, heads, head_dim] -> [batch, length, heads, head_dim]. The kernel
  takes [heads, length, head_dim] per example and does not scale q, so q is scaled here. Under a
  mesh it runs inside `shard_map` (batch and heads split like `act_batch` and `act_heads`; the
  length whole on every device), as the blockwise kernel does. `interpret` (default: when the
  devices are not TPUs) runs the same kernel in Pallas interpret mode, for tests on a CPU.
  """
  if interpret is None:
    interpret = current_platform()[0] != "tpu"
  return per_shard(functools.partial(_splash_local, causal=causal, block=block,
                                     interpret=interpret), q, k, v)


def pallas_gpu(q, k, v, *, causal: bool, block: int = PALLAS_GPU_BLOCK,
               interpret: bool | None = None):
  """The Pallas GPU flash-attention kernel on each device's own (batch, heads) shard.

  q, k, v: [batch, length, heads, head_dim] -> the same. The kernel needs the length to be a
  multiple of its blocks: the sequence is padded at the end, and the padded keys are given
  their own segment, so no real query attends to them (with a causal mask they lie in every
  real query's future anyway); the padded queries are dropped. `interpret` (default: when the
  devices are not GPUs) runs the same kernel in Pallas interpret mode, for tests on a CPU.
  """
  if interpret is None:
    interpret = current_platform()[0] != "gpu"
  return per_shard(functools.partial(_pallas_gpu_local, causal=causal, block=block,
                                     interpret=interpret), q, k, v)


def _pallas_gpu_local(q, k, v, *, causal: bool, block: int, interpret: bool):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  batch, length, _, head_dim = q.shape
  # Blocks of a power of two from 16 up to `block`; the backward pass's blocks (32 by default)
  # must divide the padded length too.
  blk = max(32, min(block, 1 << max(0, (length - 1).bit_length())))
  padded = -(-length // blk) * blk
  segments = None
  if padded != length:
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if not causal:
      segments = jnp.broadcast_to((jnp.arange(padded) < length).astype(jnp.int32),
                                  (batch, padded))
  sizes = gpu_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=32, block_kv_dkv=32,
                                   block_q_dq=32, block_kv_dq=32)
  out = gpu_attention.mha(q, k, v, segments, sm_scale=1.0 / math.sqrt(head_dim), causal=causal,
                          block_sizes=sizes, interpret=interpret)
  return out[:, :length]


def _splash_modules():
  """(splash_attention_kernel, splash_attention_mask), imported on first use: Pallas' TPU ops
  load Mosaic, which only this implementation needs."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, \
      splash_attention_mask
  return splash_attention_kernel, splash_attention_mask


def _splash_block(length: int, block: int) -> int:
  """The largest multiple of 128 up to `block` that divides `length` (a multiple of 128)."""
  return max(s for s in range(_LANES, max(block, _LANES) + 1, _LANES) if length % s == 0)


def _splash_mask(length: int, padded: int, causal: bool, heads: int):
  """The kernel's mask over `padded` positions, of which the first `length` are real: causal or
  full over the real keys (padded keys are never attended; padded queries are dropped)."""
  _, splash_mask = _splash_modules()
  if padded == length:
    one = (splash_mask.CausalMask((length, length)) if causal
           else splash_mask.FullMask((length, length)))
  else:
    rows, cols = np.indices((padded, padded))
    one = splash_mask.NumpyMask((cols < length) & ((cols <= rows) if causal else True))
  return splash_mask.MultiHeadMask([one] * heads)


def _splash_local(q, k, v, *, causal: bool, block: int, interpret: bool):
  splash_kernel, _ = _splash_modules()
  _, length, heads, head_dim = q.shape
  padded = -(-length // _LANES) * _LANES  # 32x32, 48x48 and 64x64 images need no padding
  tile = _splash_block(padded, block)
  sizes = splash_kernel.BlockSizes(
      block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile, block_kv_dkv=tile,
      block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
  kernel = splash_kernel.make_splash_mha(
      _splash_mask(length, padded, causal, heads), block_sizes=sizes, head_shards=1,
      q_seq_shards=1, interpret=interpret)

  def to_heads(x):  # [b, l, h, d] -> [b, h, padded l, d]
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  scale = jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
  out = jax.vmap(kernel)(to_heads(q * scale), to_heads(k), to_heads(v))
  return out[:, :, :length].transpose(0, 2, 1, 3).astype(q.dtype)
