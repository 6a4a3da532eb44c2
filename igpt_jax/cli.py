"""What the command-line entry points share: errors a user can act on, without a traceback."""

from __future__ import annotations

import sys


def run_reporting_user_errors(fn, *args) -> None:
  """Runs fn(*args). A bad config, a missing dataset or a missing file exits with status 2 and
  its message (which says what to fix) instead of a traceback; anything else propagates."""
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    fn(*args)
  except (config_lib.ConfigError, input_pipeline.DatasetError, FileNotFoundError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
