"""Samples and completions of a trained run, as tokens and grids: what training's final grid,
`python -m igpt_jax.sample` and the samples notebook call (the token-level samplers are in
`decoding.py`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import checkpointing
from igpt_jax import decoding
from igpt_jax import errors
from igpt_jax import image_grid
from igpt_jax import input_pipeline
from igpt_jax import palette as palette_lib
from igpt_jax import run as run_lib
from igpt_jax import sharding


def draw(trained: run_lib.Run, params, num: int, rng, prefix=None, prefix_len: int = 0,
         cfg: decoding.SamplingConfig | None = None, per_step: int = 16) -> np.ndarray:
  """Draws `num` images' tokens [num, seq_len] from `trained`'s model on its mesh: the cached
  sampler for next-pixel models, most-confident-first infilling for masked-pixel ones
  (`per_step` pixels committed a pass). `prefix` [num, seq_len] with `prefix_len` > 0 gives
  completions of its first `prefix_len` pixels."""
  c, model_cfg = trained.config, trained.model_cfg
  cfg = cfg or decoding.SamplingConfig(temperature=c.sample_temperature)
  prefix = (np.zeros((num, model_cfg.seq_len), np.int32) if prefix is None
            else np.asarray(prefix))
  chunk = max(c.batch_size, 1)
  if num > chunk:  # a batch's worth at a time: memory stays that of one batch
    run_lib.log(f"Sampling {num:,} images, {chunk} at a time ...")
    return np.concatenate([
        draw(trained, params, len(prefix[i:i + chunk]), jax.random.fold_in(rng, i // chunk),
             prefix[i:i + chunk], prefix_len, cfg, per_step)
        for i in range(0, num, chunk)])
  with sharding.use(trained.mesh, c):
    if model_cfg.causal:
      tokens = decoding.sample(model_cfg, params, rng, jnp.asarray(prefix),
                               prefix_len=prefix_len, cfg=cfg)
    else:
      keep = np.broadcast_to(np.arange(model_cfg.seq_len) < prefix_len, prefix.shape)
      tokens = decoding.infill(trained.apply_fn, params, rng, prefix, keep, per_step=per_step,
                               cfg=cfg)
  return np.asarray(tokens)


def to_images(trained: run_lib.Run, tokens) -> np.ndarray:
  """Tokens [..., seq_len] -> uint8 RGB images [..., S, S, 3] through the run's palette."""
  return np.asarray(palette_lib.dequantize(jnp.asarray(tokens), trained.palette,
                                           trained.config.image_size))


def half_masked(images: np.ndarray) -> np.ndarray:
  out = images.copy()
  out[:, images.shape[1] // 2:] = 128
  return out


def complete(trained: run_lib.Run, params, split: str, num: int, completions: int, rng,
             cfg: decoding.SamplingConfig, per_step: int = 16) -> np.ndarray:
  """The first `num` images of `split` and `completions` completions of each one's top half:
  int32 tokens [num, 1 + completions, seq_len], the original first."""
  c = trained.config
  if trained.source.split_sizes[split] == 0:
    raise errors.MissingError(
        f"--split={split} holds no images in this run's data (config.holdout_fraction="
        f"{c.holdout_fraction} leaves no validation split); pass --split=test or --split=train.")
  batch = next(input_pipeline.eval_iterator(c, trained.source, trained.palette, split,
                                            local_batch=num, num_batches=1))
  originals = batch["tokens"][batch["mask"]]
  prefix_len = (c.image_size // 2) * c.image_size  # the top half, in raster order
  drawn = [draw(trained, params, len(originals), jax.random.fold_in(rng, j), prefix=originals,
                prefix_len=prefix_len, cfg=cfg, per_step=per_step)
           for j in range(completions)]
  return np.stack([originals] + drawn, axis=1).astype(np.int32)


def completion_grid(trained: run_lib.Run, tokens: np.ndarray) -> np.ndarray:
  """`complete`'s tokens as one image: a row per image (original, its top half, completions)."""
  images = to_images(trained, tokens)  # [num, 1 + completions, S, S, 3]
  rows = np.concatenate([images[:, :1], half_masked(images[:, 0])[:, None], images[:, 1:]],
                        axis=1)
  return image_grid.grid(rows.reshape(-1, *rows.shape[2:]), cols=rows.shape[1])


def write(config, workdir: str, *, mode: str = "unconditional", num: int = 16,
          completions: int = 4, split: str = "test",
          cfg: decoding.SamplingConfig = decoding.SamplingConfig(), per_step: int = 16,
          seed: int = 0) -> list[str]:
  """Draws `mode` samples from the run's latest checkpoint into workdir/samples (a grid .png
  and the tokens .npy); returns the paths written."""
  checkpointing.check_compatible(workdir, config)
  if cfg.top_k > config.palette_size:
    raise errors.FlagError(f"--top_k={cfg.top_k} is more than the palette's "
                           f"{config.palette_size} colors; pass --top_k <= "
                           f"{config.palette_size} (0 keeps all).")
  trained = run_lib.Run(config, workdir)
  trained.palette  # pylint: disable=pointless-statement  # a run without a palette fails here
  params, step = trained.latest_params()  # parameters only: no optimizer state
  rng = jax.random.PRNGKey(seed)
  if mode == "unconditional":
    tokens = draw(trained, params, num, rng, cfg=cfg, per_step=per_step)
    grid = image_grid.grid(to_images(trained, tokens))
  else:
    tokens = complete(trained, params, split, num, completions, rng, cfg, per_step)
    grid = completion_grid(trained, tokens)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  name = "unconditional" if mode == "unconditional" else "completions"
  stem = os.path.join(out_dir, f"{name}_step{step}")
  image_grid.save_png(stem + ".png", grid)
  np.save(stem + ".npy", np.asarray(tokens, np.int32))
  return [stem + ".png", stem + ".npy"]
