"""Samples and completions of a trained run, as grids and tokens: what `python -m igpt_jax.sample`
and the samples notebook call (the token-level samplers are in `decoding.py`)."""

import os

import jax
import numpy as np

from igpt_jax import checkpointing
from igpt_jax import decoding
from igpt_jax import errors
from igpt_jax import image_grid
from igpt_jax import input_pipeline
from igpt_jax import run as run_lib


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
  batch = next(input_pipeline.eval_iterator(c, trained.source, trained.centers, split,
                                            local_batch=num, num_batches=1))
  originals = batch["tokens"][batch["mask"]]
  prefix_len = (c.image_size // 2) * c.image_size  # the top half, in raster order
  drawn = [trained.sample(params, len(originals), jax.random.fold_in(rng, j), prefix=originals,
                          prefix_len=prefix_len, cfg=cfg, per_step=per_step)
           for j in range(completions)]
  return np.stack([originals] + drawn, axis=1).astype(np.int32)


def completion_grid(trained: run_lib.Run, tokens: np.ndarray) -> np.ndarray:
  """`complete`'s tokens as one image: a row per image (original, its top half, completions)."""
  images = trained.to_images(tokens)  # [num, 1 + completions, S, S, 3]
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
  trained.centers  # pylint: disable=pointless-statement  # a run without a palette fails here
  params, step = trained.latest_params()  # parameters only: no optimizer state
  rng = jax.random.PRNGKey(seed)
  if mode == "unconditional":
    tokens = trained.sample(params, num, rng, cfg=cfg, per_step=per_step)
    grid = image_grid.grid(trained.to_images(tokens))
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
