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

from absl import flags
from ml_collections import config_flags

from igpt_jax import cli
from igpt_jax import decoding
from igpt_jax import sampling

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


def main(argv):
  cli.start(argv, FLAGS)

  def write_and_report():
    cfg = decoding.SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p, greedy=FLAGS.greedy)
    for path in sampling.write(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, num=FLAGS.num,
                               completions=FLAGS.completions, split=FLAGS.split, cfg=cfg,
                               per_step=FLAGS.per_step, seed=FLAGS.seed):
      print(f"Wrote {path}", flush=True)

  cli.run_reporting_user_errors(write_and_report)


if __name__ == "__main__":
  cli.run(main)
