"""The one error type for mistakes a user can fix, and its kinds.

Every check of user input raises a `UserError` (or a subclass): its message names the input and
says how to fix it. The command-line tools catch `UserError` alone (igpt_jax/cli.py), print the
message without a traceback and exit with status 2; anything else is a bug and keeps its
traceback. New checks add a raise of one of these, nothing else.
"""


class UserError(Exception):
  """A mistake the user can act on; the message says what is wrong and how to fix it."""


class MissingError(UserError, FileNotFoundError):
  """A run, checkpoint, palette, dataset folder or file that the command needs is not there."""


class FlagError(UserError, ValueError):
  """A command-line flag has a value that cannot work."""


class DivergedError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient (config.nonfinite_policy says what then):
  the settings, not the code, need changing; the last checkpoint is kept."""


INTERRUPTED_EXIT_CODE = 130  # a tool stopped by Ctrl-C (SIGINT) exits with it, as shells report
