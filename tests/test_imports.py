"""Every module of the package imports on its own in a fresh interpreter (no import cycles, no
module that only works after another was imported)."""

import os
import pkgutil
import subprocess
import sys

import igpt_jax
from conftest import REPO

MODULES = sorted(m.name for m in pkgutil.iter_modules(igpt_jax.__path__))


def test_every_module_imports_alone_in_a_fresh_interpreter():
  assert len(MODULES) > 20 and "train" in MODULES and "errors" in MODULES
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = {m: subprocess.Popen([sys.executable, "-c", f"import igpt_jax.{m}"], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for m in MODULES}
  failed = {}
  for m, p in procs.items():
    out, _ = p.communicate(timeout=300)
    if p.returncode != 0:
      failed[m] = out[-1500:]
  assert not failed, failed
