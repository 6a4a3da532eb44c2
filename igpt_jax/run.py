"""What the tools share about one run: its mesh, data source, model, palette, parameter layout and
checkpoints (passes over its data: `heldout.py`; sampling: `sampling.py`).

`Run(config, workdir)` validates the config and builds nothing else up front; every part is
built on first use, so each tool pays only for what it uses: `sample` and `evaluate` restore
parameters alone (no optimizer state is built or read), `convert` never opens the dataset, and
only training (igpt_jax/train.py) fits a palette or allocates a fresh state.

One `restore` serves all of them, with the damaged-checkpoint handling of
`checkpointing.restore_newest`.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import input_pipeline
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import sharding
from igpt_jax import train_state


def log(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class Run:
  """One run directory and its config; parts are built lazily (see the module docstring)."""

  def __init__(self, config, workdir: str, *, fit_palette: bool = False, share=None):
    """`share`: another Run of the same model (the training run, for in-training evaluation on
    another dataset) whose config is already validated and whose mesh, model and palette are
    used as they are: nothing is validated, read from disk or built again."""
    if share is None:
      config_lib.validate(config, jax.device_count())
    self.config = config
    self.workdir = workdir
    self._fit_palette = fit_palette
    self.local_batch = sharding.local_batch_size(config)
    if share is not None:  # fills the cached properties below
      for part in ("mesh", "model", "apply_fn", "palette", "_params_layout"):
        self.__dict__[part] = getattr(share, part)

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    return sharding.make_mesh(self.config)

  @functools.cached_property
  def source(self) -> input_pipeline.Source:
    return input_pipeline.open_source(self.config)

  @functools.cached_property
  def model(self) -> model_lib.IGPT:
    return model_lib.IGPT(model_lib.model_config_from(self.config))

  @property
  def model_cfg(self) -> model_lib.ModelConfig:
    return self.model.cfg

  @functools.cached_property
  def apply_fn(self):
    return model_lib.make_apply_fn(self.model)

  @functools.cached_property
  def palette(self) -> np.ndarray:
    """The palette's colors [palette_size, 3] (the k-means centers): loaded from the run, or
    (for training only) fitted and saved there."""
    c = self.config
    path = palette_lib.path_for(c, self.workdir)
    if os.path.exists(path) or not self._fit_palette:
      return palette_lib.load_for_run(c, self.workdir)
    if c.palette_path:
      raise errors.MissingError(f"config.palette_path={c.palette_path!r} does not exist; fix "
                                "the path or set it to '' to fit a palette into the workdir.")
    pixels, num_images = input_pipeline.palette_pixels(c, self.source)
    log(f"Fitting a {c.palette_size}-color palette on {len(pixels):,} pixels of "
        f"{num_images:,} training images ...")
    centers = palette_lib.fit(pixels, c.palette_size, seed=c.seed,
                              iterations=c.palette_fit_iterations)
    # Identical on every process, whatever each host computed.
    centers = np.asarray(multihost_utils.broadcast_one_to_all(centers))
    if jax.process_index() == 0:
      palette_lib.save(path, centers)
    return centers

  @functools.cached_property
  def _params_layout(self):
    return train_state.sharded_shapes(lambda: model_lib.abstract_params(self.model_cfg),
                                      self.mesh, self.config)

  @property
  def abstract_params(self):
    """Parameter ShapeDtypeStructs carrying their shardings: nothing allocated."""
    return self._params_layout[0]

  @property
  def param_shardings(self):
    return self._params_layout[1]

  def checkpoints(self):
    return checkpointing.manager(self.workdir, self.config)

  def restore(self, mgr, *, step: int | None = None, abstract_state=None):
    """(restored, step, next_index), or (None, None, None) when there is no checkpoint: the
    whole state into `abstract_state`'s shards, else the parameters alone (orbax partial
    restore). See `checkpointing.restore_newest`."""
    return checkpointing.restore_newest(
        mgr, self.workdir, abstract_state if abstract_state is not None else self.abstract_params,
        params_only=abstract_state is None, step=step, batch_size=self.config.batch_size, log=log)

  def latest_params(self, step: int | None = None):
    """(params, step) of the run's latest checkpoint (or `step`); a run without one fails."""
    mgr = self.checkpoints()
    try:
      params, found, _ = self.restore(mgr, step=step)
    finally:
      mgr.close()
    if params is None:
      raise errors.MissingError(f"no checkpoint in {self.workdir}/checkpoints; train (python "
                                "-m igpt_jax.main) or import (python -m igpt_jax.convert) one.")
    return params, found
