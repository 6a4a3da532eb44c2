"""What the evaluation tasks share: a run's evaluation data (`run.Run` on config.eval's dataset),
the parameters being evaluated and their frozen features, extracted once per checkpoint."""

from __future__ import annotations

import os

import jax

from igpt_jax import atomic
from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import features as features_lib
from igpt_jax import palette as palette_lib
from igpt_jax import probe
from igpt_jax import run as run_lib

log = run_lib.log


def write_json(path: str, obj) -> None:
  """A result file, written by process 0 only."""
  if jax.process_index() == 0:
    atomic.write_json(path, obj, indent=2, sort_keys=True)


def _limit_train(source, n: int) -> None:
  """Keeps the first n examples of the (held-out-reduced) train split."""
  if 0 <= n < source.split_sizes["train"]:
    source.splits["train"] = source.splits["train"].head(n)


class EvalData:
  """A checkpoint (or, during training, the live parameters) on the evaluation dataset."""

  def __init__(self, config, workdir: str, *, params=None, step: int | None = None,
               out_dir: str | None = None, run: run_lib.Run | None = None):
    """`params` and `step` given: those instead of the latest checkpoint's; results then go to
    `out_dir` (default WORKDIR/eval). `run`: the evaluation data's `Run`, already built on the
    training run's mesh, model and palette (in-training evaluation); without it, one is built
    here for the checkpoint in `workdir`."""
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
    self.config, self.run = data_config, run
    _limit_train(run.source, config.eval.max_train_examples)
    if params is None:
      # Parameters only, straight into their shardings: no optimizer state is built.
      params, step = run.latest_params(config.eval.step if config.eval.step >= 0 else None)
    self.params, self.step = params, int(step)
    self.num_classes = run.source.num_classes
    classifying = {"linear_probe", "low_data", "finetune"} & set(config_lib.eval_tasks(config))
    if self.num_classes < 2 and classifying:
      raise probe.ProbeError(
          f"{data_config.dataset} has {self.num_classes} class; {', '.join(sorted(classifying))} "
          "need at least 2 (with one, every accuracy is trivially 100%). Evaluate on a labelled "
          "dataset (config.eval.dataset) or run only config.eval.tasks=bits_per_dim.")
    self.layers = config_lib.parse_layers(data_config.eval.layers,
                                          data_config.model.num_layers)
    self._extractor = None
    self._features = {}
    sizes = run.source.split_sizes
    log(f"Evaluating step {self.step} of {workdir} on {data_config.dataset} "
        f"({self.num_classes} classes; train {sizes['train']}, validation "
        f"{sizes['validation']}, test {sizes['test']} images at {data_config.image_size}x"
        f"{data_config.image_size}); layers {self.layers}.")

  def at(self, params, step: int, out_dir: str) -> "EvalData":
    """The same data on other parameters (the next in-training evaluation): the data source,
    the mesh and the compiled extraction are kept; the features are extracted again."""
    if params is not self.params or int(step) != self.step or out_dir != self.out_dir:
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

  def fit(self, train_xy, val_xy, test_xy) -> probe.ProbeResult:
    """A linear probe with config.eval's solver and L2 grid, chosen on validation."""
    e = self.config.eval
    return probe.fit_and_select(train_xy, val_xy, test_xy, num_classes=self.num_classes,
                                l2_grid=tuple(e.probe_l2), solver=e.probe_solver,
                                max_iters=e.probe_max_iters, sgd_epochs=e.probe_sgd_epochs,
                                seed=self.config.seed, log=log,
                                max_host_bytes=e.get("max_host_gib", 8.0) * 2**30,
                                mesh=self.run.mesh)

  def write(self, name: str, result: dict) -> str:
    """`result` as out_dir/<name>.json (process 0); returns the path."""
    path = os.path.join(self.out_dir, f"{name}.json")
    write_json(path, result)
    return path
