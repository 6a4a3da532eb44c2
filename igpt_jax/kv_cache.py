"""Autoregressive decoding of a next-pixel iGPT over an explicit key/value cache.

`decode(params, cfg, cache, prev, start, span)` runs the model on `T` consecutive positions
`start .. start+T-1` (T = 1 when sampling, a whole block when filling the cache from a given
prefix) and returns their logits and their keys and values, which `write` puts in the cache.
The same parameters as the training model (`igpt_jax.model.IGPT`) and the same math (`model.rms_norm`,
`model.mlp`, `model.logits_of`), so the logits equal a full forward pass to float rounding
(tests/test_decoding.py).

What makes it fast:
  * attention reads only the first `span` cache rows, a static bound: the sampler decodes in
    blocks of positions and gives block b the span (b+1)·block, so a step's attention work
    grows with its position instead of always covering the whole image;
  * the cache is one array of keys and one of values, `[layers, batch, heads, seq_len,
    head_dim]`, a loop carry written in place once per step. A step writes the previous
    position's rows first and then reads (it attends to the cache rows before it and to
    itself), so the compiler never copies the whole cache to keep an old version alive (a
    write placed after the reads, which nothing orders, made it copy both arrays every step);
  * the layers are a Python loop inside the step, so nothing restacks the cache.

Shapes carry logical names (`act_batch`, `act_heads`), so under `sharding.use` the cache and
the step are split over the mesh like training activations: images over data/fsdp, heads over
tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from igpt_jax import model as model_lib

CACHE_AXES = (None, "act_batch", "act_heads", None, None)
_HEADS = ("act_batch", "act_heads", None, None)


class Cache(NamedTuple):
  key: jax.Array  # [layers, batch, heads, seq_len, head_dim], compute dtype
  value: jax.Array


def empty(cfg: model_lib.ModelConfig, batch: int) -> Cache:
  shape = (cfg.num_layers, batch, cfg.num_heads, cfg.seq_len, cfg.head_dim)
  zeros = lambda: model_lib.constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES)
  return Cache(zeros(), zeros())


def empty_rows(cfg: model_lib.ModelConfig, batch: int) -> Cache:
  """Zero keys and values of one position, shaped as `decode` returns them."""
  shape = (cfg.num_layers, batch, cfg.num_heads, 1, cfg.head_dim)
  return Cache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))


def embed(params, cfg: model_lib.ModelConfig, prev, start):
  """Inputs of positions start..start+T-1: the embedding of the previous pixel `prev` [batch, T]
  (the learned `sos` vector at position 0) plus the position embedding -> [batch, T, embed]."""
  positions = start + jnp.arange(prev.shape[1])
  h = jnp.take(params["wte"], prev, axis=0)
  h = jnp.where((positions == 0)[None, :, None], params["sos"], h)
  h = h + jax.lax.dynamic_slice_in_dim(params["wpe"], start, prev.shape[1])[None]
  return h.astype(cfg.compute_dtype)


def _attend(q, k, v, old_k, old_v, start):
  """Attention of T new positions (q, k, v: [batch, heads, T, head_dim]) over the cache rows
  before `start` (old_k, old_v: [batch, heads, span, head_dim]) and, causally, each other."""
  t, span = q.shape[2], old_k.shape[2]
  scale = 1.0 / math.sqrt(q.shape[-1])
  masked = jnp.finfo(jnp.float32).min
  old = jnp.einsum("bhtk,bhsk->bhts", q, old_k, preferred_element_type=jnp.float32)
  old = jnp.where(jnp.arange(span) < start, old * scale, masked)
  new = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
  new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new * scale, masked)
  probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v.dtype)
  return (jnp.einsum("bhts,bhsk->bhtk", probs[..., :span], old_v)
          + jnp.einsum("bhts,bhsk->bhtk", probs[..., span:], v))


def per_layer(blocks, num_layers: int) -> list:
  """The scanned block parameters ([layers, ...] leaves) as one tree per layer. `sample` splits
  them once, outside its loops: a slice taken inside a loop step is a copy of that layer's
  weights at every step."""
  if isinstance(blocks, (list, tuple)):
    return list(blocks)
  return [jax.tree_util.tree_map(lambda a, l=l: a[l], blocks) for l in range(num_layers)]


def decode(params, cfg: model_lib.ModelConfig, cache: Cache, prev, start, span: int):
  """Logits [batch, T, vocab] (float32) of positions start..start+T-1 and their keys and values
  (`Cache` of [layers, batch, heads, T, head_dim]), for `write`; the cache is only read.

  prev: int32 [batch, T], the pixels at positions start-1..start+T-2 (ignored at position 0).
  start: int (may be traced); span: static, start <= span <= seq_len. The positions attend to
  the cache rows before `start` (read from the first `span` rows) and to each other.
  """
  dtype = cfg.compute_dtype
  layers = per_layer(params["blocks"], cfg.num_layers)
  h = model_lib.constrain(embed(params, cfg, prev, start), ("act_batch", None, "act_embed"))
  new_keys, new_values = [], []
  for layer in range(cfg.num_layers):
    p = layers[layer]
    x = model_lib.rms_norm(h, p["ln_1"]["scale"]).astype(dtype)

    def heads(name, x=x, p=p):  # [batch, heads, T, head_dim]
      out = jnp.einsum("btd,dhk->bhtk", x, p["attn"][name].astype(dtype))
      return model_lib.constrain(out, _HEADS)

    k, v = heads("key"), heads("value")
    out = _attend(heads("query"), k, v, cache.key[layer, :, :, :span],
                  cache.value[layer, :, :, :span], start)
    new_keys.append(k)
    new_values.append(v)
    h = h + jnp.einsum("bhtk,hkd->btd", out, p["attn"]["out"].astype(dtype))
    x = model_lib.rms_norm(h, p["ln_2"]["scale"]).astype(dtype)
    h = h + model_lib.mlp(x, p["mlp"]["fc"]["kernel"].astype(dtype),
                          p["mlp"]["proj"]["kernel"].astype(dtype))
  h = model_lib.rms_norm(h, params["ln_f"]["scale"])
  rows = Cache(jnp.stack(new_keys), jnp.stack(new_values))
  return model_lib.logits_of(h, params["wtet"], dtype), rows


def write(cache: Cache, rows: Cache, start) -> Cache:
  """The cache with `rows` ([layers, batch, heads, T, head_dim] keys and values, as `decode`
  returns them) written at positions start..start+T-1."""
  def put(stacked, new):
    updated = jax.lax.dynamic_update_slice(stacked, new.astype(stacked.dtype),
                                           (0, 0, 0, start, 0))
    return model_lib.constrain(updated, CACHE_AXES)
  return Cache(put(cache.key, rows.key), put(cache.value, rows.value))
