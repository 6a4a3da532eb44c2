"""What the command-line entry points share: errors a user can act on, without a traceback."""

from __future__ import annotations

import os
import re
import sys


from absl import app
from absl import flags
from absl import logging

from igpt_jax import errors


def fail(e: errors.UserError) -> None:
  """Prints a user error as one message, no traceback, and exits with status 2."""
  print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_reporting_user_errors(fn, *args) -> None:
  """Runs fn(*args). A `UserError` (bad config, dataset, checkpoint, file or flag) exits with
  status 2 and its message, which says what to fix, instead of a traceback; anything else is
  a bug and propagates."""
  try:
    fn(*args)
  except errors.UserError as e:
    fail(e)


def _config_file_error(e: Exception, argv) -> errors.UserError:
  """The message for a --config file that does not load or an override that does not apply."""
  configs = [a for a in argv[1:] if a.startswith("--config")]
  files = [a.split("=", 1)[1].split(":")[0] for a in configs if a.startswith("--config=")]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    return errors.MissingError(f"config file {missing[0]} does not exist (--config="
                               f"{missing[0]}). Pass the path of a config file, e.g. "
                               "--config=configs/quickstart.py.")
  raw = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  if "Traceback (most recent call last)" in raw:
    # ml_collections wraps an error raised by get_config() with its traceback: keep the
    # error's own line ("ConfigError: imagenet variant 'xxl': use one of ...").
    last = [line for line in raw.strip().splitlines() if line.strip()][-1]
    raw = last.split(": ", 1)[1] if ": " in last else last
  text = " ".join(raw.split())
  hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if hint or isinstance(e, KeyError) or re.fullmatch(r"\W*\w+\W*", text):
    # ml_collections: an override of a field the config does not have.
    name = hint.group(2) if hint else (re.findall(r"\w+", text) or ["?"])[0]
    did_you_mean = f" (did you mean {hint.group(1)!r}?)" if hint else ""
    return errors.FlagError(
        f"unknown config field {name!r}{did_you_mean} in {' '.join(configs)}. The fields are "
        "those of igpt_jax/config_lib.py:base_config.")
  if isinstance(e, SyntaxError):
    return errors.FlagError(f"config file {e.filename} does not parse: line {e.lineno}: "
                            f"{e.msg}. Fix the file, or pass another --config.")
  return errors.FlagError(f"{' '.join(configs) or 'the flags'}: {text.rstrip('.')}. Check the "
                          "--config path and the --config.<field>=<value> overrides.")


def parse_flags(argv):
  """absl's flag parsing, with config-file and override mistakes reported as user errors."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      flags.FLAGS.config.get("dataset")  # a file that failed to load raises on first use
    return rest
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    about_config = str(e).split(":")[0].startswith(("flag --config", "Unknown command line "
                                                    "flag 'config."))
    if about_config and cause is not None and not isinstance(cause, flags.Error):
      fail(_config_file_error(cause, argv))
    fail(errors.FlagError(f"{str(e).rstrip('.')}. Pass --helpfull to see the flags."))
  except (KeyError, SyntaxError, OSError, AttributeError, TypeError, ValueError) as e:
    fail(_config_file_error(e, argv))


def run(main) -> None:
  """`app.run(main)` for the tools: flag and config-file mistakes exit with status 2, and a
  Ctrl-C that reaches the tool (training handles its first one itself) exits with status 130
  and one line instead of a traceback."""

  def main_or_interrupted(argv):
    try:
      main(argv)
    except KeyboardInterrupt:
      print("error: interrupted (Ctrl-C); rerun the same command to resume or redo the "
            "interrupted work.", file=sys.stderr, flush=True)
      sys.exit(errors.INTERRUPTED_EXIT_CODE)

  app.run(main_or_interrupted, flags_parser=parse_flags)


def start(argv, flag_values) -> None:
  """What every entry point does first: reject stray arguments, hide library INFO logs (unless
  --verbosity is given), join the multi-process job if there is one."""
  if len(argv) > 1:
    fail(errors.FlagError(f"unexpected arguments {' '.join(argv[1:])}: every input is a flag "
                          "(--name=value). Pass --helpfull to see the flags."))
  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run_reporting_user_errors(initialize_distributed, flag_values)


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
