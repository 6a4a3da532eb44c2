"""Evaluation passes over one split of a run's data: the sharded, masked batches every tool reads
(validation during training, feature extraction, fine-tuning's accuracy) and the generative loss
on them (validation and test bits/dim)."""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp

from igpt_jax import input_pipeline
from igpt_jax import objectives
from igpt_jax import sharding


def batches(run, split: str, *, local_batch: int | None = None, num_batches: int = -1,
            start_batch: int = 0):
  """Global, sharded, masked batches of `split` of `run` (a `run.Run`): every process runs the
  same number, padding has mask False; yielded under the run's mesh. `start_batch` skips the
  first batches without reading them (a resumed extraction)."""
  it = input_pipeline.eval_iterator(
      run.config, run.source, run.palette, split, local_batch=local_batch or run.local_batch,
      num_batches=num_batches, process_index=jax.process_index(),
      process_count=jax.process_count(), start_batch=start_batch)
  with sharding.use(run.mesh, run.config):
    for batch in it:
      yield sharding.global_batch(batch, run.mesh)


_LOSS_SUMS = weakref.WeakKeyDictionary()  # run -> its compiled loss_sums


def _loss_sums(run):
  """(params, batch, batch index) -> (summed nats and token count, index + 1), compiled once per
  run. The masked-pixel mask's key is folded from the index, so a batch always gets the same
  mask; the index stays on the devices, so the loop copies nothing from the host."""
  if run not in _LOSS_SUMS:
    c, replicated = run.config, sharding.replicated(run.mesh)

    def loss_sums(params, batch, index):
      rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), index)
      return objectives.masked_loss_sums(run.apply_fn, params, batch, rng,
                                         objective=c.objective, mask_prob=c.mask_prob), index + 1

    _LOSS_SUMS[run] = jax.jit(loss_sums, in_shardings=(
        run.param_shardings, sharding.batch_sharding(run.mesh), replicated),
                              out_shardings=replicated)
  return _LOSS_SUMS[run]


def loss(run, params, split: str, num_batches: int = -1) -> dict | None:
  """Mean nats per token and bits/dim of `params` on `split` (num_batches=-1: all of it); None
  if the split is empty (holdout_fraction=0 leaves no validation split)."""
  if run.source.split_sizes[split] == 0:
    return None
  index = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=sharding.replicated(run.mesh))()
  step, sums = _loss_sums(run), []
  for batch in batches(run, split, num_batches=num_batches):
    out, index = step(params, batch, index)
    sums.append(out)
  sums = jax.device_get(sums)  # one copy to the host, after the last batch
  nats = sum(float(s["nats_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
  return {"loss": nats, "bits_per_dim": float(objectives.bits_per_dim(nats))}
