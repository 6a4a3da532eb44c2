"""Runs `python -m igpt_jax.<tool>` (or `python -c CODE`) in a fresh process forked from a
server that has already imported jax, flax, optax, orbax, tfds and the other libraries.

Each run is still its own process: its own argv, flags, environment, working directory, exit
status and output, the tool module executed as `__main__` exactly as `python -m` does, and
atexit handlers run at its end. What it skips is the ~3 s of library imports that a cold
interpreter pays, which about a hundred tool runs in the suite would otherwise repeat. The
server imports no module of igpt_jax, so each run imports the package afresh.

jax reads its JAX_* variables when it is imported, so a run whose environment changes one of
them starts a cold interpreter instead; so does `fresh=True`, which the
tests of the documented command lines use. IGPT_TESTS_COLD_START=1 makes every run cold.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Imported once by the fork server; nothing of igpt_jax and nothing that starts a thread.
PRELOAD = ["numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint",
           "ml_collections.config_flags", "absl.app", "absl.flags", "absl.logging", "einops",
           "tensorflow_datasets", "grain", "PIL.Image"]

_server = {}  # the multiprocessing context and the environment its server was started with


def _context():
  if not _server:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    _server.update(ctx=ctx, env=dict(os.environ))
  return _server["ctx"]


def _same_imports(env) -> bool:
  """Whether a process with `env` would import jax as the server did."""
  _context()
  server = _server["env"]
  keys = {k for k in set(env) | set(server) if k.startswith("JAX_")}
  return all(env.get(k) == server.get(k) for k in keys)


def _child(argv, env, cwd, out_path, err_path) -> None:
  """In the forked process: argv[0] is "-m" with a module or "-c" with code, as for python."""
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out_path), (2, err_path)):
    if path:  # else inherited
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
      os.dup2(target, fd)
      os.close(target)
  faulthandler.register(signal.SIGUSR1, all_threads=True)  # Popen.wait's dump of a hung run
  code = 0
  try:
    sys.path[0:0] = [cwd] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[0] == "-m":
      sys.argv = [argv[1], *argv[2:]]
      runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = ["-c", *argv[2:]]
      exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  try:
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def _cold(argv, fresh, env) -> bool:
  return (fresh or not _same_imports(env) or argv[0] not in ("-m", "-c")
          or os.environ.get("IGPT_TESTS_COLD_START") == "1")


class Popen:
  """`subprocess.Popen([sys.executable, *argv], text=True, ...)` for a forked run: stdout and
  stderr are None (inherited), subprocess.PIPE (kept in a file, read by communicate() or, a
  line at a time as from a pipe, from .stdout) or, for stderr, subprocess.STDOUT. Signals go to
  the run's own pid."""

  def __init__(self, argv, *, cwd, env, stdout=None, stderr=None):
    self.args = [sys.executable, *argv]
    self._tmp = tempfile.TemporaryDirectory(prefix="igpt_forked_")
    paths = {}
    if stdout == subprocess.PIPE:
      paths["out"] = os.path.join(self._tmp.name, "out")
    if stderr == subprocess.PIPE:
      paths["err"] = os.path.join(self._tmp.name, "err")
    elif stderr == subprocess.STDOUT:
      paths["err"] = paths.get("out")
    self._paths = paths
    for path in paths.values():  # there even if the run ends before it opens them
      if path:
        open(path, "a").close()
    child_out = os.devnull if stdout == subprocess.DEVNULL else paths.get("out")
    child_err = (os.devnull if stderr == subprocess.DEVNULL
                 or (stderr == subprocess.STDOUT and stdout == subprocess.DEVNULL)
                 else paths.get("err"))
    self._proc = _context().Process(target=_child, args=(
        list(argv), env, str(cwd), child_out, child_err))
    self._proc.start()
    self.pid = self._proc.pid
    self.stdout = _Pipe(paths["out"], self) if "out" in paths else None

  @property
  def returncode(self):
    return self._proc.exitcode

  def poll(self):
    return self._proc.exitcode

  def wait(self, timeout=None):
    self._proc.join(timeout)
    if self._proc.exitcode is None:
      self._report_hang()
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self._proc.exitcode

  def _report_hang(self):
    """Has the run that outlived its timeout write every thread's stack to its stderr, and
    shows that (and the end of its output) in the test's captured stderr."""
    os.kill(self.pid, signal.SIGUSR1)
    self._proc.join(2)
    for name, text in zip(("stdout", "stderr"), self._outputs()):
      if text is not None:
        print(f"--- {name} of the run that timed out ({self.args[1:3]}):\n{text[-6000:]}",
              file=sys.stderr)

  def communicate(self, timeout=None):
    self.wait(timeout)
    return self._outputs()

  def _outputs(self):
    """(stdout, stderr) as captured so far: None where not captured, or (stderr) where it
    went to stdout."""
    out = err = None
    if "out" in self._paths:
      with open(self._paths["out"]) as f:
        out = f.read()
    if self._paths.get("err") and self._paths["err"] != self._paths.get("out"):
      with open(self._paths["err"]) as f:
        err = f.read()
    return out, err

  def send_signal(self, sig):
    if self._proc.exitcode is None:
      os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def __del__(self):
    if self.stdout is not None:
      self.stdout.close()


class _Pipe:
  """Popen.stdout: the run's output file read as a pipe is, a line at a time: a read waits
  for the next line (or the end of the run) instead of stopping at the end of what is written
  so far."""

  def __init__(self, path, proc):
    self._file = open(path, "a+")
    self._file.seek(0)
    self._proc = proc

  def readline(self) -> str:
    line = ""
    while True:
      line += self._file.readline()
      if line.endswith("\n"):
        return line
      if self._proc.poll() is not None:  # ended: what is left, then "" (end of file)
        return line + self._file.read()
      time.sleep(0.02)

  def __iter__(self):
    return iter(self.readline, "")

  def read(self) -> str:
    self._proc.wait()
    return self._file.read()

  def close(self):
    self._file.close()


def _args(argv):
  argv = list(argv)
  return argv[1:] if argv and argv[0] == sys.executable else argv


def popen(argv, *, cwd, env=None, stdout=None, stderr=None, text=True, fresh: bool = False):
  """A process running `python ARGV` (argv: "-m", module, args... or "-c", code, args...,
  with or without sys.executable first): forked (Popen above) unless it must start cold, then
  subprocess.Popen. Output is text."""
  assert text, "forked runs give text output"
  argv = _args(argv)
  env = dict(os.environ if env is None else env)
  if _cold(argv, fresh, env):
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=stdout,
                            stderr=stderr, text=True)
  return Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)


def run(argv, *, cwd, env=None, timeout: float = 300, capture_output=True, text=True,
        fresh: bool = False) -> subprocess.CompletedProcess:
  """Like `subprocess.run([sys.executable, *argv], capture_output=True, text=True)`."""
  assert capture_output and text, "forked runs capture their output as text"
  proc = popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               fresh=fresh)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
