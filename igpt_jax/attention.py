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
  auto       cudnn on a GPU with bfloat16 compute, blockwise elsewhere.

All agree to float rounding (tests/test_attention.py).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn")
_MASKED = -1e30  # finite, so a fully masked row would give a uniform softmax, never NaN.
_GROUP = 2  # (batch x head) slices per mapped step of the blockwise kernel.


def resolve(impl: str, dtype) -> str:
  """The implementation `auto` stands for on the current backend."""
  if impl != "auto":
    return impl
  if on_nvidia_gpu() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "blockwise"


def on_nvidia_gpu() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


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
  kernel = functools.partial(_blockwise_local, causal=causal, block=block)
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
