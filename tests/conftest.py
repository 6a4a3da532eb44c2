"""Shared fixtures: the real CIFAR-10 images as a local image folder, and small configs.

The archive comes from $IGPT_CIFAR10_ARCHIVE, else `../shared/data/cifar10_jpeg.tar.gz` beside the
checkout. It is extracted once into $IGPT_TEST_CACHE (default ~/.cache/igpt_jax_tests), where the
tfds conversion of the folder is cached too. Without the archive the tests that need it are
skipped, unless $IGPT_REQUIRE_DATA=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

import forked
import igpt_jax

REPO = pathlib.Path(__file__).resolve().parents[1]


def _libtpu_without_a_tpu() -> bool:
  """libtpu is installed (the [tpu] extra: the TPU compiler for the compile-only tests) on a
  machine with no TPU chips."""
  return importlib.util.find_spec("libtpu") is not None and not igpt_jax.tpu_chips_attached()


# With libtpu installed, jax would try to open a TPU first in every test process; on a machine
# without one that is only noise and delay. Set before any test imports jax; subprocesses inherit.
if "JAX_PLATFORMS" not in os.environ and _libtpu_without_a_tpu():
  os.environ["JAX_PLATFORMS"] = "cpu"
  # Compile-only TPU devices in this process and in a planner subprocess at once: libtpu's
  # one-process lock guards real chips, of which there are none.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# One XLA compilation cache for the test session, shared by its workers and every process they
# start: the ~60 tool runs and small trainings compile the same few programs. Compiled programs
# are keyed by their HLO, options and the jax version, so a hit runs what a compile would build.
# A fresh folder per session (the controller's, inherited by the workers): a run's timings do not
# depend on an earlier run's leftovers. Set JAX_COMPILATION_CACHE_DIR to choose it yourself.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="igpt_jax_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE and not hasattr(config, "workerinput"):  # the controller, at the very end
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def requires_tpu_compiler():
  """Skips a test that needs libtpu's compiler when it is not installed; with
  $IGPT_REQUIRE_TPU_COMPILER=1 (set by .ci/run) it fails instead."""
  if importlib.util.find_spec("libtpu") is None:
    msg = 'libtpu is not installed (pip install -e ".[tpu]"): no TPU compiler to compile for.'
    if os.environ.get("IGPT_REQUIRE_TPU_COMPILER") == "1":
      pytest.fail(msg)
    pytest.skip(msg)


def requires_gpu_compiler():
  """Skips a test that needs the XLA:GPU compiler (jax-cuda12-plugin) when it is not installed;
  with $IGPT_REQUIRE_GPU_COMPILER=1 (set by .ci/run) it fails instead."""
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    msg = ("jax-cuda12-plugin is not installed (see the README's plan section): no GPU "
           "compiler to compile for.")
    if os.environ.get("IGPT_REQUIRE_GPU_COMPILER") == "1":
      pytest.fail(msg)
    pytest.skip(msg)


def cache_dir() -> str:
  return os.environ.get("IGPT_TEST_CACHE") or os.path.expanduser("~/.cache/igpt_jax_tests")


def cifar10_archive() -> str:
  return os.environ.get("IGPT_CIFAR10_ARCHIVE") or str(
      REPO.parent / "shared" / "data" / "cifar10_jpeg.tar.gz")


@pytest.fixture(scope="session")
def cifar10_dir() -> str:
  """The extracted CIFAR-10 JPEG folder (`train/<class>/*.jpg`, `test/<class>/*.jpg`)."""
  archive = cifar10_archive()
  if not os.path.exists(archive):
    msg = (f"CIFAR-10 archive {archive} not found; set IGPT_CIFAR10_ARCHIVE to "
           "cifar10_jpeg.tar.gz.")
    if os.environ.get("IGPT_REQUIRE_DATA") == "1":
      pytest.fail(msg)
    pytest.skip(msg)
  from igpt_jax import atomic, image_folder  # pylint: disable=g-import-not-at-top
  with atomic.exclusive(os.path.join(cache_dir(), "cifar10.lock")):  # one test worker extracts
    return image_folder.extract_archive(archive, cache_dir())


@pytest.fixture(scope="session")
def tfds_dir() -> str:
  """Where tests keep prepared tfds datasets (the converted CIFAR-10 folder)."""
  path = os.path.join(cache_dir(), "tfds")
  os.makedirs(path, exist_ok=True)
  return path


def run_on_fake_devices(script: str, *args, tag: str, devices: int = 8,
                        timeout: float = 600):
  """Runs `script` (python -c, with `args`) in a fresh process that sees `devices` fake CPU
  devices; returns the JSON it printed after `tag`."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"))
  out = forked.run(["-c", script, *map(str, args)], cwd=REPO, env=env, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.split(tag, 1)[1])


def override(config, overrides: dict):
  """Sets dotted fields (`"model.width": 64`) of a ConfigDict; returns it."""
  config.update_from_flattened_dict(overrides)
  return config


def tool_command(tool: str, *args) -> list:
  """The command line of `python -m igpt_jax.<tool> ARGS` (run from the repository root)."""
  return [sys.executable, "-m", f"igpt_jax.{tool}", *args]


def run_tool(tool: str, *args, timeout: float = 300, env=None,
             fresh: bool = False) -> subprocess.CompletedProcess:
  """Runs `python -m igpt_jax.<tool> ARGS` in the repository root, as a user would, in its own
  process (forked from one with the libraries imported, see forked.py; `fresh=True`: a cold
  interpreter); returns its exit status and captured output."""
  return forked.run(tool_command(tool, *args), cwd=REPO, env=env, timeout=timeout, fresh=fresh)


def metrics_by_step(workdir) -> dict:
  """{step: row} of workdir/metrics.jsonl (metric_writer.read)."""
  from igpt_jax import metric_writer  # pylint: disable=g-import-not-at-top
  return metric_writer.read(workdir)


def wait_for_logged_steps(workdir, count: int, procs, timeout: float = 240) -> None:
  """Waits until `count` steps are in workdir/metrics.jsonl, every process still running."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= count):
    assert all(p.poll() is None for p in procs), "a training process exited early"
    assert time.time() < deadline, f"fewer than {count} steps logged in {timeout} s"
    time.sleep(0.05)


def tiny_config(**overrides):
  """A 2-layer, width-64 next-pixel model at 16x16 with a 64-color palette."""
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.image_size = 16
  c.palette_size = 64
  c.palette_fit_images = 500
  c.palette_fit_pixels = 20_000
  c.palette_fit_iterations = 10
  config_lib.igpt_size(c, num_layers=2, width=64, num_heads=4)
  c.batch_size = 16
  c.total_steps = 10
  c.learning_rate = 3e-3
  c.warmup_steps = 2
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.eval_batches = 2
  c.checkpoint_every_steps = 5
  c.num_samples = 0
  return override(c, overrides)


@pytest.fixture
def cifar_config(cifar10_dir, tfds_dir):
  def make(**overrides):
    return tiny_config(dataset=cifar10_dir, data_dir=tfds_dir, **overrides)
  return make


def quickstart_config(workdir=None, **overrides):
  """configs/quickstart.py shortened to 120 steps (checkpoints at 60 and 120), with overrides."""
  del workdir  # for call-site readability only
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 120, 120, 60
  c.warmup_steps, c.log_every_steps, c.num_samples = 20, 60, 0
  override(c, overrides)
  if "warmup_steps" not in overrides:
    c.warmup_steps = min(c.warmup_steps, c.total_steps // 2)
  return c


def shared_across_workers(tmp_path_factory, name: str, make) -> str:
  """A folder that `make(path)` fills once per test session: with pytest-xdist the first worker
  to ask makes it (the others wait on a lock), and each worker gets its own copy, so that tests
  which write into it do not meet another worker's writes."""
  import shutil  # pylint: disable=g-import-not-at-top
  from igpt_jax import atomic  # pylint: disable=g-import-not-at-top
  own = tmp_path_factory.mktemp(name)
  if "PYTEST_XDIST_WORKER" not in os.environ:
    make(str(own))
    return str(own)
  session = tmp_path_factory.getbasetemp().parent  # pytest-N/, shared by this run's workers
  made, done = session / f"shared-{name}", session / f"shared-{name}.done"
  with atomic.exclusive(str(session / f"shared-{name}.lock")):
    if not done.exists():
      shutil.rmtree(made, ignore_errors=True)
      made.mkdir()
      make(str(made))
      done.touch()
  shutil.copytree(made, own, dirs_exist_ok=True)
  return str(own)


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory) -> str:
  """A workdir with the quickstart model trained for 120 steps (about a minute on 2 cores)."""
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  return shared_across_workers(
      tmp_path_factory, "quickstart",
      lambda workdir: train.train_and_evaluate(quickstart_config(), workdir))
