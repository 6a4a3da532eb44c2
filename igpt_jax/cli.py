"""What the command-line entry points share: errors a user can act on, without a traceback."""

from __future__ import annotations

import sys


def run_reporting_user_errors(fn, *args) -> None:
  """Runs fn(*args). A bad config, a missing dataset or a missing file exits with status 2 and
  its message (which says what to fix) instead of a traceback; anything else propagates."""
  from igpt_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import convert  # pylint: disable=g-import-not-at-top
  from igpt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    fn(*args)
  except (config_lib.ConfigError, input_pipeline.DatasetError, FileNotFoundError,
          checkpointing.CheckpointError, convert.ConversionError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def start(argv, flag_values) -> None:
  """What every entry point does first: reject stray arguments, hide library INFO logs (unless
  --verbosity is given), join the multi-process job if there is one."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  initialize_distributed(flag_values)


def define_distributed_flags(flags) -> None:
  """--coordinator_address/--num_processes/--process_id (else $IGPT_*, else auto-detection)."""
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-process: process 0's host:port (else $IGPT_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def initialize_distributed(flag_values) -> None:
  """Joins the multi-process job the flags or the environment describe (before any device use)."""
  from igpt_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.settings_from_env(
      coordinator_address=flag_values.coordinator_address,
      num_processes=flag_values.num_processes, process_id=flag_values.process_id))
