"""Evaluation runs: `evaluate(config, workdir)` behind `python -m igpt_jax.evaluate` (also called
from notebooks) and `InTraining`, the evaluators of `config.evals` handed to the train loop. Both
run the same evaluators (`igpt_jax/evaluators/`, one per task) on `EvalData`.

`evaluate` runs the tasks in `config.eval.tasks` on the checkpoint in `workdir` and writes their
JSON (and plots) to `workdir/eval/`; see `igpt_jax/evaluate.py`.
"""

from __future__ import annotations

import os
import shutil
import time

import jax

from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import evaluators as evaluators_lib
from igpt_jax import run as run_lib

log = run_lib.log


def tasks_of(data: evaluators_lib.EvalData) -> list:
  """The evaluators of `data.config.eval.tasks`, in that order, built on `data`."""
  return [evaluators_lib.TASKS[t](data) for t in config_lib.eval_tasks(data.config)]


def in_training_config(config, name: str):
  """The config of in-training evaluator `name`: `config.evals.<name>`'s fields laid over
  `config.eval` (every field but `every_steps` is a `config.eval` field)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in config.evals[name].items():
      if key != "every_steps":
        c.eval[key] = value
  return c


class InTraining:
  """The in-training evaluators of `config.evals`, handed to the train loop (`train.py` does not
  import the evaluation stack): `due(step)` says whether any runs at a step, `run(params,
  step)` runs those due on the live parameters and returns their metrics. Each evaluator's
  data is opened up front on the training run's mesh, model and palette (`live`); its
  evaluators are built on it at its first step and kept, so the compiled extraction is reused."""

  def __init__(self, config, workdir: str, live: run_lib.Run):
    """Opens every evaluator's dataset now, before the first step: one that cannot be opened
    fails here, naming its config.evals field, instead of at its first evaluation."""
    self.config, self.workdir = config, workdir
    self.tasks = {}  # name -> its evaluators (on one EvalData), built at its first step
    self._runs = {}  # name -> the Run of its data, opened here
    for name in sorted(config.get("evals", {}) or {}):
      data_config = config_lib.eval_data_config(in_training_config(config, name))
      run = run_lib.Run(data_config, workdir, share=live)
      try:
        run.source  # pylint: disable=pointless-statement  # opened (and kept) now
      except errors.UserError as e:
        field = "dataset" if "dataset" in config.evals[name] else "dataset (config.eval.dataset)"
        raise type(e)(f"in-training evaluator config.evals.{name}: its {field} "
                      f"{data_config.dataset!r} cannot be opened: {e}") from e
      self._runs[name] = run

  def due(self, step: int, last: bool = False) -> bool:
    """Whether any evaluator runs at `step` (all run on the last step)."""
    evals = self.config.get("evals", {}) or {}
    return bool(evals) and (last or any(step % e.every_steps == 0 for e in evals.values()))

  def run(self, params, step: int, *, last: bool = False) -> dict:
    """Runs every evaluator due at `step` (or all, on the last step); returns their metrics.
    The same tasks as the offline binary; each writes its JSON under
    workdir/evals/<name>/step<step>/ and drops its features after. An evaluator that fails is
    reported in one line and skipped: training goes on."""
    metrics = {}
    for name in sorted(self.config.get("evals", {}) or {}):
      if not (last or step % self.config.evals[name].every_steps == 0):
        continue
      out_dir = os.path.join(self.workdir, "evals", name, f"step{step}")
      t0 = time.time()
      try:
        if name not in self.tasks:
          self.tasks[name] = tasks_of(evaluators_lib.EvalData(
              in_training_config(self.config, name), self.workdir, params=params, step=step,
              out_dir=out_dir, run=self._runs[name]))
        for task in self.tasks[name]:
          metrics.update(task.metrics(name, task.run(params, step, out_dir)))
      except Exception as e:  # pylint: disable=broad-except
        # Training goes on (its checkpoint of this step is already saved); the evaluator's
        # problem is reported in one line.
        reason = " ".join(str(e).split()) or type(e).__name__
        log(f"  evaluator {name} failed at step {step} and was skipped ({type(e).__name__}: "
            f"{reason}); training continues. Fix config.evals.{name} and evaluate this "
            f"checkpoint with python -m igpt_jax.evaluate.")
        continue
      # Every process drops its own copy (features.process_dir); on a shared file system the
      # first one to get there removes them all.
      shutil.rmtree(os.path.join(out_dir, "features"), ignore_errors=True)
      shown = {k: v for k, v in metrics.items() if k.split("/")[1] == name and (
          "best_test" in k or "concat/test" in k or "bits" in k)}
      log(f"  evaluator {name} at step {step}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({time.time() - t0:.0f}s)")
    return metrics


def evaluate(config, workdir: str) -> dict:
  """Runs config.eval.tasks on the checkpoint in `workdir`; returns {task: result}."""
  config_lib.validate(config, jax.device_count())
  data = evaluators_lib.EvalData(config, workdir)
  return {task.name: task.run(data.params, data.step, data.out_dir) for task in tasks_of(data)}
