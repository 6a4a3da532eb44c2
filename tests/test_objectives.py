"""The pure objectives: next-pixel and masked-pixel losses, the BERT mask, bits per dimension."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import objectives


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_next_pixel_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 10, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(3, 10))
  expected = -np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0].mean(-1)
  got = objectives.next_pixel_loss(jnp.asarray(logits), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_uniform_prediction_over_512_colors_is_3_bits_per_dim():
  nats = objectives.next_pixel_loss(jnp.zeros((2, 4, 512)), jnp.zeros((2, 4), jnp.int32))
  np.testing.assert_allclose(np.asarray(nats), math.log(512), rtol=1e-6)
  # 9 bits per pixel spread over its 3 sub-pixels.
  assert float(objectives.bits_per_dim(nats[0])) == pytest.approx(3.0, rel=1e-6)


def test_mask_rate_and_independence():
  keep = np.asarray(objectives.sample_keep_mask(jax.random.PRNGKey(0), (64, 1024), 0.15))
  assert keep.dtype == bool
  # 65,536 Bernoulli draws: std of the rate is 0.0014, so 0.006 is > 4 sigma.
  assert abs((~keep).mean() - 0.15) < 0.006
  per_image = (~keep).mean(axis=1)
  assert per_image.std() == pytest.approx(math.sqrt(0.15 * 0.85 / 1024), rel=0.3)
  other = np.asarray(objectives.sample_keep_mask(jax.random.PRNGKey(1), (64, 1024), 0.15))
  assert (keep != other).mean() > 0.2  # a new key, a new mask
  rate = (~np.asarray(objectives.sample_keep_mask(jax.random.PRNGKey(2), (64, 1024), 0.4)))
  assert abs(rate.mean() - 0.4) < 0.01  # configurable


def test_masked_loss_counts_masked_pixels_only_per_image():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, size=(2, 6))
  keep = np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]], bool)
  nll = -np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0]
  expected = np.array([nll[0, [1, 4]].mean(), nll[1, [0]].mean()])  # per image, then batch
  got = objectives.masked_pixel_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(keep))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  # Changing logits at kept positions changes nothing.
  logits2 = logits.copy()
  logits2[keep] += 10 * rng.normal(size=logits2[keep].shape)
  got2 = objectives.masked_pixel_loss(jnp.asarray(logits2), jnp.asarray(tokens), jnp.asarray(keep))
  np.testing.assert_allclose(np.asarray(got2), expected, rtol=1e-5)


def test_per_image_loss_is_pure_in_its_key():
  def apply_fn(params, tokens, keep=None):
    del params
    base = jax.nn.one_hot(tokens, 8) * 2.0
    return base if keep is None else base * keep[..., None]

  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 0, 8)
  f = lambda key: objectives.per_image_loss(apply_fn, None, tokens, key,
                                            objective="masked_pixel", mask_prob=0.15)
  a, b = f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(f(jax.random.PRNGKey(4))))
  with pytest.raises(ValueError, match="unknown objective"):
    objectives.per_image_loss(apply_fn, None, tokens, None, objective="bogus", mask_prob=0.1)
