"""Training: the pure train step and the loop, `train_and_evaluate`."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from igpt_jax import checkpointing
from igpt_jax import errors
from igpt_jax import flops
from igpt_jax import heldout
from igpt_jax import image_grid
from igpt_jax import input_pipeline
from igpt_jax import metric_writer
from igpt_jax import model as model_lib
from igpt_jax import objectives
from igpt_jax import optim
from igpt_jax import run as run_lib
from igpt_jax import sampling
from igpt_jax import sharding
from igpt_jax import train_state as state_lib
from igpt_jax.train_state import TrainState


def jit_train_step(config, model, mesh, state_shardings):
  """The jitted `train_step` of `config`, called as step(state, batch, lr_args) with
  `train_state.lr_args`: explicit shardings, the state donated."""
  return jax.jit(
      functools.partial(train_step, apply_fn=model_lib.make_apply_fn(model),
                        make_tx=functools.partial(state_lib.make_optimizer, config),
                        objective=config.objective, mask_prob=config.mask_prob,
                        seed=config.seed, skip_nonfinite=config.nonfinite_policy == "skip",
                        accum_steps=config.grad_accum_steps),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _microbatches(tokens, accum_steps: int):
  """[batch, length] -> [accum_steps, batch / accum_steps, length], microbatch m holding rows
  m, m + k, m + 2k, ...: every device's contiguous share of the batch feeds every microbatch."""
  micro = einops.rearrange(tokens, "(n k) l -> k n l", k=accum_steps)
  return nn.with_logical_constraint(micro, (None, "act_batch", "act_length"))


def train_step(state: TrainState, batch: dict, lr_args, *, apply_fn, make_tx, objective: str,
               mask_prob: float, seed: int, skip_nonfinite: bool = False,
               accum_steps: int = 1):
  """One optimizer step. Pure: the step's randomness is fold_in(seed, step).

  lr_args: [peak learning rate, warmup steps, total steps] (`train_state.lr_args`), the
  schedule's numbers; `make_tx(schedule)` is the optimizer (`train_state.make_optimizer`).

  `accum_steps` > 1 splits the batch into that many micro-batches whose gradients are averaged
  (a scan: activations of one micro-batch live at a time); the update equals the full batch's.
  With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the parameters and
  optimizer state unchanged (the step counter still advances); `metrics["nonfinite"]` is 1.
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  schedule = optim.warmup_cosine(lr_args[0], lr_args[1], lr_args[2])
  tx = make_tx(schedule)

  def loss_fn(params, tokens, rng):
    per_image = objectives.per_image_loss(apply_fn, params, tokens, rng,
                                          objective=objective, mask_prob=mask_prob)
    return jnp.mean(per_image)

  if accum_steps == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["tokens"], rng)
  else:
    def accumulate(carry, xs):
      loss_sum, grad_sum = carry
      m, tokens = xs
      loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens,
                                                jax.random.fold_in(rng, m))
      return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum_steps), _microbatches(batch["tokens"], accum_steps)))
    loss = loss / accum_steps
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:
    keep_old = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree_util.tree_map(keep_old, params, state.params)
    opt_state = jax.tree_util.tree_map(keep_old, opt_state, state.opt_state)
  metrics = {
      "loss": loss,
      "bits_per_dim": objectives.bits_per_dim(loss),
      "grad_norm": grad_norm,
      "param_norm": optax.global_norm(params),
      "learning_rate": schedule(state.step),
      "nonfinite": 1.0 - finite.astype(jnp.float32),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class Trainer:
  """The training side of a run: its optimizer, train state shapes and jitted steps, on top of
  the `run.Run` every tool shares (mesh, data, palette, model, restore, evaluation batches)."""

  def __init__(self, config, workdir: str):
    self.run = run_lib.Run(config, workdir, fit_palette=True)
    self.config, self.workdir = config, workdir
    self.palette = self.run.palette  # fitted and saved when the run has no palette yet
    self.warmup = state_lib.warmup_steps(config, self.run.source.split_sizes["train"])
    self.tx = state_lib.make_optimizer(config, state_lib.lr_schedule(config, self.warmup))
    model, mesh = self.run.model, self.run.mesh
    # Shapes and shardings only: a state is allocated by restoring a checkpoint into them, or
    # by `init_state` when there is none, so one train state exists at a time.
    self.abstract_state, self.state_shardings = state_lib.abstract_train_state(
        model, self.tx, mesh, config)
    self.num_params = model_lib.count_params(self.abstract_state.params)
    self.flops_per_token = flops.train_flops_per_token_of(model.cfg)
    self.lr_args = state_lib.lr_args(config, self.warmup, mesh)
    self._train_step = jit_train_step(config, model, mesh, self.state_shardings)

  def init_state(self) -> TrainState:
    """A freshly initialised train state, built sharded (for a run without a checkpoint)."""
    state, _ = state_lib.create_train_state(self.run.model, self.tx, self.run.mesh, self.config,
                                            self.config.seed)
    return state

  def restore_latest(self, mgr):
    """(state, step, next_index) of the newest checkpoint that restores, read into the sharded
    state (see `run.Run.restore`); (None, None, None) if there is none."""
    return self.run.restore(mgr, abstract_state=self.abstract_state)

  def step(self, state, local_batch):
    with sharding.use(self.run.mesh, self.config):
      return self._train_step(state, sharding.global_batch(local_batch, self.run.mesh),
                              self.lr_args)


log = run_lib.log


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


PREEMPTED_EXIT_CODE = 42  # `python -m igpt_jax.main` exits with it after a preemption save.


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT (or a preemption notice) after checkpointing
  `step`; `interrupted` when it was a Ctrl-C."""

  def __init__(self, step: int, interrupted: bool = False):
    why = "interrupted (Ctrl-C)" if interrupted else "preempted"
    super().__init__(f"{why}: checkpoint saved at step {step}; rerun the same command to "
                     "resume from it.")
    self.step = step
    self.interrupted = interrupted
    self.exit_code = errors.INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE


class _StopFlag:
  """Set by SIGTERM or, once training has begun, a first SIGINT (Ctrl-C): the loop finishes the
  current step, checkpoints and stops. A Ctrl-C during start-up (data conversion, palette,
  restore), or a second one, stops at once (Python's KeyboardInterrupt)."""

  def __init__(self):
    self.requested = False
    self.interrupted = False
    self.training = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and not self.training:
      self.interrupted = True  # remembered in case a library swallows the KeyboardInterrupt
      raise KeyboardInterrupt
    self.requested = True
    if signum == signal.SIGINT:
      self.interrupted = True
      signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one stops at once
      print("igpt_jax: Ctrl-C: finishing this step, then checkpointing and stopping (press "
            "Ctrl-C again to stop at once, losing the steps since the last checkpoint).",
            file=sys.stderr, flush=True)

  def begin_training(self) -> None:
    """From here a first Ctrl-C checkpoints; one during start-up that a library caught stops
    now."""
    if self.interrupted:
      raise KeyboardInterrupt
    self.training = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def should_stop(self, mgr, step: int, every: int) -> bool:
    """Whether to checkpoint and stop after `step`.

    One process decides alone, every step. Several must agree on the step: they exchange their
    flags every `every` steps only (a host collective waits for the device, so doing it each
    step would stop the host from dispatching ahead).
    """
    if jax.process_count() > 1 and step % every:
      return False
    stop = self.requested
    try:  # TPU/SLURM preemption notices through JAX's distributed runtime, where present.
      stop = stop or bool(mgr.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except
      pass
    if jax.process_count() > 1:  # every process stops at the same step
      stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
    return stop


@contextlib.contextmanager
def _stop_if_save_fails(workdir: str, step: int, last_good):
  """Any error inside (saving `step`, or waiting for an asynchronous save) stops training with
  `checkpointing.save_failed`'s one message, keeping the checkpoints already written."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    raise checkpointing.save_failed(workdir, step, last_good, e) from e


def _save(mgr, workdir: str, step: int, state, next_index: int, last_good) -> None:
  with _stop_if_save_fails(workdir, step, last_good):
    mgr.check_for_errors()  # the previous save, still being written in the background
    checkpointing.save(mgr, step, state, next_index)


def _wait_saved(mgr, workdir: str, step: int, last_good) -> None:
  with _stop_if_save_fails(workdir, step, last_good):
    mgr.wait_until_finished()
    mgr.check_for_errors()


def _check_finite(fetched: list, first_step: int, config, skipped_so_far: int) -> int:
  """Raises on a non-finite step (policy 'stop') or too many skips; returns the skips seen."""
  bad = [first_step + i for i, m in enumerate(fetched)
         if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))]
  if not bad:
    return 0
  if config.nonfinite_policy == "stop":
    m = fetched[bad[0] - first_step]
    raise errors.DivergedError(
        f"non-finite training step {bad[0]} (loss {float(m['loss'])}, grad norm "
        f"{float(m['grad_norm'])}). Stopped before any checkpoint of it: the last good "
        "checkpoint is still the latest. Lower config.learning_rate, enable "
        "config.grad_clip_norm, or set config.nonfinite_policy='skip'.")
  if skipped_so_far + len(bad) > config.max_nonfinite_skips:
    raise errors.DivergedError(
        f"{skipped_so_far + len(bad)} non-finite steps skipped (the last at step {bad[-1]}), "
        f"more than config.max_nonfinite_skips={config.max_nonfinite_skips}: the run is "
        "diverging. The last checkpoint holds only finite updates.")
  return len(bad)


def throughput(tokens_per_sec: float, flops_per_token: float, config) -> dict:
  """Model TFLOP/s per device (igpt_jax/flops.py) and, given the device's peak, MFU."""
  per_device = tokens_per_sec * flops_per_token / jax.device_count() / 1e12
  out = {"model_tflops_per_device": per_device}
  peak = config.get("peak_tflops_per_device", 0.0)
  if peak > 0:
    out["mfu"] = per_device / peak
  return out


def _mean(fetched: list, key: str) -> float:
  values = np.asarray([float(m[key]) for m in fetched])
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if finite.size else float("nan")


def train_and_evaluate(config, workdir: str, evaluators=None) -> tuple[TrainState, dict]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  `evaluators(run)` builds the in-training evaluators of `config.evals` from the training
  `run.Run` (e.g. `functools.partial(eval_tasks.InTraining, config, workdir)`, as
  `python -m igpt_jax.main` passes): an object whose `due(step, last)` and `run(params, step,
  last=...)` the loop calls. This module never imports the evaluation stack itself.

  Returns the final train state and the metrics of the last logged step. Raises `Preempted`
  after checkpointing when SIGTERM (or a preemption notice) arrives, also one that arrives
  during start-up (the handler is installed first; the stop comes after the first step), or
  when Ctrl-C arrives during training. A Ctrl-C during start-up raises KeyboardInterrupt.
  """
  if (config.get("evals", None) or {}) and evaluators is None:
    raise ValueError("config.evals is set but no evaluators were handed to train_and_evaluate: "
                     "pass evaluators=functools.partial(eval_tasks.InTraining, config, "
                     "workdir), as python -m igpt_jax.main does.")
  with _StopFlag() as stop_flag:
    return _start_and_train(config, workdir, stop_flag, evaluators)


def _start_and_train(config, workdir: str, stop_flag, evaluators) -> tuple[TrainState, dict]:
  checkpointing.check_workdir(workdir, write=True)
  with checkpointing.exclusive(workdir):
    return _start_and_train_locked(config, workdir, stop_flag, evaluators)


def _start_and_train_locked(config, workdir: str, stop_flag,
                            evaluators) -> tuple[TrainState, dict]:
  checkpointing.check_compatible(workdir, config, data=True)
  trainer = Trainer(config, workdir)
  in_training = evaluators(trainer.run) if evaluators else None  # their data opened now
  c = config
  seq_len = c.image_size**2
  log(f"iGPT: {c.model.num_layers} layers x {c.model.width} width, {c.model.num_heads} heads, "
      f"{trainer.num_params:,} parameters; {c.objective} on {c.dataset} at {c.image_size}x"
      f"{c.image_size} ({seq_len} tokens), palette {c.palette_size}; compute {c.model.dtype} "
      f"(matmul precision {c.model.get('matmul_precision', 'default')}); mesh "
      f"{dict(trainer.run.mesh.shape)}; {jax.process_count()} process(es), "
      f"{jax.device_count()} device(s); warmup {trainer.warmup} steps.")
  sizes = trainer.run.source.split_sizes
  if sizes["validation"] == 0:
    fix = ("set config.holdout_fraction > 0 to hold out part of the train split"
           if c.holdout_fraction <= 0 else
           f"{c.holdout_fraction:g} of {sizes['train']:,} training images rounds to none; raise "
           "config.holdout_fraction or add images")
    log(f"No validation split (holdout_fraction={c.holdout_fraction}): validation bits/dim is "
        f"not computed; {fix}.")
  if sizes["train"] < c.batch_size:
    log(f"Warning: the training split has {sizes['train']:,} images, fewer than one batch "
        f"({c.batch_size}): every batch repeats them. Lower config.holdout_fraction "
        f"({c.holdout_fraction}) or use a larger dataset.")
  if jax.process_index() == 0:
    saved = checkpointing.saved_config(workdir)
    if saved is not None and saved != json.loads(config.to_json_best_effort()):
      checkpointing.keep_config_history(workdir)
    checkpointing.save_config(workdir, config)

  mgr = checkpointing.manager(workdir, config)
  writer = metric_writer.MetricWriter(workdir)
  try:
    # As big_vision does: every host<->device copy in the loop (state, batches, metrics,
    # checkpoints, validation) is explicit; an implicit one is an error (config.transfer_guard).
    with jax.transfer_guard(config.get("transfer_guard", "disallow")):
      return _train_loop(trainer, mgr, writer, stop_flag, in_training)
  finally:
    try:  # a pending async save completes even when the loop raised
      mgr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # the loop's own error (or `_wait_saved`'s, which names this one) is the one to see
    writer.close()
    mgr.close()


def _train_loop(trainer: Trainer, mgr, writer, stop_flag,
                in_training) -> tuple[TrainState, dict]:
  c, workdir = trainer.config, trainer.workdir
  seq_len = c.image_size**2
  state, latest, start_index = trainer.restore_latest(mgr)
  if latest is None:
    state, start_index = trainer.init_state(), 0
  else:
    log(f"Resumed from checkpoint at step {latest}.")
    log(f"Data position: example {start_index:,} of the training stream.")
  start = int(jax.device_get(state.step))
  if start > c.total_steps:
    raise errors.UserError(
        f"the latest checkpoint is at step {start}, past config.total_steps={c.total_steps}: "
        "nothing would be trained. Pass --config.total_steps above it to train further, or "
        "another --workdir to start afresh.")
  writer.forget_after(start)

  # Exact resume: the stream is read by index from the saved position, at a cost that does
  # not depend on how far training got.
  data = input_pipeline.train_iterator(
      c, trainer.run.source, trainer.palette, local_batch=trainer.run.local_batch, seed=c.seed,
      start_index=start_index, process_index=jax.process_index(),
      process_count=jax.process_count())

  stop_flag.begin_training()
  pending, t_last, t0, step = [], time.time(), time.time(), start
  last, skipped, saved_step, good_before = {}, 0, latest, latest
  for step in range(start + 1, c.total_steps + 1):
    state, metrics = trainer.step(state, next(data))
    pending.append(metrics)
    is_last = step == c.total_steps
    preempted = stop_flag.should_stop(mgr, step, c.preemption_check_every_steps)
    checkpoint_now = step % c.checkpoint_every_steps == 0 or is_last or preempted
    evals_now = in_training is not None and in_training.due(step, is_last)
    if step % c.log_every_steps == 0 or checkpoint_now or evals_now:
      fetched = jax.device_get(pending)
      skipped += _check_finite(fetched, step - len(fetched) + 1, c, skipped)
      last = {k: _mean(fetched, k) for k in fetched[0] if k != "nonfinite"}
      last["skipped_steps"] = skipped
      now = time.time()
      last["tokens_per_sec"] = len(pending) * c.batch_size * seq_len / max(now - t_last, 1e-9)
      last.update(throughput(last["tokens_per_sec"], trainer.flops_per_token, c))
      pending, t_last = [], now
      if checkpoint_now and saved_step != step:  # before evaluations, which may fail or stall
        _save(mgr, workdir, step, state, start_index + (step - start) * c.batch_size, saved_step)
        good_before, saved_step = saved_step, step
      if step % c.eval_every_steps == 0 or is_last:
        val = heldout.loss(trainer.run, state.params, "validation", c.eval_batches)
        if val is not None:  # None: no validation split (said at start-up)
          last.update({"val_loss": val["loss"], "val_bits_per_dim": val["bits_per_dim"]})
      if evals_now:  # the in-training evaluators (config.evals) on the live parameters
        with jax.transfer_guard("allow"):  # probes fit on host features
          last.update(in_training.run(state.params, step, last=is_last))
      writer.write(step, last)
      elapsed = now - t0
      eta = elapsed / (step - start) * (c.total_steps - step)
      val_txt = f" | val bits/dim {last['val_bits_per_dim']:.4f}" if "val_loss" in last else ""
      skip_txt = f" | {skipped} skipped" if skipped else ""
      mfu_txt = f" | MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ""
      log(f"step {step}/{c.total_steps} | loss {last['loss']:.4f} | bits/dim "
          f"{last['bits_per_dim']:.4f}{val_txt}{skip_txt} | {last['tokens_per_sec']:,.0f} "
          f"tokens/s | {last['model_tflops_per_device']:.3g} TFLOP/s/device{mfu_txt} | "
          f"elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}")
    if preempted and not is_last:
      _wait_saved(mgr, workdir, step, good_before)
      log(f"Stop requested ({'Ctrl-C' if stop_flag.interrupted else 'SIGTERM or preemption notice'}"
          f"): checkpoint saved at step {step}.")
      raise Preempted(step, interrupted=stop_flag.interrupted)

  _wait_saved(mgr, workdir, step, good_before)
  result = dict(last, step=int(step))
  if c.num_samples > 0:
    with jax.transfer_guard("allow"):  # a sampled grid, once, after training
      samples = sampling.to_images(trainer.run, sampling.draw(
          trainer.run, state.params, c.num_samples, jax.random.PRNGKey(c.seed + 2)))
    if jax.process_index() == 0:
      path = os.path.join(workdir, "samples", f"samples_step{step}.png")
      image_grid.save_png(path, image_grid.grid(samples))
      log(f"Wrote {c.num_samples} samples to {path}")
  if "val_bits_per_dim" in result:
    log(f"Done: step {step}, validation bits/dim {result['val_bits_per_dim']:.4f} "
        f"({result['val_loss']:.4f} nats/token).")
  return state, result
