"""Bits per dimension of the generative objective on the evaluation data's test split."""

from __future__ import annotations

from igpt_jax import heldout
from igpt_jax.evaluators import data as data_lib


class BitsPerDim:
  """bits_per_dim.json: the objective's test bits/dim and nats per token."""
  name = "bits_per_dim"

  def __init__(self, data: data_lib.EvalData):
    self.data = data

  def run(self, params, step: int, out_dir: str) -> dict:
    d = self.data.at(params, step, out_dir)
    out = heldout.loss(d.run, d.params, "test")
    result = {"dataset": d.config.dataset, "split": "test", "checkpoint_step": d.step,
              "objective": d.config.objective, "bits_per_dim": out["bits_per_dim"],
              "nats_per_token": out["loss"], "num_images": d.run.source.split_sizes["test"]}
    d.write(self.name, result)
    data_lib.log(f"Test bits/dim: {out['bits_per_dim']:.4f} ({out['loss']:.4f} nats/token)")
    return result

  @staticmethod
  def metrics(name: str, result: dict) -> dict:
    return {f"bits_per_dim/{name}": result["bits_per_dim"]}
