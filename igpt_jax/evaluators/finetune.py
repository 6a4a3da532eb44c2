"""Fine-tuning (generative + classification loss) of a copy of the parameters, tested at the step
with the best validation accuracy; the result is not saved as a checkpoint."""

from __future__ import annotations

from igpt_jax import finetune as finetune_lib
from igpt_jax.evaluators import data as data_lib

log = data_lib.log


class Finetune:
  """finetune.json: test accuracy at the best validation step, and the recipe used."""
  name = "finetune"

  def __init__(self, data: data_lib.EvalData):
    self.data = data

  def run(self, params, step: int, out_dir: str) -> dict:
    d = self.data.at(params, step, out_dir)
    log("Fine-tuning (generative + classification loss) ...")
    result = finetune_lib.run(d.run, d.params, d.num_classes, log=log)
    result.update(dataset=d.config.dataset, checkpoint_step=d.step)
    d.write(self.name, result)
    log(f"Fine-tuned: test accuracy {result['test_acc']:.4f} at step {result['best_step']} "
        f"(validation {result['val_acc']:.4f})")
    return result

  @staticmethod
  def metrics(name: str, result: dict) -> dict:
    return {f"finetune/{name}/test_acc": result["test_acc"]}
