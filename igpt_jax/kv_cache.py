"""Autoregressive decoding of a next-pixel iGPT over an explicit key/value cache.

`decode(params, cfg, cache, prev, start)` runs the model on `T` consecutive positions
`start .. start+T-1` (T = 1 when sampling, a whole block when filling the cache from a given
prefix): it writes their keys and values into the cache and returns their logits and the
cache. The same parameters as the training model (`igpt_jax.model.IGPT`) and the same math
(`model.rms_norm`, `model.mlp`, `model.logits_of`), so the logits equal a full forward pass to
float rounding (tests/test_decoding.py).

What makes it fast (a step reads the cache once, and only as much of it as is filled):
  * the cache holds one key and one value array per layer, `[batch, heads, head_dim, length]`,
    as long as the rows decoded so far need (`grow` lengthens it, once per block of
    positions). Attention reads whole arrays: slicing a layer out of a stacked cache, or
    the filled rows out of a longer one, makes XLA copy them first, and on a CPU that copy
    cost twice the reads themselves (bench/README.md);
  * positions run along the last axis, so both attention products of a step (one query per
    image and head) are matrix-vector products along contiguous rows: on a CPU, a step at
    64x64 took ~0.8x the time it took with each position's head_dim values contiguous
    (`[..., length, head_dim]`; bench/README.md);
  * the arrays are loop carries written in place once per step. Each layer writes the step's
    rows first and then attends over the array (its rows up to the step's own), so the
    compiler never copies the cache to keep an old version alive (a write placed after the
    reads, which nothing orders, made it copy every array every step);
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

CACHE_AXES = ("act_batch", "act_heads", None, None)


class Cache(NamedTuple):
  key: tuple  # one [batch, heads, head_dim, length] array per layer, compute dtype
  value: tuple


def _constrain(x):
  return model_lib.constrain(x, CACHE_AXES)


def empty(cfg: model_lib.ModelConfig, batch: int, length: int) -> Cache:
  """A cache of `length` zero rows per layer (`length` = 1: the rows of one position, shaped
  as `decode` returns them)."""
  shape = (batch, cfg.num_heads, cfg.head_dim, length)
  zeros = lambda: tuple(_constrain(jnp.zeros(shape, cfg.compute_dtype))
                        for _ in range(cfg.num_layers))
  return Cache(zeros(), zeros())


def bytes_per_image(cfg: model_lib.ModelConfig) -> int:
  """The cache of one image at full length: keys and values of every layer and position."""
  return (2 * cfg.num_layers * cfg.seq_len * cfg.width
          * jnp.dtype(cfg.compute_dtype).itemsize)


def length(cache: Cache) -> int:
  return cache.key[0].shape[3]


def grow(cache: Cache, new_length: int) -> Cache:
  """The cache lengthened to `new_length` rows with zero rows (one copy of the cache)."""
  pad = lambda x: _constrain(jnp.pad(x, ((0, 0), (0, 0), (0, 0),
                                         (0, new_length - x.shape[3]))))
  return Cache(tuple(map(pad, cache.key)), tuple(map(pad, cache.value)))


def embed(params, cfg: model_lib.ModelConfig, prev, start):
  """Inputs of positions start..start+T-1: the embedding of the previous pixel `prev` [batch, T]
  (the learned `sos` vector at position 0) plus the position embedding -> [batch, T, embed]."""
  positions = start + jnp.arange(prev.shape[1])
  h = jnp.take(params["wte"], prev, axis=0)
  h = jnp.where((positions == 0)[None, :, None], params["sos"], h)
  h = h + jax.lax.dynamic_slice_in_dim(params["wpe"], start, prev.shape[1])[None]
  return h.astype(cfg.compute_dtype)


def _attend(q, cache_k, cache_v, start):
  """Attention of T positions start..start+T-1 (q: [batch, heads, T, head_dim]) over the cache
  (cache_k, cache_v: [batch, heads, head_dim, length], their own rows already written): each
  position sees the rows up to and including its own."""
  t, length_ = q.shape[2], cache_k.shape[3]
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bhtk,bhks->bhts", q, cache_k, preferred_element_type=jnp.float32)
  visible = jnp.arange(length_)[None, :] <= start + jnp.arange(t)[:, None]  # [T, length]
  scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
  return jnp.einsum("bhts,bhks->bhtk", probs, cache_v)


def per_layer(blocks, num_layers: int) -> list:
  """The scanned block parameters ([layers, ...] leaves) as one tree per layer. `sample` splits
  them once, outside its loops: a slice taken inside a loop step is a copy of that layer's
  weights at every step."""
  if isinstance(blocks, (list, tuple)):
    return list(blocks)
  return [jax.tree_util.tree_map(lambda a, l=l: a[l], blocks) for l in range(num_layers)]


def for_decoding(params, cfg: model_lib.ModelConfig) -> dict:
  """The parameters as the decoding loops want them, made once before them: one tree per layer
  (`per_layer`) and the matmul weights in the compute dtype. A cast inside a step reads the
  float32 weights and writes the cast copy at every step: in bfloat16, twice the HBM traffic of
  reading the weights once (iGPT-L on H100s, plan --sample_batch). Norm gains and embedding
  tables stay as they are (they are used in float32); the math is unchanged."""
  cast = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(cfg.compute_dtype), tree)
  blocks = [dict(b, attn=cast(b["attn"]), mlp=cast(b["mlp"]))
            for b in per_layer(params["blocks"], cfg.num_layers)]
  return dict(params, blocks=blocks, wtet=params["wtet"].astype(cfg.compute_dtype))


def decode(params, cfg: model_lib.ModelConfig, cache: Cache, prev, start):
  """Runs positions start..start+T-1: writes their keys and values into the cache, attends each
  to the rows up to its own, and returns their logits [batch, T, vocab] (float32) and the cache.

  prev: int32 [batch, T], the pixels at positions start-1..start+T-2 (ignored at position 0).
  start: int (may be traced); the cache must be at least start+T rows long. The work grows with
  the cache's (static) length.
  """
  dtype = cfg.compute_dtype
  layers = per_layer(params["blocks"], cfg.num_layers)
  h = model_lib.constrain(embed(params, cfg, prev, start), ("act_batch", None, "act_embed"))
  keys, values = list(cache.key), list(cache.value)
  for layer in range(cfg.num_layers):
    p = layers[layer]
    x = model_lib.rms_norm(h, p["ln_1"]["scale"]).astype(dtype)

    def heads(name, x=x, p=p):  # [batch, heads, T, head_dim]
      # A plain [d, heads x head_dim] matmul, its output then split into heads: an einsum
      # straight to [batch, heads, T, head_dim] made XLA:CPU transpose the weights every step.
      w = p["attn"][name]
      out = jnp.dot(x, w.reshape(w.shape[0], -1).astype(dtype))
      return _constrain(out.reshape(*x.shape[:2], *w.shape[1:]).transpose(0, 2, 1, 3))

    # Written before it is read: the step's attention reads the updated arrays in place (a
    # write after the reads, which nothing orders, made XLA copy every array every step).
    keys[layer] = _put(keys[layer], heads("key"), start)
    values[layer] = _put(values[layer], heads("value"), start)
    out = _attend(heads("query"), keys[layer], values[layer], start)
    w_out = p["attn"]["out"]  # [heads, head_dim, d]
    out = out.transpose(0, 2, 1, 3).reshape(*h.shape[:2], -1)
    h = h + jnp.dot(out, w_out.reshape(-1, w_out.shape[-1]).astype(dtype))
    x = model_lib.rms_norm(h, p["ln_2"]["scale"]).astype(dtype)
    h = h + model_lib.mlp(x, p["mlp"]["fc"]["kernel"].astype(dtype),
                          p["mlp"]["proj"]["kernel"].astype(dtype))
  h = model_lib.rms_norm(h, params["ln_f"]["scale"])
  return model_lib.logits_of(h, params["wtet"], dtype), Cache(tuple(keys), tuple(values))


def _put(array, rows, start):
  """`array` [batch, heads, head_dim, length] with `rows` [batch, heads, T, head_dim] written
  at positions start..start+T-1, in place."""
  rows = jnp.swapaxes(rows, 2, 3).astype(array.dtype)
  return _constrain(jax.lax.dynamic_update_slice(array, rows, (0, 0, 0, start)))
