"""Files written whole or not at all: to a temporary name, then renamed over the target, so a
process killed mid-write (preemption) leaves the previous version, never half a file."""

import contextlib
import fcntl
import json
import os


def write_text(path: str, text: str) -> None:
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj, **dump_kwargs) -> None:
  write_text(path, json.dumps(obj, **dump_kwargs))


def make_writable_dir(path: str) -> None:
  """Creates folder `path` (and its parents) and writes and removes a file in it; raises the
  OSError that says why not. Permission bits alone do not tell (root passes `os.access` on a
  read-only mount), so this is the check that files can really be written there."""
  os.makedirs(path, exist_ok=True)
  probe = os.path.join(path, f".write_test_{os.getpid()}")
  with open(probe, "w"):
    pass
  os.remove(probe)


@contextlib.contextmanager
def exclusive(lock_path: str, waiting: str = ""):
  """Holds an exclusive lock on file `lock_path` (created if missing) for the `with` block, so
  that one process at a time does what it guards (e.g. convert an image folder); another waits,
  printing `waiting` once. Released when the block ends or the process dies."""
  os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
  with open(lock_path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if waiting:
        print(waiting, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
