"""Training: state creation, the pure train/eval steps, and `train_and_evaluate`."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import images as images_lib
from igpt_jax import input_pipeline
from igpt_jax import metric_writer
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import palette as palette_lib
from igpt_jax import sampling
from igpt_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def warmup_steps(config, train_examples: int) -> int:
  """config.warmup_steps, with -1 meaning one epoch of the training split (the paper)."""
  if config.warmup_steps >= 0:
    return config.warmup_steps
  return min(config.total_steps, max(1, train_examples // config.batch_size))


def lr_schedule(config, warmup: int):
  """Linear warmup from 0, then cosine decay to 0 at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=0.0)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """Adam(b1, b2=0.95) with decoupled weight decay (0 in the paper) and global-norm clipping."""
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*chain)


def create_train_state(model, tx, mesh, config, rng):
  """Builds the sharded train state shape-first, so it is never materialised on one device.

  Returns (state, state_shardings).
  """
  seq_len = config.image_size**2

  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with sharding.use(mesh, config):
    boxed = jax.eval_shape(init, rng)
    shardings = sharding.param_shardings(boxed, mesh, config)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_apply_fn(model):
  def apply_fn(params, tokens, keep_mask=None):
    return model.apply({"params": params}, tokens, keep_mask)
  return apply_fn


def train_step(state: TrainState, batch: dict, *, apply_fn, tx, schedule, objective: str,
               mask_prob: float, seed: int):
  """One optimizer step. Pure: the step's randomness is fold_in(seed, step)."""
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

  def loss_fn(params):
    per_image = objectives.per_image_loss(apply_fn, params, batch["tokens"], rng,
                                          objective=objective, mask_prob=mask_prob)
    return jnp.mean(per_image)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "bits_per_dim": objectives.bits_per_dim(loss),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "learning_rate": schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, rng, *, apply_fn, objective: str, mask_prob: float):
  """Sum of per-image nats over the real (unpadded) images, and their count."""
  per_image = objectives.per_image_loss(apply_fn, params, batch["tokens"], rng,
                                        objective=objective, mask_prob=mask_prob)
  mask = batch["mask"].astype(jnp.float32)
  return {"nats_sum": jnp.sum(per_image * mask), "count": jnp.sum(mask)}


class Trainer:
  """Everything `train_and_evaluate` needs, built once from a config (notebooks reuse it)."""

  def __init__(self, config, workdir: str):
    config_lib.validate(config, jax.device_count())
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config)
    self.local_batch = sharding.local_batch_size(config)
    self.source = input_pipeline.open_source(config)
    self.centers = self._palette()
    self.model_cfg = model_lib.model_config_from(config)
    self.model = model_lib.IGPT(self.model_cfg)
    self.apply_fn = make_apply_fn(self.model)
    self.warmup = warmup_steps(config, self.source.split_sizes["train"])
    self.schedule = lr_schedule(config, self.warmup)
    self.tx = make_optimizer(config, self.schedule)
    self.state, self.state_shardings = create_train_state(
        self.model, self.tx, self.mesh, config, jax.random.PRNGKey(config.seed))
    self.num_params = model_lib.count_params(self.state.params)
    step_kw = dict(apply_fn=self.apply_fn, objective=config.objective,
                   mask_prob=config.mask_prob)
    batch_sharding = sharding.batch_sharding(self.mesh)
    replicated = sharding.replicated(self.mesh)
    self._train_step = jax.jit(
        functools.partial(train_step, tx=self.tx, schedule=self.schedule, seed=config.seed,
                          **step_kw),
        in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(
        functools.partial(eval_step, **step_kw),
        in_shardings=(self.state_shardings.params, batch_sharding, replicated),
        out_shardings=replicated)

  def _palette(self) -> np.ndarray:
    c = self.config
    path = c.palette_path or os.path.join(self.workdir, "palette.npy")
    if os.path.exists(path):
      return palette_lib.load(path, c.palette_size)
    if c.palette_path:
      raise FileNotFoundError(f"config.palette_path={c.palette_path!r} does not exist; fix the "
                              "path or set it to '' to fit a palette into the workdir.")
    log(f"Fitting a {c.palette_size}-color palette on {c.palette_fit_pixels} pixels of "
        f"{c.palette_fit_images} training images ...")
    pixels = input_pipeline.palette_pixels(c, self.source)
    centers = palette_lib.fit(pixels, c.palette_size, seed=c.seed,
                              iterations=c.palette_fit_iterations)
    # Identical on every process, whatever each host computed.
    centers = np.asarray(multihost_utils.broadcast_one_to_all(centers))
    if jax.process_index() == 0:
      palette_lib.save(path, centers)
    return centers

  def restore_latest(self, mgr):
    """(state, step) of the newest checkpoint onto this trainer's shardings; (None, None)."""
    latest = mgr.latest_step()
    if latest is None:
      return None, None
    abstract = checkpointing.abstract_like(self.state, self.state_shardings)
    return checkpointing.restore(mgr, latest, abstract), latest

  def train_step(self, state, local_batch):
    with sharding.use(self.mesh, self.config):
      return self._train_step(state, sharding.global_batch(local_batch, self.mesh))

  def evaluate(self, params, split: str, num_batches: int) -> dict:
    """Mean nats per token and bits/dim on `split` (num_batches=-1: all of it)."""
    c = self.config
    it = input_pipeline.eval_iterator(
        c, self.source, self.centers, split, local_batch=self.local_batch,
        num_batches=num_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    nats, count = 0.0, 0.0
    with sharding.use(self.mesh, c):
      for i, batch in enumerate(it):
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), i)
        out = self._eval_step(params, sharding.global_batch(batch, self.mesh), rng)
        nats += float(out["nats_sum"])
        count += float(out["count"])
    loss = nats / max(count, 1.0)
    return {"loss": loss, "bits_per_dim": float(objectives.bits_per_dim(loss))}

  def sample(self, params, num: int, rng, prefix=None, prefix_len: int = 0,
             cfg: sampling.SamplingConfig | None = None) -> np.ndarray:
    """Draws `num` images' tokens [num, seq_len]: the cached sampler for next-pixel models,
    most-confident-first infilling for masked-pixel ones. `prefix` [num, seq_len] with
    `prefix_len` > 0 gives completions of its first `prefix_len` pixels."""
    cfg = cfg or sampling.SamplingConfig(temperature=self.config.sample_temperature)
    seq_len = self.model_cfg.seq_len
    prefix = np.zeros((num, seq_len), np.int32) if prefix is None else np.asarray(prefix)
    with sharding.use(self.mesh, self.config):
      if self.model_cfg.causal:
        tokens = sampling.sample(self.model_cfg, params, rng, jnp.asarray(prefix),
                                 prefix_len=prefix_len, cfg=cfg)
      else:
        keep = np.broadcast_to(np.arange(seq_len) < prefix_len, prefix.shape)
        tokens = sampling.infill(self.apply_fn, params, rng, prefix, keep, cfg=cfg)
    return np.asarray(tokens)

  def to_images(self, tokens) -> np.ndarray:
    """Tokens [..., seq_len] -> uint8 RGB images [..., S, S, 3] through the palette."""
    return np.asarray(palette_lib.dequantize(jnp.asarray(tokens), self.centers,
                                             self.config.image_size))


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_finite(step: int, metrics: dict) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {bad}. The last good checkpoint is kept; "
        "lower config.learning_rate or enable config.grad_clip_norm.")


def train_and_evaluate(config, workdir: str) -> tuple[TrainState, dict]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the final train state and the metrics of the last logged step.
  """
  os.makedirs(workdir, exist_ok=True)
  checkpointing.check_compatible(workdir, config)
  trainer = Trainer(config, workdir)
  c = config
  seq_len = c.image_size**2
  log(f"iGPT: {c.model.num_layers} layers x {c.model.width} width, {c.model.num_heads} heads, "
      f"{trainer.num_params:,} parameters; {c.objective} on {c.dataset} at {c.image_size}x"
      f"{c.image_size} ({seq_len} tokens), palette {c.palette_size}; mesh "
      f"{dict(trainer.mesh.shape)}; {jax.process_count()} process(es), "
      f"{jax.device_count()} device(s); warmup {trainer.warmup} steps.")
  if jax.process_index() == 0:
    checkpointing.save_config(workdir, config)

  mgr = checkpointing.manager(workdir, config)
  state, latest = trainer.restore_latest(mgr)
  if latest is None:
    state = trainer.state
  else:
    log(f"Resumed from checkpoint at step {latest}.")
  start = int(state.step)

  writer = metric_writer.MetricWriter(workdir)
  # The stream restarts with a step-dependent seed on resume (no repeat of the same batches).
  data = input_pipeline.train_iterator(
      c, trainer.source, trainer.centers, local_batch=trainer.local_batch,
      seed=c.seed * 1_000_003 + start, process_index=jax.process_index(),
      process_count=jax.process_count())

  pending, t_last, t0, step = [], time.time(), time.time(), start
  last = {}
  for step in range(start + 1, c.total_steps + 1):
    state, metrics = trainer.train_step(state, next(data))
    pending.append(metrics)
    is_last = step == c.total_steps
    if step % c.log_every_steps == 0 or step % c.checkpoint_every_steps == 0 or is_last:
      fetched = jax.device_get(pending)
      last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      _check_finite(step, last)
      now = time.time()
      last["tokens_per_sec"] = len(pending) * c.batch_size * seq_len / max(now - t_last, 1e-9)
      pending, t_last = [], now
      if step % c.eval_every_steps == 0 or is_last:
        val = trainer.evaluate(state.params, "validation", c.eval_batches)
        last.update({"val_loss": val["loss"], "val_bits_per_dim": val["bits_per_dim"]})
      writer.write(step, last)
      elapsed = now - t0
      eta = elapsed / (step - start) * (c.total_steps - step)
      val_txt = f" | val bits/dim {last['val_bits_per_dim']:.4f}" if "val_loss" in last else ""
      log(f"step {step}/{c.total_steps} | loss {last['loss']:.4f} | bits/dim "
          f"{last['bits_per_dim']:.4f}{val_txt} | {last['tokens_per_sec']:,.0f} tokens/s | "
          f"elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
    if step % c.checkpoint_every_steps == 0 or is_last:
      checkpointing.save(mgr, step, state)
  mgr.wait_until_finished()

  result = dict(last, step=int(step))
  if c.num_samples > 0:
    samples = trainer.to_images(trainer.sample(state.params, c.num_samples,
                                               jax.random.PRNGKey(c.seed + 2)))
    if jax.process_index() == 0:
      path = os.path.join(workdir, "samples", f"samples_step{step}.png")
      images_lib.save_png(path, images_lib.grid(samples))
      log(f"Wrote {c.num_samples} samples to {path}")
  writer.close()
  mgr.close()
  if "val_bits_per_dim" in result:
    log(f"Done: step {step}, validation bits/dim {result['val_bits_per_dim']:.4f} "
        f"({result['val_loss']:.4f} nats/token).")
  return state, result
