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

from igpt_jax import attention as attention_lib

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
  attention: str = "auto"  # igpt_jax.attention.IMPLEMENTATIONS; all exact.
  attention_block: int = 128  # query block of the blockwise attention kernel.
  # Layers unrolled per iteration of the layer scan (1: a loop; num_layers: straight-line code,
  # which `igpt_jax.planner` compiles so that XLA's cost analysis counts every layer).
  scan_unroll: int = 1

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
      # .get: configs saved before these fields existed (a converted run's config.json).
      attention=config.model.get("attention", "auto"),
      attention_block=config.model.get("attention_block", 128),
  )


GELU_SLOPE = 1.702


def quick_gelu(x):
  """iGPT's activation: x * sigmoid(1.702 x) (not the tanh/erf GELU)."""
  return x * jax.nn.sigmoid(GELU_SLOPE * x)


def _init(std, names):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, names)


def rms_norm(x, g):
  """iGPT norm: x * rsqrt(mean(x^2) + eps) * g. Gain only, computed in float32, x's dtype out."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
  return (y * g).astype(x.dtype)


class Norm(nn.Module):
  """`rms_norm` with its gain as a parameter."""

  @nn.compact
  def __call__(self, x):
    g = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                   (x.shape[-1],), jnp.float32)
    return rms_norm(x, g)


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

    q, k, v = project("query"), project("key"), project("value")
    out = attention_lib.attention(q, k, v, causal=cfg.causal, impl=cfg.attention,
                                  block=cfg.attention_block)
    out_std = 1.0 / math.sqrt(cfg.width * cfg.num_layers)
    w_out = self.param("out", _init(out_std, ("heads", "kv", "embed")),
                       (cfg.num_heads, cfg.head_dim, cfg.width), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", out, w_out.astype(dtype))


@jax.custom_vjp
def mlp(x, w_fc, w_proj):
  """quick_gelu(x @ w_fc) @ w_proj. x: [batch, length, embed]; w_fc: [embed, mlp].

  The same function as composing the ops; its hand-written backward keeps only x and the
  pre-activation (autodiff of quick_gelu keeps three [batch, length, mlp] tensors) and computes
  the weight gradients in the operand order the CPU compiler lays out without a transposed
  copy of the [batch, length, mlp] gradient: 1.6x faster training steps on a CPU at the
  bench/train_step.py reference shape, no change on numbers beyond rounding.
  """
  return _mlp_fwd(x, w_fc, w_proj)[0]


def _mlp_hidden(h):
  return constrain(h, ("act_batch", "act_length", "act_mlp"))


def _mlp_fwd(x, w_fc, w_proj):
  h = _mlp_hidden(jnp.einsum("bld,dm->blm", x, w_fc))
  return jnp.einsum("blm,md->bld", quick_gelu(h), w_proj), (x, h, w_fc, w_proj)


def _mlp_bwd(residuals, dy):
  x, h, w_fc, w_proj = residuals
  s = jax.nn.sigmoid(GELU_SLOPE * h)
  d_proj = jnp.einsum("bld,blm->dm", dy, h * s).T  # h * s = quick_gelu(h)
  da = _mlp_hidden(jnp.einsum("bld,md->blm", dy, w_proj))
  dh = da * (s + GELU_SLOPE * h * s * (1 - s))  # d quick_gelu / dh
  d_fc = jnp.einsum("bld,blm->dm", x, dh)
  dx = jnp.einsum("blm,dm->bld", dh, w_fc)
  return dx, d_fc, d_proj


mlp.defvjp(_mlp_fwd, _mlp_bwd)


class Kernel(nn.Module):
  """A bare weight matrix, named like `nn.Dense`'s (`<name>/kernel`)."""

  shape: tuple[int, int]
  names: tuple[str, str]

  @nn.compact
  def __call__(self):
    return self.param("kernel", _init(0.02, self.names), self.shape, jnp.float32)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # x: [batch, length, embed]
    cfg = self.cfg
    dtype = cfg.compute_dtype
    hidden = cfg.mlp_ratio * cfg.width
    w_fc = Kernel((cfg.width, hidden), ("embed", "mlp"), name="fc")()
    w_proj = Kernel((hidden, cfg.width), ("mlp", "embed"), name="proj")()
    return mlp(x.astype(dtype), w_fc.astype(dtype), w_proj.astype(dtype))


class Block(nn.Module):
  """Pre-norm transformer block; the scan body (carry in, carry out).

  With `pool`, the scan output is the block's normalised input averaged over positions
  [batch, embed] in float32: the probe feature of the layer below (see `IGPT`).
  """

  cfg: ModelConfig
  pool: bool = False

  @nn.compact
  def __call__(self, x, _):
    normed = Norm(name="ln_1")(x)
    x = x + Attention(self.cfg, name="attn")(normed)
    x = x + Mlp(self.cfg, name="mlp")(Norm(name="ln_2")(x))
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    return x, (pool_positions(normed) if self.pool else None)


def pool_positions(h):
  """Average over positions: [batch, length, embed] -> float32 [batch, embed]."""
  return jnp.mean(h.astype(jnp.float32), axis=1)


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

  `output`: "logits" (the default), "features" or "both" ((logits, features)). Features are
  float32 [batch, num_layers + 1, embed]: row l is `mean over positions of norm(h_l)`, the
  normalised input to the next block (the paper's probe features). Row 0 is the embedding
  through block 1's `ln_1`, row l the stream after block l through block l+1's `ln_1`, the last
  row the final stream through `ln_f`.

  Sampling decodes with the same parameters over an explicit key/value cache
  (`igpt_jax.kv_cache`), one position per step.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, keep_mask: Optional[jax.Array] = None, output: str = "logits"):
    cfg = self.cfg
    if output not in ("logits", "features", "both"):
      raise ValueError(f"output={output!r}; use 'logits', 'features' or 'both'.")
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
    if output == "logits":
      return self._head(self._blocks(h))
    h, pooled = self._blocks(h, pool=True)  # pooled: [layers, batch, embed]
    h = Norm(name="ln_f")(h)
    feats = jnp.concatenate([jnp.swapaxes(pooled, 0, 1), pool_positions(h)[:, None]], axis=1)
    if output == "features":
      return feats
    return self._logits(h), feats

  def _blocks(self, h, pool: bool = False):
    cfg = self.cfg
    blocks = nn.scan(
        _remat_block(cfg.remat_policy),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=cfg.num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    h, pooled = blocks(cfg, pool, name="blocks")(h, None)
    return (h, pooled) if pool else h

  def _head(self, h):
    return self._logits(Norm(name="ln_f")(h))

  def _logits(self, h):
    cfg = self.cfg
    wtet = self.param("wtet", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("vocab", "embed")),
                      (cfg.vocab_size, cfg.width))
    return logits_of(h, wtet, cfg.compute_dtype)


def logits_of(h, wtet, dtype):
  """The output head: normalised stream h [batch, length, embed] -> float32 logits."""
  logits = jnp.einsum("bld,vd->blv", h, wtet.astype(dtype), preferred_element_type=jnp.float32)
  return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def make_apply_fn(model: "IGPT"):
  """(params, tokens, keep_mask=None) -> logits: the model as a pure function of its params."""
  def apply_fn(params, tokens, keep_mask=None):
    return model.apply({"params": params}, tokens, keep_mask)
  return apply_fn


def unbox_shapes(boxed):
  """A tree with logically partitioned (boxed) leaves -> the same tree with plain leaves."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x,
                                boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_params(cfg: ModelConfig):
  """Parameter shapes (boxed with logical names) without allocating anything."""
  model = IGPT(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
