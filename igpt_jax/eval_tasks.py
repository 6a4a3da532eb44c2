"""The evaluation tasks behind `python -m igpt_jax.evaluate` (also called from notebooks).

`evaluate(config, workdir)` runs the tasks in `config.eval.tasks` on the checkpoint in `workdir`
and writes their JSON (and plots) to `workdir/eval/`; see `igpt_jax/evaluate.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np
# A bare Figure (no pyplot): leaves the caller's backend alone, e.g. a notebook's inline one.
from matplotlib.figure import Figure

from igpt_jax import atomic
from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import features as features_lib
from igpt_jax import finetune as finetune_lib
from igpt_jax import palette as palette_lib
from igpt_jax import probe
from igpt_jax import run as run_lib


log = run_lib.log


def write_json(path: str, obj) -> None:
  """A result file, written by process 0 only."""
  if jax.process_index() == 0:
    atomic.write_json(path, obj, indent=2, sort_keys=True)


def plot_probe(path: str, result: dict) -> None:
  """Accuracy against layer depth, with the raw-pixel baseline as a dashed line."""
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


def _limit_train(source, n: int) -> None:
  """Keeps the first n examples of the (held-out-reduced) train split."""
  if 0 <= n < source.split_sizes["train"]:
    source.splits["train"] = source.splits["train"].head(n)


class Evaluator:
  """A restored checkpoint (or, during training, the live parameters) on the evaluation
  dataset, and the tasks run on it."""

  def __init__(self, config, workdir: str, *, params=None, step: int | None = None,
               out_dir: str | None = None, run: run_lib.Run | None = None):
    """`params` and `step` given: evaluate those instead of restoring a checkpoint; results
    then go to `out_dir`. `run`: the evaluation data's `Run`, already built on the training
    run's mesh, model and palette (in-training evaluation: `InTraining`); without it, one is
    built here for the checkpoint in `workdir`."""
    self.workdir = workdir
    self.out_dir = out_dir or os.path.join(workdir, "eval")
    data_config = config_lib.eval_data_config(config)
    if run is None:
      if not os.path.exists(palette_lib.path_for(config, workdir)):
        raise errors.MissingError(
            f"{workdir} has no palette.npy: it holds no trained run. Train first "
            "(python -m igpt_jax.main) or fix --workdir.")
      checkpointing.check_compatible(workdir, config)
      run = run_lib.Run(data_config, workdir)
    self.config = data_config
    self.run = run
    _limit_train(self.run.source, config.eval.max_train_examples)
    if params is None:
      # Parameters only, straight into their shardings: no optimizer state is built.
      params, step = self.run.latest_params(
          config.eval.step if config.eval.step >= 0 else None)
    self.params, self.step = params, int(step)
    self.num_classes = self.run.source.num_classes
    classifying = {"linear_probe", "low_data", "finetune"} & set(
        t.strip() for t in config.eval.tasks.split(","))
    if self.num_classes < 2 and classifying:
      raise probe.ProbeError(
          f"{data_config.dataset} has {self.num_classes} class; {', '.join(sorted(classifying))} "
          "need at least 2 (with one, every accuracy is trivially 100%). Evaluate on a labelled "
          "dataset (config.eval.dataset) or run only config.eval.tasks=bits_per_dim.")
    e = data_config.eval
    self.layers = config_lib.parse_layers(e.layers, data_config.model.num_layers)
    self._extractor = None
    self._features = {}
    self._raw_pixel = None  # the raw-pixel baseline's probe.Result, once fit
    log(f"Evaluating step {self.step} of {workdir} on {data_config.dataset} "
        f"({self.num_classes} classes; train {self.run.source.split_sizes['train']}, "
        f"validation {self.run.source.split_sizes['validation']}, test "
        f"{self.run.source.split_sizes['test']} images at {data_config.image_size}x"
        f"{data_config.image_size}); layers {self.layers}.")

  def at(self, params, step: int, out_dir: str) -> "Evaluator":
    """This evaluator on other parameters (the next in-training evaluation): the data source,
    the mesh and the compiled extraction are kept; the features are extracted again."""
    self.params, self.step, self.out_dir = params, int(step), out_dir
    self._features = {}
    return self

  def features(self, split: str) -> features_lib.FeatureSet:
    """`split`'s features on disk (memory-mapped), extracted once: a killed extraction resumes
    where it stopped, and later evaluations read the finished one."""
    if split not in self._features:
      c = self.config
      directory = features_lib.cache_dir(
          self.out_dir, c.dataset, f"{split}{self.run.source.split_sizes[split]}",
          self.step, self.layers, c.image_size, c.holdout_fraction)
      try:
        self._features[split] = features_lib.FeatureSet.open(directory)
        log(f"  features from cache {directory}")
      except FileNotFoundError:
        if self._extractor is None:
          self._extractor = features_lib.Extractor(self.run, self.layers,
                                                   c.eval.batch_size or c.batch_size)
        self._features[split] = self._extractor.to_disk(
            self.params, split, directory, dtype=c.eval.get("feature_dtype", "float16"),
            log=log)
    return self._features[split]

  def _fit(self, train_xy, val_xy, test_xy):
    e = self.config.eval
    return probe.fit_and_select(train_xy, val_xy, test_xy, num_classes=self.num_classes,
                                l2_grid=tuple(e.probe_l2), solver=e.probe_solver,
                                max_iters=e.probe_max_iters, sgd_epochs=e.probe_sgd_epochs,
                                seed=self.config.seed, log=log,
                                max_host_bytes=e.get("max_host_gib", 8.0) * 2**30,
                                mesh=self.run.mesh)

  def linear_probe(self) -> dict:
    c = self.config
    tr, va, te = (self.features(s) for s in ("train", "validation", "test"))
    result = {"dataset": c.dataset, "checkpoint_step": self.step, "image_size": c.image_size,
              "solver": c.eval.probe_solver, "num_train": len(tr.labels),
              "num_val": len(va.labels), "num_test": len(te.labels), "layers": {}}
    for j, layer in enumerate(self.layers):
      t0 = time.time()
      r = self._fit(tr.layer(j), va.layer(j), te.layer(j))
      result["layers"][str(layer)] = r.record()
      log(f"  probe layer {layer}: val {r.val_acc:.4f} test {r.test_acc:.4f} (l2 {r.l2:g}, "
          f"{r.fit.iterations} iterations{'' if r.fit.converged else ', NOT converged'}, "
          f"{time.time() - t0:.1f}s)")
    best = max(self.layers, key=lambda l: result["layers"][str(l)]["val_acc"])
    result["best_layer"] = best
    result["val_acc"] = result["layers"][str(best)]["val_acc"]
    result["test_acc"] = result["layers"][str(best)]["test_acc"]
    concat = config_lib.parse_concat(c.eval.get("concat_layers", ""), self.layers)
    if concat is not None:
      chosen = concat if isinstance(concat, list) else config_lib.centred(self.layers, best,
                                                                          concat)
      js = [self.layers.index(l) for l in chosen]
      t0 = time.time()
      r = self._fit(tr.concat(js), va.concat(js), te.concat(js))
      result["concat"] = dict(r.record(), layers=chosen, spec=str(c.eval.concat_layers))
      log(f"  probe on layers {','.join(map(str, chosen))} concatenated "
          f"({len(chosen) * self.run.model.cfg.width} features): val {r.val_acc:.4f} test "
          f"{r.test_acc:.4f} (l2 {r.l2:g}, {r.fit.iterations} iterations"
          f"{'' if r.fit.converged else ', NOT converged'}, {time.time() - t0:.1f}s)")
    fits = list(result["layers"].values()) + ([result["concat"]] if "concat" in result else [])
    result["converged"] = all(v["converged"] for v in fits)
    # What the layers' fits used (config.eval.probe_solver asks; features over the host budget
    # are fit by streamed SGD whatever it asks): one name, or "mixed".
    used = sorted({v["solver"] for v in fits})
    result["solver"] = used[0] if len(used) == 1 else "mixed"
    result["solver_requested"] = c.eval.probe_solver
    if c.eval.raw_pixel_baseline:
      if self._raw_pixel is None:  # the same at every step: fit once per evaluator
        src = self.run.source
        self._raw_pixel = self._fit(
            *(features_lib.raw_pixels(c, src, s) for s in ("train", "validation", "test")))
      r = self._raw_pixel
      result.update(raw_pixel_val_acc=r.val_acc, raw_pixel_test_acc=r.test_acc,
                    raw_pixel_l2=r.l2, raw_pixel=r.record())
      log(f"  raw-pixel baseline: val {r.val_acc:.4f} test {r.test_acc:.4f} (l2 {r.l2:g}, "
          f"{r.fit.iterations} iterations{'' if r.fit.converged else ', NOT converged'})")
    write_json(os.path.join(self.out_dir, "linear_probe.json"), result)
    if jax.process_index() == 0:
      plot_probe(os.path.join(self.out_dir, "linear_probe.png"), result)
    log(f"Linear probe: best layer {best}, test accuracy {result['test_acc']:.4f}"
        + (f"; layers {','.join(map(str, result['concat']['layers']))} concatenated "
           f"{result['concat']['test_acc']:.4f}" if "concat" in result else "")
        + (f" (raw pixels {result['raw_pixel_test_acc']:.4f})" if "raw_pixel_test_acc" in
           result else ""))
    return result

  def low_data(self) -> dict:
    e = self.config.eval
    layer, layer_source = e.low_data_layer, "config.eval.low_data_layer"
    if layer < 0:
      path = os.path.join(self.out_dir, "linear_probe.json")
      if os.path.exists(path):
        with open(path) as f:
          layer, layer_source = json.load(f)["best_layer"], "best layer of linear_probe.json"
      else:
        layer = self.config.model.num_layers // 2
        layer_source = "middle layer (no linear_probe.json to take the best layer from)"
    if layer not in self.layers:
      raise ValueError(f"config.eval.low_data_layer={layer} is not among the extracted layers "
                       f"{self.layers}; add it to config.eval.layers.")
    j = self.layers.index(layer)
    tr, te = self.features("train"), self.features("test")
    result = {"dataset": self.config.dataset, "checkpoint_step": self.step, "layer": layer,
              "layer_source": layer_source, "l2_selection": f"{e.low_data_folds}-fold "
              "cross-validation inside the labelled subset (no other labels are used)",
              "per_class": {}, "skipped": {}}
    fewest = int(np.bincount(tr.labels, minlength=self.num_classes).min())
    for n in e.low_data_per_class:
      if n > fewest:
        result["skipped"][str(n)] = f"the smallest class has {fewest} training examples"
        log(f"  low-data probe, {n}/class: skipped (the smallest class has {fewest})")
        continue
      runs = []
      for seed in range(e.low_data_seeds):
        idx = probe.per_class_subset(np.asarray(tr.labels), n, self.num_classes, seed)
        runs.append(probe.fit_low_data(
            (tr.features[idx, j], tr.labels[idx]), te.layer(j), num_classes=self.num_classes,
            l2_grid=tuple(e.probe_l2), folds=e.low_data_folds, solver=e.probe_solver,
            max_iters=e.probe_max_iters, sgd_epochs=e.probe_sgd_epochs, seed=seed,
            mesh=self.run.mesh))
      accs = [r["test_acc"] for r in runs]
      result["per_class"][str(n)] = {"labels": n * self.num_classes,
                                     "test_acc_mean": float(np.mean(accs)),
                                     "test_acc_std": float(np.std(accs)), "test_accs": accs,
                                     "l2": [r["l2"] for r in runs],
                                     "converged": all(r["converged"] for r in runs)}
      log(f"  low-data probe, {n}/class ({n * self.num_classes} labels): test "
          f"{np.mean(accs):.4f} +- {np.std(accs):.4f} over {len(accs)} seeds (l2 "
          f"{', '.join(format(r['l2'], 'g') for r in runs)} by cross-validation)")
    write_json(os.path.join(self.out_dir, "low_data.json"), result)
    return result

  def bits_per_dim(self) -> dict:
    out = self.run.evaluate(self.params, "test", -1)
    result = {"dataset": self.config.dataset, "split": "test", "checkpoint_step": self.step,
              "objective": self.config.objective, "bits_per_dim": out["bits_per_dim"],
              "nats_per_token": out["loss"],
              "num_images": self.run.source.split_sizes["test"]}
    write_json(os.path.join(self.out_dir, "bits_per_dim.json"), result)
    log(f"Test bits/dim: {out['bits_per_dim']:.4f} ({out['loss']:.4f} nats/token)")
    return result

  def finetune(self) -> dict:
    log("Fine-tuning (generative + classification loss) ...")
    result = finetune_lib.run(self.run, self.params, self.num_classes, log=log)
    result.update(dataset=self.config.dataset, checkpoint_step=self.step)
    write_json(os.path.join(self.out_dir, "finetune.json"), result)
    log(f"Fine-tuned: test accuracy {result['test_acc']:.4f} at step {result['best_step']} "
        f"(validation {result['val_acc']:.4f})")
    return result


def metrics_of(name: str, task: str, result: dict) -> dict:
  """The scalars of a task's result that an in-training evaluator logs, by metric name:
  probe/<name>/layer<l>/test_acc, probe/<name>/best_test_acc, bits_per_dim/<name>, ..."""
  if task == "linear_probe":
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
  if task == "bits_per_dim":
    return {f"bits_per_dim/{name}": result["bits_per_dim"]}
  if task == "low_data":
    return {f"low_data/{name}/{n}_per_class/test_acc": v["test_acc_mean"]
            for n, v in result["per_class"].items()}
  if task == "finetune":
    return {f"finetune/{name}/test_acc": result["test_acc"]}
  return {}


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
  data is opened up front on the training run's mesh, model and palette (`live`); the
  evaluator is built on it at its first step and kept, so its compiled extraction is reused."""

  def __init__(self, config, workdir: str, live: run_lib.Run):
    """Opens every evaluator's dataset now, before the first step: one that cannot be opened
    fails here, naming its config.evals field, instead of at its first evaluation."""
    self.config, self.workdir = config, workdir
    self.evaluators = {}  # name -> Evaluator, built at its first step
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
        if name in self.evaluators:
          ev = self.evaluators[name].at(params, step, out_dir)
        else:
          c = in_training_config(self.config, name)
          ev = self.evaluators[name] = Evaluator(c, self.workdir, params=params, step=step,
                                                 out_dir=out_dir, run=self._runs[name])
        for task in config_lib.eval_tasks(ev.config):
          metrics.update(metrics_of(name, task, getattr(ev, task)()))
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
      shown = {k: v for k, v in metrics.items()
               if k.split("/")[1] == name and ("best_test" in k or "concat/test" in k or "bits" in k)}
      log(f"  evaluator {name} at step {step}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({time.time() - t0:.0f}s)")
    return metrics


def evaluate(config, workdir: str) -> dict:
  """Runs config.eval.tasks on the checkpoint in `workdir`; returns {task: result}."""
  config_lib.validate(config, jax.device_count())
  ev = Evaluator(config, workdir)
  results = {}
  for task in config_lib.eval_tasks(config):
    results[task] = getattr(ev, task)()
  return results
