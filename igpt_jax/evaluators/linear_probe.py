"""The linear probe: a logistic regression on each extracted layer's frozen features (and, with
config.eval.concat_layers, on several side by side), beside the raw-pixel baseline."""

from __future__ import annotations

import os
import time

import jax
# A bare Figure (no pyplot): leaves the caller's backend alone, e.g. a notebook's inline one.
from matplotlib.figure import Figure

from igpt_jax import config_lib
from igpt_jax import features as features_lib
from igpt_jax.evaluators import data as data_lib

log = data_lib.log


def plot(path: str, result: dict) -> None:
  """Accuracy against layer depth, with the concatenation and the raw-pixel baseline as lines."""
  layers = sorted(int(k) for k in result["layers"])
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for key, label in (("val_acc", "validation"), ("test_acc", "test")):
    ax.plot(layers, [100 * result["layers"][str(l)][key] for l in layers], "o-", label=label)
  if "concat" in result:
    ax.axhline(100 * result["concat"]["test_acc"], ls="-.", c="C2",
               label=f"layers {','.join(map(str, result['concat']['layers']))} "
               "concatenated (test)")
  if result.get("raw_pixel_test_acc") is not None:
    ax.axhline(100 * result["raw_pixel_test_acc"], ls="--", c="gray",
               label="raw pixels (test)")
  ax.set_xticks(layers)
  ax.set_xlabel("layer (0 = embeddings)")
  ax.set_ylabel("linear probe accuracy (%)")
  ax.set_title(f"{os.path.basename(os.path.normpath(result['dataset']))}, "
               f"step {result['checkpoint_step']}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _described(r) -> str:
  return (f"val {r.val_acc:.4f} test {r.test_acc:.4f} (l2 {r.l2:g}, {r.fit.iterations} "
          f"iterations{'' if r.fit.converged else ', NOT converged'}")


class LinearProbe:
  """linear_probe.json (and .png): per-layer accuracies, the best layer on validation, the
  concatenated-layer probe and the raw-pixel baseline on the same splits."""
  name = "linear_probe"

  def __init__(self, data: data_lib.EvalData):
    self.data = data
    self._raw_pixel = None  # the baseline's probe.Result: the same at every step, fit once

  def run(self, params, step: int, out_dir: str) -> dict:
    d = self.data.at(params, step, out_dir)
    c = d.config
    tr, va, te = (d.features(s) for s in ("train", "validation", "test"))
    result = {"dataset": c.dataset, "checkpoint_step": d.step, "image_size": c.image_size,
              "solver": c.eval.probe_solver, "num_train": len(tr.labels),
              "num_val": len(va.labels), "num_test": len(te.labels), "layers": {}}
    for j, layer in enumerate(d.layers):
      t0 = time.time()
      r = d.fit(tr.layer(j), va.layer(j), te.layer(j))
      result["layers"][str(layer)] = r.record()
      log(f"  probe layer {layer}: {_described(r)}, {time.time() - t0:.1f}s)")
    best = max(d.layers, key=lambda l: result["layers"][str(l)]["val_acc"])
    result["best_layer"] = best
    result["val_acc"] = result["layers"][str(best)]["val_acc"]
    result["test_acc"] = result["layers"][str(best)]["test_acc"]
    concat = config_lib.parse_concat(c.eval.get("concat_layers", ""), d.layers)
    if concat is not None:
      chosen = concat if isinstance(concat, list) else config_lib.centred(d.layers, best, concat)
      js = [d.layers.index(l) for l in chosen]
      t0 = time.time()
      r = d.fit(tr.concat(js), va.concat(js), te.concat(js))
      result["concat"] = dict(r.record(), layers=chosen, spec=str(c.eval.concat_layers))
      log(f"  probe on layers {','.join(map(str, chosen))} concatenated "
          f"({len(chosen) * d.run.model_cfg.width} features): {_described(r)}, "
          f"{time.time() - t0:.1f}s)")
    fits = list(result["layers"].values()) + ([result["concat"]] if "concat" in result else [])
    result["converged"] = all(v["converged"] for v in fits)
    # What the fits used (config.eval.probe_solver asks; features over the host budget are fit
    # by streamed SGD whatever it asks): one name, or "mixed".
    used = sorted({v["solver"] for v in fits})
    result["solver"] = used[0] if len(used) == 1 else "mixed"
    result["solver_requested"] = c.eval.probe_solver
    if c.eval.raw_pixel_baseline:
      if self._raw_pixel is None:
        src = d.run.source
        self._raw_pixel = d.fit(
            *(features_lib.raw_pixels(c, src, s) for s in ("train", "validation", "test")))
      r = self._raw_pixel
      result.update(raw_pixel_val_acc=r.val_acc, raw_pixel_test_acc=r.test_acc,
                    raw_pixel_l2=r.l2, raw_pixel=r.record())
      log(f"  raw-pixel baseline: {_described(r)})")
    path = d.write(self.name, result)
    if jax.process_index() == 0:
      plot(path[:-len(".json")] + ".png", result)
    log(f"Linear probe: best layer {best}, test accuracy {result['test_acc']:.4f}"
        + (f"; layers {','.join(map(str, result['concat']['layers']))} concatenated "
           f"{result['concat']['test_acc']:.4f}" if "concat" in result else "")
        + (f" (raw pixels {result['raw_pixel_test_acc']:.4f})" if "raw_pixel_test_acc" in
           result else ""))
    return result

  @staticmethod
  def metrics(name: str, result: dict) -> dict:
    out = {f"probe/{name}/layer{l}/{k}": v[k] for l, v in result["layers"].items()
           for k in ("test_acc", "val_acc")}
    out.update({f"probe/{name}/best_test_acc": result["test_acc"],
                f"probe/{name}/best_layer": result["best_layer"]})
    if "raw_pixel_test_acc" in result:
      out[f"probe/{name}/raw_pixel_test_acc"] = result["raw_pixel_test_acc"]
    if "concat" in result:
      out.update({f"probe/{name}/concat/{k}": result["concat"][k]
                  for k in ("test_acc", "val_acc")})
    return out
