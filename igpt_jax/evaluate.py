r"""Evaluates a trained iGPT checkpoint: linear probes, low-data probes, fine-tuning, bits/dim.

  python -m igpt_jax.evaluate --config=configs/s.py --workdir=DIR \
      [--config.eval.dataset=cifar10] [--config.eval.tasks=linear_probe,bits_per_dim] \
      [--config.eval.layers=auto] [--config.eval.*=...]

The model shape comes from --config and must match the run in DIR (its config.json); the
palette is DIR/palette.npy; the checkpoint is the latest (or --config.eval.step). The backbone
is never updated except by the `finetune` task, whose result is not saved as a checkpoint.
Results go to DIR/eval/:

  linear_probe.json   per-layer val/test accuracy, chosen L2 and how each fit ended (iterations,
                      final loss, gradient norm, converged), the best layer (by validation
                      accuracy) and its test accuracy, and the raw-pixel baseline on the same
                      splits; linear_probe.png plots accuracy against layer depth.
  low_data.json       probes on N labelled examples per class (L2 by cross-validation inside
                      them), mean/std over seeds.
  finetune.json       fine-tuned test accuracy at the best validation step.
  bits_per_dim.json   the generative objective's bits/dim on the test split.
  features/           frozen features on disk (memory-mapped, written batch by batch; a killed
                      extraction resumes), so a sweep does not recompute them.
"""

from absl import flags
from ml_collections import config_flags

from igpt_jax import cli
from igpt_jax import eval_tasks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The trained run's workdir (checkpoints, palette.npy).")
cli.define_distributed_flags(flags)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv, FLAGS)
  cli.run_reporting_user_errors(eval_tasks.evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
