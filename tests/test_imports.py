"""Every module of the package imports on its own in a fresh interpreter (no import cycles, no
module that only works after another was imported), and only the training tools import the
train loop."""

import os
import pkgutil
import subprocess
import sys

import forked
import igpt_jax
from conftest import REPO

# Every module, subpackages' included ("evaluators.linear_probe").
MODULES = sorted(m.name[len("igpt_jax."):]
                 for m in pkgutil.walk_packages(igpt_jax.__path__, "igpt_jax."))
# Modules that train: the training entry point, the memory planner (it compiles the train step)
# and the train loop itself. Every other tool (evaluate, sample, convert's export, the run
# library, features, fine-tuning) works without importing it.
TRAINING = {"main", "plan", "train"}


# The evaluation stack: training (`main`, `train`) is handed evaluators and never loads it.
EVALUATION = ("igpt_jax.eval_tasks", "igpt_jax.evaluators", "igpt_jax.features", "igpt_jax.probe",
              "igpt_jax.finetune", "matplotlib")
NOT_EVALUATING = {"main", "train"}


def test_every_module_imports_alone_and_only_training_imports_train():
  """Each module in a fresh interpreter: it imports; only the training tools load the train
  loop; the train loop and the training entry point load none of the evaluation stack."""
  assert len(MODULES) > 20 and "train" in MODULES and "errors" in MODULES
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  code = ("import sys, igpt_jax.{}; print('TRAIN' if 'igpt_jax.train' in sys.modules else ''); "
          f"print('EVAL', [m for m in {EVALUATION!r} if m in sys.modules])")
  procs = {m: forked.popen([sys.executable, "-c", code.format(m)], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for m in MODULES}
  failed = {}
  for m, p in procs.items():
    out, _ = p.communicate(timeout=300)
    if p.returncode != 0:
      failed[m] = out[-1500:]
    elif "TRAIN" in out and m not in TRAINING:
      failed[m] = "imports igpt_jax.train"
    elif m in NOT_EVALUATING and "EVAL []" not in out:
      failed[m] = "imports the evaluation stack: " + out.strip().splitlines()[-1]
  assert not failed, failed
  # The names checked exist.
  assert {"eval_tasks", "features", "evaluators", "evaluators.linear_probe"} <= set(MODULES)
