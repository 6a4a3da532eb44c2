"""The two pre-training objectives as pure functions, and bits per dimension.

Both return per-image losses in nats [batch]; the training loss is their mean over the batch.

Bits per dimension: the model predicts one palette token per pixel, and a pixel of an RGB image
has 3 sub-pixels (dimensions), so

    bits_per_dim = nats_per_token / (3 * ln 2).

This is the cost of the *palette-quantised* image at the model's resolution (the lossy k-means
step itself is not counted), so it is not comparable with bits/dim of 8-bit images.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SUBPIXELS_PER_TOKEN = 3


def masked_loss_sums(apply_fn, params, batch: dict, rng, *, objective: str,
                     mask_prob: float) -> dict:
  """Sum of per-image nats over the real (unpadded, `batch["mask"]`) images, and their count."""
  per_image = per_image_loss(apply_fn, params, batch["tokens"], rng, objective=objective,
                             mask_prob=mask_prob)
  mask = batch["mask"].astype(jnp.float32)
  return {"nats_sum": jnp.sum(per_image * mask), "count": jnp.sum(mask)}


def bits_per_dim(nats_per_token):
  return nats_per_token / (SUBPIXELS_PER_TOKEN * math.log(2.0))


def token_nats(logits, tokens):
  """Cross-entropy in nats of each token: logits [b, l, v] f32, tokens [b, l] -> [b, l]."""
  logits = logits.astype(jnp.float32)
  target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target


def next_pixel_loss(logits, tokens):
  """Per-image mean next-pixel cross-entropy [b]. logits[:, i] predicts tokens[:, i]."""
  return jnp.mean(token_nats(logits, tokens), axis=-1)


def sample_keep_mask(rng, shape, mask_prob: float):
  """BERT mask as in the original: a pixel is kept where uniform > mask_prob. True = keep."""
  return jax.random.uniform(rng, shape) > mask_prob


def masked_pixel_loss(logits, tokens, keep_mask):
  """Per-image mean cross-entropy over the masked (not kept) pixels [b].

  An image with no masked pixel (possible only for tiny images) contributes 0.
  """
  masked = (~keep_mask).astype(jnp.float32)
  total = jnp.sum(token_nats(logits, tokens) * masked, axis=-1)
  return total / jnp.maximum(jnp.sum(masked, axis=-1), 1.0)


def keep_mask_for(objective: str, rng, shape, mask_prob: float):
  """The visible-pixel mask the objective feeds the model: None for next-pixel prediction."""
  if objective == "next_pixel":
    return None
  if objective == "masked_pixel":
    return sample_keep_mask(rng, shape, mask_prob)
  raise ValueError(f"unknown objective {objective!r}")


def loss_from_logits(logits, tokens, keep):
  """Per-image nats [b]: next-pixel without a mask, masked-pixel over the masked pixels."""
  if keep is None:
    return next_pixel_loss(logits, tokens)
  return masked_pixel_loss(logits, tokens, keep)


def per_image_loss(apply_fn, params, tokens, rng, *, objective: str, mask_prob: float):
  """Runs the model and the objective. Returns per-image nats [b]."""
  keep = keep_mask_for(objective, rng, tokens.shape, mask_prob)
  return loss_from_logits(apply_fn(params, tokens, keep), tokens, keep)
