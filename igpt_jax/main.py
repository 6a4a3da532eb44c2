r"""Trains an iGPT model.

  python -m igpt_jax.main --config=configs/quickstart.py --workdir=/tmp/igpt_quickstart
  python -m igpt_jax.main --config=configs/l.py --workdir=DIR --config.total_steps=100

Any config field can be overridden with --config.<field>=<value>. Training resumes from the
latest checkpoint in DIR/checkpoints that restores (damaged ones are skipped and moved to
DIR/corrupt_checkpoints), exactly where it stopped: the data stream included. On SIGTERM it
finishes the step, checkpoints and exits with status 42; on Ctrl-C (SIGINT) the same, with
status 130 (a second Ctrl-C, or one during start-up, stops at once); rerun the same command
to resume. One run at a time writes a workdir: a second one started on it exits with status 2.
Library INFO logs (orbax, absl) are hidden unless --verbosity=0 is given.
"""

import functools
import sys

from absl import flags
from ml_collections import config_flags

from igpt_jax import cli
from igpt_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/quickstart.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, palette, metrics and samples.")
cli.define_distributed_flags(flags)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv, FLAGS)
  try:
    evaluators = None
    if FLAGS.config.get("evals", None):  # the evaluation stack is loaded only when asked for
      from igpt_jax import eval_tasks  # pylint: disable=g-import-not-at-top
      evaluators = functools.partial(eval_tasks.InTraining, FLAGS.config, FLAGS.workdir)
    cli.run_reporting_user_errors(train.train_and_evaluate, FLAGS.config, FLAGS.workdir,
                                  evaluators)
  except train.Preempted as e:
    print(f"igpt_jax: {e}", flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  cli.run(main)
