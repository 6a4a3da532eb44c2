"""One small evaluator per task, each built on the shared `EvalData` (data.py) and used the same
way by `python -m igpt_jax.evaluate` and by in-training evaluation (`eval_tasks.py`):
`run(params, step, out_dir)` writes the task's JSON and returns its result; `metrics(name,
result)` names the scalars logged during training."""

from igpt_jax.evaluators.bits_per_dim import BitsPerDim
from igpt_jax.evaluators.data import EvalData
from igpt_jax.evaluators.finetune import Finetune
from igpt_jax.evaluators.linear_probe import LinearProbe
from igpt_jax.evaluators.low_data import LowData

# config.eval.tasks name -> evaluator class.
TASKS = {cls.name: cls for cls in (LinearProbe, LowData, Finetune, BitsPerDim)}

__all__ = ["TASKS", "EvalData", "LinearProbe", "LowData", "Finetune", "BitsPerDim"]
