"""Naive sampling: one full forward pass per generated pixel, in raster order.

Next-pixel models sample token i from the logits at position i (which see tokens < i only).
Masked-pixel models fill pixels in raster order too: token i is drawn from the logits at i with
every pixel >= i masked, i.e. conditioned on the pixels already drawn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("apply_fn", "num", "seq_len", "causal"))
def sample_naive(apply_fn, params, rng, *, num: int, seq_len: int, causal: bool,
                 temperature=1.0):
  """Returns sampled tokens [num, seq_len] int32."""
  positions = jnp.arange(seq_len)

  def body(i, carry):
    tokens, rng = carry
    rng, sub = jax.random.split(rng)
    if causal:
      logits = apply_fn(params, tokens)
    else:
      keep = jnp.broadcast_to(positions < i, tokens.shape)
      logits = apply_fn(params, tokens, keep)
    step_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    token = jax.random.categorical(sub, step_logits / temperature).astype(jnp.int32)
    return tokens.at[:, i].set(token), rng

  tokens = jnp.zeros((num, seq_len), jnp.int32)
  tokens, _ = jax.lax.fori_loop(0, seq_len, body, (tokens, rng))
  return tokens
