"""Sampling and completion: a key/value-cached decoder, the naive reference, and BERT infilling.

Next-pixel models (`sample`): one jitted program; each step feeds the previous pixel through
`kv_cache.decode` over a key/value cache of the positions before it, so a pixel costs one
position's worth of compute instead of a full forward pass. Positions go in blocks, each a
`fori_loop` over a cache just long enough for the block, so a step's cost grows with its
position; on a CPU, a block runs for a group of images at a time, small enough for their cache
to stay in the processor's cache between steps (`default_group`). The first `prefix_len`
pixels are copied from `prefix` (completions) instead of drawn; whole blocks of them fill the
cache in one pass.

`sample_naive` is the original release's sampler: a full forward pass over the whole sequence
for every pixel. It is kept as the reference the cached sampler is tested and benchmarked
against.

Masked-pixel (BERT) models (`infill`): every masked pixel is predicted at once from the visible
ones; the `per_step` most confident predictions (highest probability of the chosen color) are
committed, unmasked, and the rest predicted again with them visible, until nothing is masked.
Unconditional BERT samples start from a fully masked image.

Every draw comes from `jax.random.fold_in(rng, position or pass)`, so a seed reproduces the
images. `temperature`, `top_k` (0 = off) and `top_p` (1.0 = off) shape the distribution;
`greedy=True` takes the argmax.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import errors
from igpt_jax import flops
from igpt_jax import kv_cache
from igpt_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0
  top_k: int = 0  # keep the k most likely colors; 0 keeps all.
  top_p: float = 1.0  # keep the smallest set of colors with this much probability; 1.0 keeps all.
  greedy: bool = False

  def __post_init__(self):
    problems = sampling_problems(self.temperature, self.top_k, self.top_p)
    if problems:
      raise errors.FlagError("; ".join(problems))


def sampling_problems(temperature: float, top_k: int, top_p: float) -> list[str]:
  """What is wrong with these sampling settings (empty when they can work)."""
  problems = []
  if not temperature > 0:
    problems.append(f"temperature={temperature} must be > 0 (it divides the logits; 0 would "
                    "make every pixel color 0 and < 0 inverts the distribution): use greedy "
                    "decoding (--greedy) for the most likely colors")
  if top_k < 0:
    problems.append(f"top_k={top_k} must be >= 0 (0 keeps all colors)")
  if not 0 < top_p <= 1:
    problems.append(f"top_p={top_p} must be in (0, 1] (1 keeps all colors)")
  return problems


def filter_logits(logits, cfg: SamplingConfig):
  """Applies temperature, top-k and top-p to logits [..., vocab] (removed entries -> -inf)."""
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest prefix whose mass reaches top_p: keep a color if the mass before it < top_p.
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < cfg.top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def gumbel_noise(rng, shape):
  """The noise `choose` adds to the logits of `shape` [..., vocab] for this key."""
  return jax.random.gumbel(rng, shape)


NOISE_CHUNK = 2**19  # numbers drawn in one pass by `block_noise`


def block_noise(rng, lo: int, hi: int, shape):
  """`gumbel_noise(fold_in(rng, i), shape)` for i = lo..hi-1, stacked: [hi - lo, *shape].

  Drawn before a block's steps, in passes over about `NOISE_CHUNK` numbers (several steps
  each) and picked per step: the same numbers as drawing them step by step. On a CPU a pass
  of that size costs ~0.6x as much per number as one step's alone, and a third of one pass
  over a whole 64x64 block: the random-bit generator loops over its array five times,
  so an array larger than the processor's caches is read from memory five times."""
  steps = hi - lo
  per_pass = max(1, min(steps, NOISE_CHUNK // math.prod(shape)))
  per_pass = max(d for d in range(1, per_pass + 1) if steps % d == 0)  # passes of equal size
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(lo, hi))
  draw = jax.vmap(gumbel_noise, in_axes=(0, None))
  passes = keys.reshape(steps // per_pass, per_pass, *keys.shape[1:])
  noise = jax.lax.map(lambda k: draw(k, shape), passes)
  return noise.reshape(steps, *shape)


def first_argmax(x):
  """`jnp.argmax(x, axis=-1)` as int32 (the first of equal maxima; the first NaN if there is
  one) in two plain reductions. XLA:CPU's argmax, one reduction over (value, index) pairs, took
  4x as long on [32, 512] logits: ~50 us of every sampling step at batch 32."""
  nan = jnp.isnan(x)
  top = jnp.max(x, axis=-1, keepdims=True)  # XLA:CPU's max may skip NaN
  hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == top)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def choose(rng, logits, cfg: SamplingConfig, noise=None):
  """One color per row of logits [..., vocab] -> int32 [...]: the Gumbel-max draw
  argmax(logits + noise), which is `jax.random.categorical(rng, logits)`. `noise`, when
  given, is `gumbel_noise(rng, logits.shape)` computed beforehand."""
  if cfg.greedy:
    return first_argmax(logits)
  noise = gumbel_noise(rng, logits.shape) if noise is None else noise
  return first_argmax(filter_logits(logits, cfg) + noise)


def default_block(seq_len: int) -> int:
  """Positions per decoding block: 16 blocks (8 below 32x32), none shorter than 32 positions."""
  blocks = 16 if seq_len >= 1024 else 8
  return max(min(seq_len, 32), -(-seq_len // blocks))


CPU_GROUP_CACHE_BYTES = 16 * 2**20  # a group's full cache on a CPU: half a 32 MiB L3


def default_group(model_cfg: model_lib.ModelConfig, batch: int) -> int:
  """Images decoded together in each step (`draw_block`): on one CPU device, the largest divisor
  of `batch` (2 or more) whose cache at full length fits `CPU_GROUP_CACHE_BYTES` and is larger
  than the weights a step reads; otherwise (accelerators, a mesh of several devices, a model
  whose weights outweigh such a group's cache) the whole batch.

  Why: every step reads the whole cache, and the next step reads it again. A group whose cache
  stays in the processor's last-level cache between its steps reads it from there instead of
  from memory: at 64x64 with 2 layers x 64 (4 MiB of cache an image), 32 images in groups of 4
  drew ~1.3x as many images/s as all 32 at each step (bench/README.md). But each group's steps
  read the weights again: 8 layers x 256 (24 MiB of weights) at 16x16 drew 0.6x as many in
  groups of 4 as all at once. (One-image groups ran several times slower than two-image ones
  on XLA:CPU.) Accelerators read the weights once a step for the whole batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if jax.default_backend() != "cpu" or (not mesh.empty and mesh.size > 1):
    return batch
  per_image = kv_cache.bytes_per_image(model_cfg)
  weights = jnp.dtype(model_cfg.compute_dtype).itemsize * flops.matmul_params(
      model_cfg.num_layers, model_cfg.width, model_cfg.mlp_ratio, model_cfg.vocab_size)
  fits = [g for g in range(2, batch + 1) if batch % g == 0
          and weights < g * per_image <= CPU_GROUP_CACHE_BYTES]
  return max(fits) if fits else batch


def _groups(x, axis: int, groups: int):
  """x with its image axis `axis` split into [groups, images per group], the group axis first."""
  x = x.reshape(*x.shape[:axis], groups, -1, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _ungroup(x):
  """The inverse of `_groups(x, 0, ...)`: [groups, images per group, ...] -> [images, ...]."""
  return x.reshape(-1, *x.shape[2:])


def draw_block(model_cfg, params, rng, carry, lo: int, hi: int, *, prefix_len: int,
               cfg: SamplingConfig, group: int = 0):
  """Draws positions lo..hi-1 (copies those before `prefix_len`), one step each, over a cache
  grown to `hi` rows.

  carry: (tokens [batch, seq_len], cache); `cache` holds the rows before lo (it may be shorter
  than `hi`). group: images per step (0: `default_group`); the block's steps run for one group
  of images after another. The images drawn do not depend on it: each image's noise is its
  row of the whole batch's.
  """
  tokens, cache = carry
  batch = tokens.shape[0]
  cache = kv_cache.grow(cache, hi)
  noise = None
  if not cfg.greedy:
    noise = block_noise(rng, lo, hi, (batch, model_cfg.vocab_size))
    noise = model_lib.constrain(noise, (None, "act_batch", None))

  def steps(carry, noise):  # the block for one group of images

    def body(i, carry):
      tokens, cache = carry
      prev = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(i - 1, 0), 1, axis=1)
      logits, cache = kv_cache.decode(params, model_cfg, cache, prev, i)
      # The randomness is the block's noise (greedy steps need none): no key per step.
      drawn = choose(None, logits[:, 0], cfg, None if noise is None else noise[i - lo])
      token = jnp.where(i < prefix_len, tokens[:, i], drawn)
      return tokens.at[:, i].set(token), cache

    return jax.lax.fori_loop(lo, hi, body, carry)

  group = group or default_group(model_cfg, batch)
  if batch % group:
    raise ValueError(f"group={group} must divide the batch ({batch} images)")
  groups = batch // group
  if groups == 1:
    return steps((tokens, cache), noise)
  split = lambda x: _groups(x, 0, groups)
  tokens, cache = jax.lax.map(
      lambda xs: steps(*xs),
      ((split(tokens), jax.tree_util.tree_map(split, cache)),
       None if noise is None else _groups(noise, 1, groups)))
  return _ungroup(tokens), jax.tree_util.tree_map(_ungroup, cache)


@functools.partial(jax.jit, static_argnames=("model_cfg", "prefix_len", "cfg", "block", "group"))
def sample(model_cfg: model_lib.ModelConfig, params, rng, prefix, *, prefix_len: int = 0,
           cfg: SamplingConfig = SamplingConfig(), block: int = 0, group: int = 0):
  """Next-pixel sampling with a key/value cache (`igpt_jax.kv_cache`).

  prefix: int32 [batch, seq_len]; its first `prefix_len` pixels are kept, the rest are drawn
  (their values in `prefix` are ignored). Returns int32 [batch, seq_len].

  Positions are decoded in blocks of `block` (0: `default_block`); in block b the cache is
  (b+1)·block rows long, so early pixels cost less than late ones. Whole blocks inside the
  prefix are written to the cache in one pass each, not a pixel at a time. Each block's steps
  run `group` images at a time (0: `default_group`), which changes the speed, not the images.
  """
  if not model_cfg.causal:
    raise ValueError("cached sampling needs a next-pixel (causal) model; masked-pixel models "
                     "are sampled by iterative infilling (igpt_jax.decoding.infill).")
  batch, seq_len = prefix.shape
  block = block or default_block(seq_len)
  params = kv_cache.for_decoding(params, model_cfg)
  tokens = prefix.astype(jnp.int32)
  cache = kv_cache.empty(model_cfg, batch, 0)
  # Each position's input pixel (the one before it), for blocks filled from the prefix.
  prev = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), tokens[:, :seq_len - 1]], 1)
  for lo in range(0, seq_len, block):
    hi = min(seq_len, lo + block)
    if hi <= prefix_len:  # the whole block is given: its keys and values in one pass.
      _, cache = kv_cache.decode(params, model_cfg, kv_cache.grow(cache, hi), prev[:, lo:hi], lo)
    else:
      tokens, cache = draw_block(model_cfg, params, rng, (tokens, cache), lo, hi,
                                 prefix_len=prefix_len, cfg=cfg, group=group)
  return tokens


@functools.partial(jax.jit, static_argnames=("apply_fn", "prefix_len", "cfg"))
def sample_naive(apply_fn, params, rng, prefix, *, prefix_len: int = 0,
                 cfg: SamplingConfig = SamplingConfig()):
  """The release's sampler: a full forward pass per pixel. Same contract as `sample`."""

  def body(i, tokens):
    logits = apply_fn(params, tokens)
    step_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    drawn = choose(jax.random.fold_in(rng, i), step_logits, cfg)
    return tokens.at[:, i].set(jnp.where(i < prefix_len, tokens[:, i], drawn))

  return jax.lax.fori_loop(0, prefix.shape[1], body, prefix.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("apply_fn", "per_step", "num_passes", "cfg"))
def _infill(apply_fn, params, rng, tokens, keep, *, per_step: int, num_passes: int,
            cfg: SamplingConfig):

  def body(step, carry):
    tokens, keep = carry
    logits = apply_fn(params, tokens, keep)  # [batch, length, vocab]
    drawn = choose(jax.random.fold_in(rng, step), logits, cfg)
    logp = jax.nn.log_softmax(filter_logits(logits, dataclasses.replace(cfg, top_k=0,
                                                                          top_p=1.0)))
    confidence = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
    confidence = jnp.where(keep, -jnp.inf, confidence)
    # The per_step most confident masked pixels of each image.
    threshold = jax.lax.top_k(confidence, per_step)[0][..., -1:]
    # (Fewer masked pixels than per_step left: the threshold is -inf and all of them commit.)
    commit = (~keep) & (confidence >= threshold)
    return jnp.where(commit, drawn, tokens), keep | commit

  tokens, keep = jax.lax.fori_loop(0, num_passes, body, (tokens.astype(jnp.int32), keep))
  return tokens, keep


def infill(apply_fn, params, rng, tokens, keep, *, per_step: int = 16,
           cfg: SamplingConfig = SamplingConfig()):
  """Masked-pixel infilling, most confident pixels first.

  tokens: int32 [batch, length]; keep: bool [batch, length], False where a pixel is to be filled.
  Kept pixels are never changed. Returns int32 [batch, length] with every pixel filled.
  """
  keep = np.asarray(keep, bool)
  per_step = min(per_step, keep.shape[1])
  num_passes = max(1, math.ceil(int((~keep).sum(axis=1).max()) / per_step))
  filled, _ = _infill(apply_fn, params, rng, jnp.asarray(tokens), jnp.asarray(keep),
                      per_step=per_step, num_passes=num_passes, cfg=cfg)
  return filled
