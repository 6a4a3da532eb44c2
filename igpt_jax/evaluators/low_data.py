"""Low-data probes: N labelled training examples per class at one layer, L2 chosen by k-fold
cross-validation inside them, mean and spread over seeds."""

from __future__ import annotations

import json
import os

import numpy as np

from igpt_jax import probe
from igpt_jax.evaluators import data as data_lib

log = data_lib.log


class LowData:
  """low_data.json: test accuracy per labelled-subset size, at config.eval.low_data_layer (-1:
  the best layer of this checkpoint's linear_probe.json, else the middle one)."""
  name = "low_data"

  def __init__(self, data: data_lib.EvalData):
    self.data = data

  def _layer(self) -> tuple[int, str]:
    d = self.data
    layer = d.config.eval.low_data_layer
    if layer >= 0:
      return layer, "config.eval.low_data_layer"
    path = os.path.join(d.out_dir, "linear_probe.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)["best_layer"], "best layer of linear_probe.json"
    return (d.config.model.num_layers // 2,
            "middle layer (no linear_probe.json to take the best layer from)")

  def run(self, params, step: int, out_dir: str) -> dict:
    d = self.data.at(params, step, out_dir)
    e = d.config.eval
    layer, layer_source = self._layer()
    if layer not in d.layers:
      raise ValueError(f"config.eval.low_data_layer={layer} is not among the extracted layers "
                       f"{d.layers}; add it to config.eval.layers.")
    j = d.layers.index(layer)
    tr, te = d.features("train"), d.features("test")
    result = {"dataset": d.config.dataset, "checkpoint_step": d.step, "layer": layer,
              "layer_source": layer_source, "l2_selection": f"{e.low_data_folds}-fold "
              "cross-validation inside the labelled subset (no other labels are used)",
              "per_class": {}, "skipped": {}}
    fewest = int(np.bincount(tr.labels, minlength=d.num_classes).min())
    for n in e.low_data_per_class:
      if n > fewest:
        result["skipped"][str(n)] = f"the smallest class has {fewest} training examples"
        log(f"  low-data probe, {n}/class: skipped (the smallest class has {fewest})")
        continue
      runs = []
      for seed in range(e.low_data_seeds):
        idx = probe.per_class_subset(np.asarray(tr.labels), n, d.num_classes, seed)
        runs.append(probe.fit_low_data(
            (tr.features[idx, j], tr.labels[idx]), te.layer(j), num_classes=d.num_classes,
            l2_grid=tuple(e.probe_l2), folds=e.low_data_folds, solver=e.probe_solver,
            max_iters=e.probe_max_iters, sgd_epochs=e.probe_sgd_epochs, seed=seed,
            mesh=d.run.mesh))
      accs = [r["test_acc"] for r in runs]
      result["per_class"][str(n)] = {"labels": n * d.num_classes,
                                     "test_acc_mean": float(np.mean(accs)),
                                     "test_acc_std": float(np.std(accs)), "test_accs": accs,
                                     "l2": [r["l2"] for r in runs],
                                     "converged": all(r["converged"] for r in runs)}
      log(f"  low-data probe, {n}/class ({n * d.num_classes} labels): test "
          f"{np.mean(accs):.4f} +- {np.std(accs):.4f} over {len(accs)} seeds (l2 "
          f"{', '.join(format(r['l2'], 'g') for r in runs)} by cross-validation)")
    d.write(self.name, result)
    return result

  @staticmethod
  def metrics(name: str, result: dict) -> dict:
    return {f"low_data/{name}/{n}_per_class/test_acc": v["test_acc_mean"]
            for n, v in result["per_class"].items()}
