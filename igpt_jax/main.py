r"""Trains an iGPT model.

  python -m igpt_jax.main --config=configs/quickstart.py --workdir=/tmp/igpt_quickstart
  python -m igpt_jax.main --config=configs/l.py --workdir=DIR --config.total_steps=100

Any config field can be overridden with --config.<field>=<value>. Training resumes from the
latest checkpoint in DIR/checkpoints. Library INFO logs (orbax, absl) are hidden unless
--verbosity=0 is given.
"""

import os

# TensorFlow serves only the input pipeline here; keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, palette, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  from igpt_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_reporting_user_errors(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
