"""What the tools share about one run: mesh, data, palette, model, shapes, checkpoints, batches.

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
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import input_pipeline
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import palette as palette_lib
from igpt_jax import decoding
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
      for part in ("mesh", "model", "apply_fn", "centers", "_params_layout"):
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
  def centers(self) -> np.ndarray:
    """The palette: loaded from the run, or (for training only) fitted and saved there."""
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

  def eval_batches(self, split: str, *, local_batch: int | None = None,
                   num_batches: int = -1, start_batch: int = 0):
    """Global, sharded, masked batches of `split` (every process runs the same number; padding
    has mask False), yielded under the mesh: the one evaluation loop the tools share.
    `start_batch` skips the first batches without reading them (a resumed extraction)."""
    it = input_pipeline.eval_iterator(
        self.config, self.source, self.centers, split,
        local_batch=local_batch or self.local_batch, num_batches=num_batches,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_batch=start_batch)
    with sharding.use(self.mesh, self.config):
      for batch in it:
        yield sharding.global_batch(batch, self.mesh)

  @functools.cached_property
  def _loss_sums(self):
    """(params, batch, batch index) -> (summed nats and token count, index + 1). The
    masked-pixel mask's key is folded from the index, so a batch always gets the same mask; the
    index stays on the devices, so the loop copies nothing from the host."""
    c, replicated = self.config, sharding.replicated(self.mesh)

    def loss_sums(params, batch, index):
      rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), index)
      return objectives.masked_loss_sums(self.apply_fn, params, batch, rng,
                                         objective=c.objective, mask_prob=c.mask_prob), index + 1

    return jax.jit(loss_sums, in_shardings=(self.param_shardings,
                                            sharding.batch_sharding(self.mesh), replicated),
                   out_shardings=replicated)

  def evaluate(self, params, split: str, num_batches: int = -1):
    """Mean nats per token and bits/dim on `split` (num_batches=-1: all of it); None if the
    split is empty (holdout_fraction=0 leaves no validation split)."""
    if self.source.split_sizes[split] == 0:
      return None
    index = jax.jit(lambda: jnp.zeros((), jnp.int32),
                    out_shardings=sharding.replicated(self.mesh))()
    sums = []
    for batch in self.eval_batches(split, num_batches=num_batches):
      out, index = self._loss_sums(params, batch, index)
      sums.append(out)
    sums = jax.device_get(sums)  # one copy to the host, after the last batch
    loss = sum(float(s["nats_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
    return {"loss": loss, "bits_per_dim": float(objectives.bits_per_dim(loss))}

  def sample(self, params, num: int, rng, prefix=None, prefix_len: int = 0,
             cfg: decoding.SamplingConfig | None = None, per_step: int = 16) -> np.ndarray:
    """Draws `num` images' tokens [num, seq_len]: the cached sampler for next-pixel models,
    most-confident-first infilling for masked-pixel ones (`per_step` pixels committed a pass).
    `prefix` [num, seq_len] with `prefix_len` > 0 gives completions of its first `prefix_len`
    pixels."""
    cfg = cfg or decoding.SamplingConfig(temperature=self.config.sample_temperature)
    seq_len = self.model_cfg.seq_len
    prefix = np.zeros((num, seq_len), np.int32) if prefix is None else np.asarray(prefix)
    chunk = max(self.config.batch_size, 1)
    if num > chunk:  # a batch's worth at a time: memory stays that of one batch
      log(f"Sampling {num:,} images, {chunk} at a time ...")
      return np.concatenate([
          self.sample(params, len(prefix[i:i + chunk]), jax.random.fold_in(rng, i // chunk),
                      prefix[i:i + chunk], prefix_len, cfg, per_step)
          for i in range(0, num, chunk)])
    with sharding.use(self.mesh, self.config):
      if self.model_cfg.causal:
        tokens = decoding.sample(self.model_cfg, params, rng, jnp.asarray(prefix),
                                 prefix_len=prefix_len, cfg=cfg)
      else:
        keep = np.broadcast_to(np.arange(seq_len) < prefix_len, prefix.shape)
        tokens = decoding.infill(self.apply_fn, params, rng, prefix, keep, per_step=per_step,
                                 cfg=cfg)
    return np.asarray(tokens)

  def to_images(self, tokens) -> np.ndarray:
    """Tokens [..., seq_len] -> uint8 RGB images [..., S, S, 3] through the palette."""
    return np.asarray(palette_lib.dequantize(jnp.asarray(tokens), self.centers,
                                             self.config.image_size))
