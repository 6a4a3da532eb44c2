"""The optimizer and learning-rate schedule of pre-training and fine-tuning alike."""

from __future__ import annotations

import optax


def warmup_cosine(peak: float, warmup: int, total: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=0.0)


def adam(config, schedule) -> optax.GradientTransformation:
  """Adam(config.adam_b1, adam_b2 (0.95 in the paper)) with decoupled weight decay (0 in the
  paper) and, when config.grad_clip_norm > 0, global-norm clipping first."""
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*chain)
