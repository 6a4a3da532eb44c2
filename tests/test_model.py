"""The iGPT transformer: shapes, causality, init, norm math and the paper's parameter counts."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from igpt_jax import model as model_lib


def small_cfg(**kw):
  base = dict(vocab_size=32, seq_len=16, num_layers=2, width=32, num_heads=4)
  base.update(kw)
  return model_lib.ModelConfig(**base)


def init_params(cfg, seed=0, randomize_head=True):
  """Initialised params; the zero-initialised head is replaced so logits depend on inputs."""
  m = model_lib.IGPT(cfg)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(seed),
                                jnp.zeros((1, cfg.seq_len), jnp.int32))["params"])
  if randomize_head:
    params["wtet"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["wtet"].shape)
  return m, params


def load_config_file(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_logits_shape_and_zero_head_gives_uniform():
  cfg = small_cfg()
  m, params = init_params(cfg, randomize_head=False)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (3, cfg.seq_len), 0, cfg.vocab_size)
  logits = m.apply({"params": params}, tokens)
  assert logits.shape == (3, cfg.seq_len, cfg.vocab_size) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits), 0.0)  # zero-initialised head, as released


@pytest.mark.parametrize("j", [0, 7, 15])
def test_next_pixel_is_causal(j):
  cfg = small_cfg()
  m, params = init_params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, cfg.seq_len), 0, cfg.vocab_size)
  changed = tokens.at[:, j].set((tokens[:, j] + 5) % cfg.vocab_size)
  a = np.asarray(m.apply({"params": params}, tokens))
  b = np.asarray(m.apply({"params": params}, changed))
  # Logits at i predict token i from tokens < i: positions <= j cannot see pixel j.
  np.testing.assert_array_equal(a[:, :j + 1], b[:, :j + 1])
  if j + 1 < cfg.seq_len:
    assert np.all(np.abs(a[:, j + 1:] - b[:, j + 1:]).max(axis=-1) > 1e-6)


def test_masked_pixel_model_is_bidirectional():
  cfg = small_cfg(causal=False)
  m, params = init_params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, cfg.seq_len), 0, cfg.vocab_size)
  keep = jnp.ones_like(tokens, bool)
  j = cfg.seq_len - 1
  changed = tokens.at[:, j].set((tokens[:, j] + 5) % cfg.vocab_size)
  a = np.asarray(m.apply({"params": params}, tokens, keep))
  b = np.asarray(m.apply({"params": params}, changed, keep))
  assert np.all(np.abs(a - b).max(axis=-1) > 1e-6)  # every position sees the last pixel


def test_masked_positions_hide_their_token():
  cfg = small_cfg(causal=False)
  m, params = init_params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, cfg.seq_len), 0, cfg.vocab_size)
  keep = jnp.ones_like(tokens, bool).at[:, 3].set(False)
  changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(m.apply({"params": params}, tokens, keep)),
                                np.asarray(m.apply({"params": params}, changed, keep)))


def test_norm_matches_igpt_formula():
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3 + 1
  norm = model_lib.Norm()
  variables = norm.init(jax.random.PRNGKey(0), x)
  g = np.linspace(0.5, 2.0, 16).astype(np.float32)
  variables = {"params": {"scale": g}}
  y = np.asarray(norm.apply(variables, x))
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * g  # no mean, no bias
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_quick_gelu():
  x = np.linspace(-4, 4, 9, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(model_lib.quick_gelu(x)), x / (1 + np.exp(-1.702 * x)),
                             rtol=1e-6)


def test_init_follows_the_release():
  cfg = model_lib.ModelConfig(vocab_size=512, seq_len=1024, num_layers=4, width=256,
                              num_heads=8)
  _, params = init_params(cfg, randomize_head=False)
  std = lambda x: float(np.std(np.asarray(x)))
  assert std(params["wpe"]) == pytest.approx(0.01, rel=0.05)
  assert std(params["wte"]) == pytest.approx(0.02, rel=0.05)
  assert std(params["sos"]) == pytest.approx(0.02, rel=0.2)
  blocks = params["blocks"]
  assert blocks["attn"]["query"].shape == (4, 256, 8, 32)  # [layers, embed, heads, head_dim]
  assert std(blocks["attn"]["query"]) == pytest.approx(1 / math.sqrt(256), rel=0.05)
  assert std(blocks["attn"]["out"]) == pytest.approx(1 / math.sqrt(256 * 4), rel=0.05)
  assert std(blocks["mlp"]["fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
  assert std(blocks["mlp"]["proj"]["kernel"]) == pytest.approx(0.02, rel=0.05)
  np.testing.assert_array_equal(np.asarray(params["wtet"]), 0.0)
  assert std(blocks["attn"]["key"]) == pytest.approx(1 / math.sqrt(256), rel=0.05)
  assert std(blocks["attn"]["value"]) == pytest.approx(1 / math.sqrt(256), rel=0.05)
  # q, k and v are drawn independently (one shared draw would make attention degenerate).
  assert not np.allclose(blocks["attn"]["query"], blocks["attn"]["key"])
  assert not np.allclose(blocks["attn"]["key"], blocks["attn"]["value"])
  # Every layer's weights are their own draw, not one layer repeated by the scan.
  assert not np.allclose(blocks["attn"]["query"][0], blocks["attn"]["query"][1])
  for norm in (blocks["ln_1"]["scale"], blocks["ln_2"]["scale"], params["ln_f"]["scale"]):
    np.testing.assert_array_equal(np.asarray(norm), 1.0)  # RMSNorm gains start at one
  assert blocks["ln_1"]["scale"].shape == blocks["ln_2"]["scale"].shape == (4, 256)
  # No biases anywhere, as in the original.
  names = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert not [n for n in names if "bias" in n]


# Exact counts from the released shapes (IGPT_REFERENCE.md) and the paper's rounded figures.
PAPER_SIZES = {
    "s": (76_571_648, 76e6),
    "m": (455_157_760, 455e6),
    "l": (1_362_250_752, 1.4e9),
    "xl": (None, 6.8e9),
}


# The paper's recipe (IGPT_REFERENCE.md), written out here rather than read from config_lib:
# (layers, width, heads, batch, steps, image size) per size.
PAPER_RECIPE = {
    "s": (24, 512, 8, 128, 1_000_000, 32),
    "m": (36, 1024, 8, 128, 1_000_000, 32),
    "l": (48, 1536, 16, 128, 1_000_000, 32),
    "xl": (60, 3072, None, 64, 2_000_000, 64),  # the paper does not give XL's heads
}


@pytest.mark.parametrize("name", sorted(PAPER_RECIPE))
def test_size_configs_are_the_paper_recipe(name):
  """configs/<size>.py and configs/imagenet.py:<size> load the paper's ImageNet recipe: its
  sizes, batch and steps, Adam (0.9, 0.95), no weight decay or clipping, one-epoch warmup,
  4% held out, the 224-of-[256, 384] crop; and both files give the same config."""
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  layers, width, heads, batch, steps, size = PAPER_RECIPE[name]
  c = load_config_file(name)
  assert (c.model.num_layers, c.model.width, c.batch_size, c.total_steps, c.image_size) == (
      layers, width, batch, steps, size)
  assert heads is None or c.model.num_heads == heads
  assert c.model.width % c.model.num_heads == 0
  assert (c.adam_b1, c.adam_b2, c.weight_decay, c.grad_clip_norm, c.warmup_steps) == (
      0.9, 0.95, 0.0, 0.0, -1)
  assert c.dataset == "imagenet2012" and c.holdout_fraction == 0.04 and c.palette_size == 512
  assert c.train_crop_fraction == pytest.approx((224 / 384, 224 / 256))
  assert c.objective == "next_pixel" and c.model.dtype == "float32"
  if name == "s":
    assert c.learning_rate == 3e-3  # the one learning rate the paper gives
  config_lib.validate(c, 8)
  assert importlib.import_module("configs.imagenet").get_config(name).to_dict() == c.to_dict()
  with pytest.raises(config_lib.ConfigError, match="use one of"):
    config_lib.imagenet_config("xxl")


@pytest.mark.parametrize("name", ["s", "m", "l", "xl"])
def test_paper_parameter_counts_abstractly(name):
  config = load_config_file(name)
  cfg = model_lib.model_config_from(config)
  n = model_lib.count_params(model_lib.abstract_params(cfg))  # eval_shape: nothing allocated
  exact, paper = PAPER_SIZES[name]
  if exact is not None and config.image_size == 32:
    assert n == exact
  assert abs(n - paper) / paper < 0.03, (name, n)


def test_bfloat16_compute_keeps_float32_params():
  cfg = small_cfg(dtype="bfloat16")
  m, params = init_params(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  logits32 = model_lib.IGPT(small_cfg()).apply({"params": params}, tokens)
  logits16 = m.apply({"params": params}, tokens)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_does_not_change_gradients(policy):
  tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 16), 0, 32)

  def grads(cfg):
    m, params = init_params(cfg)
    loss = lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
    return jax.grad(loss)(params)

  g0, g1 = grads(small_cfg()), grads(small_cfg(remat_policy=policy))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
