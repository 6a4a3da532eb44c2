"""The iGPT transformer, faithful to OpenAI's released image-gpt `model.py`.

GPT-2 pre-norm blocks with iGPT's choices: a gain-only RMS norm (no mean subtraction, no bias,
eps 1e-5), no biases anywhere, `x * sigmoid(1.702 x)` in a 4x MLP, learned token and position
embeddings, a learned start-of-sequence vector for next-pixel prediction, and an untied,
zero-initialised output head over the palette.

One `IGPT` module serves both objectives (`causal=True`: next-pixel; `causal=False`: BERT-style
masked-pixel). Layers are a `nn.scan` over one `Block`, so compile time does not grow with depth
and every block parameter has a leading `layers` axis.

Every parameter and main activation carries logical axis names; `igpt_jax.sharding` maps them
to mesh axes with one table of rules from the config:
  params:       vocab, length, embed, heads, kv, mlp, layers
  activations:  act_batch, act_length, act_embed, act_heads, act_mlp, act_vocab
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_EPS = 1e-5
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static shape and numerics of an iGPT model."""

  vocab_size: int = 512
  seq_len: int = 1024
  num_layers: int = 24
  width: int = 512
  num_heads: int = 8
  mlp_ratio: int = 4
  causal: bool = True
  dtype: str = "float32"  # compute dtype; parameters are always float32.
  remat_policy: str = "none"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def model_config_from(config) -> ModelConfig:
  """Builds the static ModelConfig from an experiment ConfigDict."""
  return ModelConfig(
      vocab_size=config.palette_size,
      seq_len=config.image_size**2,
      num_layers=config.model.num_layers,
      width=config.model.width,
      num_heads=config.model.num_heads,
      mlp_ratio=config.model.mlp_ratio,
      causal=config.objective == "next_pixel",
      dtype=config.model.dtype,
      remat_policy=config.model.remat_policy,
  )


def quick_gelu(x):
  """iGPT's activation: x * sigmoid(1.702 x) (not the tanh/erf GELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _init(std, names):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, names)


class Norm(nn.Module):
  """iGPT norm: x * rsqrt(mean(x^2) + eps) * g. Gain only, computed in float32."""

  @nn.compact
  def __call__(self, x):
    g = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                   (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
    return (y * g).astype(x.dtype)


def attention(q, k, v, causal: bool):
  """Dense multi-head attention. q, k, v: [batch, length, heads, head_dim]."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [batch, length, heads, head_dim]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # x: [batch, length, embed]
    cfg = self.cfg
    dtype = cfg.compute_dtype
    qkv_init = _init(1.0 / math.sqrt(cfg.width), ("embed", "heads", "kv"))
    qkv_shape = (cfg.width, cfg.num_heads, cfg.head_dim)
    heads = ("act_batch", "act_length", "act_heads", None)

    def project(name):  # [batch, length, heads, head_dim]
      w = self.param(name, qkv_init, qkv_shape, jnp.float32)
      return constrain(jnp.einsum("bld,dhk->blhk", x.astype(dtype), w.astype(dtype)), heads)

    out = attention(project("query"), project("key"), project("value"), cfg.causal)
    out_std = 1.0 / math.sqrt(cfg.width * cfg.num_layers)
    w_out = self.param("out", _init(out_std, ("heads", "kv", "embed")),
                       (cfg.num_heads, cfg.head_dim, cfg.width), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", out, w_out.astype(dtype))


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # x: [batch, length, embed]
    cfg = self.cfg
    h = nn.Dense(cfg.mlp_ratio * cfg.width, use_bias=False,
                 kernel_init=_init(0.02, ("embed", "mlp")),
                 dtype=cfg.compute_dtype, param_dtype=jnp.float32, name="fc")(x)
    h = constrain(quick_gelu(h), ("act_batch", "act_length", "act_mlp"))
    return nn.Dense(cfg.width, use_bias=False, kernel_init=_init(0.02, ("mlp", "embed")),
                    dtype=cfg.compute_dtype, param_dtype=jnp.float32, name="proj")(h)


class Block(nn.Module):
  """Pre-norm transformer block; the scan body (carry in, carry out)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, _):
    x = x + Attention(self.cfg, name="attn")(Norm(name="ln_1")(x))
    x = x + Mlp(self.cfg, name="mlp")(Norm(name="ln_2")(x))
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    return x, None


def _remat_block(policy: str):
  if policy == "none":
    return Block
  policies = {
      "full": None,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
      "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  }
  return nn.remat(Block, policy=policies[policy], prevent_cse=False)


class IGPT(nn.Module):
  """Image GPT. tokens [batch, length] int32 -> logits [batch, length, vocab] float32.

  Next-pixel (`causal`): the input at position i is the embedding of token i-1 (the learned
  `sos` vector at i=0), so logits[:, i] predict tokens[:, i] from tokens[:, :i].
  Masked-pixel: `keep_mask` [batch, length] bool; embeddings of masked tokens are zeroed
  (position embeddings are still added), attention is bidirectional.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, keep_mask: Optional[jax.Array] = None):
    cfg = self.cfg
    batch, length = tokens.shape
    wte = self.param("wte", _init(0.02, ("vocab", "embed")), (cfg.vocab_size, cfg.width))
    wpe = self.param("wpe", _init(0.01, ("length", "embed")), (cfg.seq_len, cfg.width))
    h = jnp.take(wte, tokens, axis=0)  # [batch, length, embed]
    if cfg.causal:
      sos = self.param("sos", _init(0.02, ("embed",)), (cfg.width,))
      h = jnp.concatenate([jnp.broadcast_to(sos, (batch, 1, cfg.width)), h[:, :-1]], axis=1)
    elif keep_mask is not None:
      h = h * keep_mask[..., None].astype(h.dtype)
    h = (h + wpe[None, :length]).astype(cfg.compute_dtype)
    h = constrain(h, ("act_batch", "act_length", "act_embed"))

    blocks = nn.scan(
        _remat_block(cfg.remat_policy),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    h, _ = blocks(cfg, name="blocks")(h, None)

    h = Norm(name="ln_f")(h)
    wtet = self.param("wtet", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("vocab", "embed")),
                      (cfg.vocab_size, cfg.width))
    logits = jnp.einsum("bld,vd->blv", h, wtet.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def abstract_params(cfg: ModelConfig):
  """Parameter shapes (boxed with logical names) without allocating anything."""
  model = IGPT(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
