r"""Draws samples or image completions from a trained iGPT checkpoint.

  python -m igpt_jax.sample --config=configs/quickstart.py --workdir=/tmp/igpt_quickstart \
      --mode=unconditional --num=16
  python -m igpt_jax.sample --config=configs/quickstart.py --workdir=/tmp/igpt_quickstart \
      --mode=complete --num=8 --completions=4

`unconditional` writes DIR/samples/unconditional_step<N>.png (a grid) and .npy (int32 tokens
[num, seq_len]). `complete` takes the first `num` images of `--split`, keeps their top half and
draws `--completions` bottom halves for each: DIR/samples/completions_step<N>.png has one row
per image (original, half-masked, completions) and the .npy holds int32 tokens
[num, 1 + completions, seq_len] (the original first). Next-pixel models use the key/value-cached
sampler; masked-pixel models fill masked pixels most confident first (`--per_step` a pass).
"""

import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from igpt_jax import checkpointing
from igpt_jax import cli
from igpt_jax import decoding
from igpt_jax import errors
from igpt_jax import image_grid
from igpt_jax import input_pipeline
from igpt_jax import run as run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints and palette.npy).")
flags.DEFINE_enum("mode", "unconditional", ["unconditional", "complete"], "What to draw.")
flags.DEFINE_integer("num", 16, "Images to sample, or test images to complete.")
flags.DEFINE_integer("completions", 4, "Completions per image in --mode=complete.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"],
                  "Split whose images are completed.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely colors (0: all).")
flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of colors with this mass.")
flags.DEFINE_bool("greedy", False, "Take the most likely color instead of sampling.")
flags.DEFINE_integer("per_step", 16, "Masked-pixel models: pixels committed per pass.")
flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same images.")
cli.define_distributed_flags(flags)
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("num", lambda n: n > 0, "--num must be a positive number of images.")
flags.register_validator("completions", lambda n: n > 0,
                         "--completions must be a positive number per image.")
flags.register_validator("per_step", lambda n: n > 0,
                         "--per_step must be a positive number of pixels per pass.")
flags.register_multi_flags_validator(
    ["temperature", "top_k", "top_p"],
    lambda f: not decoding.sampling_problems(f["temperature"], f["top_k"], f["top_p"]),
    "sampling settings: --temperature > 0 (--greedy for the most likely colors), --top_k >= 0, "
    "0 < --top_p <= 1.")


def half_masked(images: np.ndarray) -> np.ndarray:
  out = images.copy()
  out[:, images.shape[1] // 2:] = 128
  return out


def run(config, workdir: str) -> list[str]:
  """Writes the requested samples into workdir/samples; returns the paths written."""
  checkpointing.check_compatible(workdir, config)
  if FLAGS.top_k > config.palette_size:
    raise errors.FlagError(f"--top_k={FLAGS.top_k} is more than the palette's "
                           f"{config.palette_size} colors; pass --top_k <= "
                           f"{config.palette_size} (0 keeps all).")
  trained = run_lib.Run(config, workdir)
  trained.centers  # pylint: disable=pointless-statement  # a run without a palette fails here
  params, step = trained.restore_params()  # parameters only: no optimizer state
  cfg = decoding.SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                top_p=FLAGS.top_p, greedy=FLAGS.greedy)
  rng = jax.random.PRNGKey(FLAGS.seed)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  if FLAGS.mode == "unconditional":
    tokens = trained.sample(params, FLAGS.num, rng, cfg=cfg, per_step=FLAGS.per_step)
    grid = image_grid.grid(trained.to_images(tokens))
    stem = os.path.join(out_dir, f"unconditional_step{step}")
  else:
    if trained.source.split_sizes[FLAGS.split] == 0:
      raise errors.MissingError(
          f"--split={FLAGS.split} holds no images in this run's data (config.holdout_fraction="
          f"{config.holdout_fraction} leaves no validation split); pass --split=test or "
          "--split=train.")
    batch = next(input_pipeline.eval_iterator(
        config, trained.source, trained.centers, FLAGS.split, local_batch=FLAGS.num,
        num_batches=1))
    originals = batch["tokens"][batch["mask"]]
    prefix_len = (config.image_size // 2) * config.image_size  # the top half, in raster order
    completions = [trained.sample(params, len(originals), jax.random.fold_in(rng, j),
                                  prefix=originals, prefix_len=prefix_len, cfg=cfg,
                                  per_step=FLAGS.per_step)
                   for j in range(FLAGS.completions)]
    tokens = np.stack([originals] + completions, axis=1)  # [num, 1 + completions, seq_len]
    images = trained.to_images(tokens)  # [num, 1 + completions, S, S, 3]
    rows = np.concatenate([images[:, :1], half_masked(images[:, 0])[:, None], images[:, 1:]],
                          axis=1)
    grid = image_grid.grid(rows.reshape(-1, *rows.shape[2:]), cols=rows.shape[1])
    stem = os.path.join(out_dir, f"completions_step{step}")
  image_grid.save_png(stem + ".png", grid)
  np.save(stem + ".npy", np.asarray(tokens, np.int32))
  return [stem + ".png", stem + ".npy"]


def main(argv):
  cli.start(argv, FLAGS)

  def run_and_report(config, workdir):
    for path in run(config, workdir):
      print(f"Wrote {path}", flush=True)

  cli.run_reporting_user_errors(run_and_report, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
