"""The optimizer and learning-rate schedule of pre-training and fine-tuning alike."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def warmup_cosine(peak, warmup, total) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total`.

  The three numbers may be Python numbers or traced scalars: the train step takes them as an
  input (`train_state.lr_args`), so runs that differ only in length or warmup share one
  compiled step.
  """
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    rising = peak * step / jnp.maximum(warmup, 1)
    done = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1), 0.0, 1.0)
    return jnp.where(step < warmup, rising, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * done)))

  return schedule


def adam(config, schedule) -> optax.GradientTransformation:
  """Adam(config.adam_b1, adam_b2 (0.95 in the paper)) with decoupled weight decay (0 in the
  paper) and, when config.grad_clip_norm > 0, global-norm clipping first."""
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*chain)
