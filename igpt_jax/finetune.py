"""Fine-tuning for classification, as the paper: generative + classification loss.

A zero-initialised linear head reads the final normalised features (`ln_f` output) averaged over
positions; the whole model trains on `generative + clf_weight * classification` with its own
Adam settings (config.eval.finetune_*), and the parameters of the best validation accuracy are
the ones tested (early stopping). The pre-training checkpoints are only read.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax import heldout
from igpt_jax import input_pipeline
from igpt_jax import objectives
from igpt_jax import optim
from igpt_jax import sharding


def init_head(width: int, num_classes: int) -> dict:
  return {"w": jnp.zeros((width, num_classes), jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}


def class_logits(head, pooled):
  return pooled @ head["w"] + head["b"]


def loss_fn(params, tokens, labels, rng, *, model, objective: str, mask_prob: float,
            clf_weight: float):
  """(total, metrics) for params {"model", "head"}; pure, randomness from `rng`."""
  keep = objectives.keep_mask_for(objective, rng, tokens.shape, mask_prob)
  logits, feats = model.apply({"params": params["model"]}, tokens, keep, output="both")
  gen = objectives.loss_from_logits(logits, tokens, keep)
  clf_logits = class_logits(params["head"], feats[:, -1])
  clf = optax.softmax_cross_entropy_with_integer_labels(clf_logits, labels)
  gen, clf = jnp.mean(gen), jnp.mean(clf)
  acc = jnp.mean(jnp.argmax(clf_logits, -1) == labels)
  return gen + clf_weight * clf, {"gen_loss": gen, "clf_loss": clf, "train_acc": acc}


def train_step(state, batch, *, tx, seed: int, **loss_kw):
  params, opt_state, step = state
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch["tokens"], batch["label"], rng, **loss_kw)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state, step + 1), dict(metrics, loss=loss)


def predict_step(params, batch, *, model, objective: str, mask_prob: float, ensemble: int,
                 seed: int):
  """Predicted classes. Next-pixel models see the whole image; masked-pixel models are tested
  as they were fine-tuned, on masked inputs: the class logits of `ensemble` random masks are
  averaged (the paper's mask ensembling)."""
  if objective != "masked_pixel":
    feats = model.apply({"params": params["model"]}, batch["tokens"], output="features")
    logits = class_logits(params["head"], feats[:, -1])
  else:
    def one_mask(k):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), k)
      keep = objectives.keep_mask_for(objective, rng, batch["tokens"].shape, mask_prob)
      feats = model.apply({"params": params["model"]}, batch["tokens"], keep,
                          output="features")
      return jax.nn.log_softmax(class_logits(params["head"], feats[:, -1]))
    logits = jnp.mean(jax.lax.map(one_mask, jnp.arange(ensemble)), axis=0)
  return jnp.argmax(logits, axis=-1), batch["label"], batch["mask"]


def run(pretrained, model_params, num_classes: int, *, log=print) -> dict:
  """Fine-tunes `model_params` on the dataset of `pretrained` (a `run.Run`); returns the
  finetune.json content."""
  c = pretrained.config
  e = c.eval
  mesh = pretrained.mesh
  batch_size = e.finetune_batch_size or c.batch_size
  local_batch = batch_size // jax.process_count()
  schedule = optim.warmup_cosine(e.finetune_learning_rate,
                                 min(e.finetune_warmup_steps, e.finetune_steps),
                                 e.finetune_steps)
  tx = optim.adam(c, schedule)
  replicated = sharding.replicated(mesh)
  params = {"model": model_params,
            "head": jax.device_put(init_head(c.model.width, num_classes), replicated)}
  param_shardings = {"model": pretrained.param_shardings,
                     "head": jax.tree_util.tree_map(lambda _: replicated, params["head"])}
  with sharding.use(mesh, c):
    opt_state = jax.jit(tx.init, out_shardings=None)(params)
  opt_shardings = jax.tree_util.tree_map(lambda x: x.sharding, opt_state)
  state_shardings = (param_shardings, opt_shardings, replicated)
  state = (params, opt_state, jnp.zeros((), jnp.int32))
  loss_kw = dict(model=pretrained.model, objective=c.objective, mask_prob=c.mask_prob,
                 clf_weight=e.finetune_clf_weight)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(functools.partial(train_step, tx=tx, seed=c.seed + 17, **loss_kw),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  pred_fn = jax.jit(functools.partial(predict_step, model=pretrained.model,
                                      objective=c.objective, mask_prob=c.mask_prob,
                                      ensemble=e.bert_mask_ensemble, seed=c.seed + 23),
                    in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

  def accuracy(params, split, num_batches):
    right = total = 0
    for batch in heldout.batches(pretrained, split, local_batch=local_batch,
                                 num_batches=num_batches):
      pred, label, mask = (np.asarray(a) for a in pred_fn(params, batch))
      right += int(np.sum((pred == label) & mask))
      total += int(np.sum(mask))
    return right / max(total, 1)

  # Fine-tuning's own augmentation, not the pre-training crop (eval.finetune_*).
  aug = c.copy_and_resolve_references()
  with aug.unlocked():
    aug.train_crop_fraction = tuple(e.finetune_crop_fraction)
    aug.train_pad_crop, aug.train_flip = e.finetune_pad_crop, e.finetune_flip
  data = input_pipeline.train_iterator(
      aug, pretrained.source, pretrained.palette, local_batch=local_batch, seed=c.seed + 17,
      process_index=jax.process_index(), process_count=jax.process_count())
  history, best = [], None
  t0 = time.time()
  for step in range(1, e.finetune_steps + 1):
    with sharding.use(mesh, c):
      state, metrics = step_fn(state, sharding.global_batch(next(data), mesh))
    if step % e.finetune_eval_every_steps == 0 or step == e.finetune_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not all(np.isfinite(v) for v in m.values()):
        raise FloatingPointError(f"fine-tuning diverged at step {step}: {m}; lower "
                                 "config.eval.finetune_learning_rate.")
      val_acc = accuracy(state[0], "validation", e.finetune_eval_batches)
      history.append(dict(m, step=step, val_acc=val_acc))
      log(f"  finetune step {step}/{e.finetune_steps} | loss {m['loss']:.4f} (gen "
          f"{m['gen_loss']:.4f}, clf {m['clf_loss']:.4f}) | val acc {val_acc:.4f} | "
          f"{time.time() - t0:.0f}s")
      if best is None or val_acc > best[1]:
        # A copy: the step donates `state`, so the best parameters must not alias it.
        best = (step, val_acc, jax.tree_util.tree_map(jnp.copy, state[0]))
  best_step, best_val, best_params = best
  test_acc = accuracy(best_params, "test", -1)
  return {"best_step": best_step, "val_acc": best_val, "test_acc": test_acc,
          "steps": e.finetune_steps, "learning_rate": e.finetune_learning_rate,
          "clf_weight": e.finetune_clf_weight, "history": history,
          "augmentation": {"crop_fraction": list(e.finetune_crop_fraction),
                           "pad_crop": e.finetune_pad_crop, "flip": e.finetune_flip},
          "mask_ensemble": e.bert_mask_ensemble if c.objective == "masked_pixel" else 0}
