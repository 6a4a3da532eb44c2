"""Linear probes: multinomial logistic regression on frozen features, fit in JAX.

Pure functions over arrays; nothing here knows about the model. Features are standardised with
the training split's mean and standard deviation, then a softmax classifier is fit to

    mean_i CE(softmax(x_i W + b), y_i) + 0.5 * l2 * ||W||^2

(the bias is not penalised) either full-batch with L-BFGS (the paper's choice for CIFAR/STL; it
converges to the optimum, so the probe measures the features rather than the optimiser) or with
minibatch SGD with momentum 0.9 (the paper's choice for ImageNet, where the features do not fit
one full-batch solve). The L2 strength is chosen on a held-out split.

`l2` relates to scikit-learn's `C` by `C = 1 / (l2 * n_train)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt_jax import errors


class ProbeError(errors.UserError, ValueError):
  """The data cannot give a meaningful probe; the message says why."""


@dataclasses.dataclass(frozen=True)
class Standardizer:
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, x) -> "Standardizer":
    x = np.asarray(x, np.float64)
    std = x.std(axis=0)
    return cls(mean=x.mean(axis=0).astype(np.float32),
               std=np.where(std > 1e-6, std, 1.0).astype(np.float32))

  def __call__(self, x) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


def init_params(dim: int, num_classes: int) -> dict:
  return {"w": jnp.zeros((dim, num_classes), jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}


def logits_fn(params, x):
  return x @ params["w"] + params["b"]


def objective(params, x, y, l2):
  """Mean cross-entropy plus 0.5 * l2 * ||W||^2."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)
  return jnp.mean(ce) + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def fit_lbfgs(x, y, l2, *, num_classes: int, max_iters: int = 500, tol: float = 1e-5):
  """Full-batch L-BFGS (zoom line search). Returns (params, iterations, final grad norm).

  Stops when the gradient's L2 norm falls below `tol` or after `max_iters` iterations.
  """
  fun = functools.partial(objective, x=x, y=y, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state, _, it = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state, optax.tree_utils.tree_norm(grad), it + 1

  def keep_going(carry):
    _, _, grad_norm, it = carry
    return (it < max_iters) & (grad_norm > tol)

  params = init_params(x.shape[1], num_classes)
  carry = (params, opt.init(params), jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0))
  params, _, grad_norm, iters = jax.lax.while_loop(keep_going, step, carry)
  return params, iters, grad_norm


def fit_sgd(x, y, l2, *, num_classes: int, epochs: int = 30, batch_size: int = 1024,
            learning_rate: float = 0.1, seed: int = 0):
  """Minibatch SGD, momentum 0.9, cosine-decayed learning rate. Returns params."""
  n = x.shape[0]
  steps_per_epoch = max(1, n // batch_size)
  tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch),
                 momentum=0.9)
  params = init_params(x.shape[1], num_classes)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(objective)(params, xb, yb, l2)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(n)
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params


def predict(params, x) -> np.ndarray:
  return np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(x)), axis=-1))


def accuracy(params, x, y) -> float:
  return float(np.mean(predict(params, x) == np.asarray(y)))


@dataclasses.dataclass
class ProbeResult:
  l2: float  # the strength chosen on validation
  val_acc: float
  test_acc: float
  val_acc_by_l2: dict  # {l2: validation accuracy}
  params: dict


def fit_and_select(train: tuple, val: tuple, test: tuple, *, num_classes: int,
                   l2_grid: Sequence[float], solver: str = "lbfgs", max_iters: int = 500,
                   sgd_epochs: int = 30, seed: int = 0) -> ProbeResult:
  """Standardises on train, fits one probe per L2 strength, picks the best on val, tests it.

  Each of train/val/test is (features [n, d], labels [n]).
  """
  if len(train[0]) == 0 or len(val[0]) == 0:
    raise ProbeError("the probe needs non-empty train and validation splits; set "
                     "config.eval.holdout_fraction in (0, 1) or use a larger dataset.")
  labels = np.concatenate([train[1], val[1], test[1]])
  if len(np.unique(train[1])) < 2:
    raise ProbeError(f"the probe's training split has {len(np.unique(train[1]))} class(es) "
                     f"(of num_classes={num_classes}); a classifier needs at least 2 or every "
                     "accuracy is trivially 100%. Evaluate on a labelled dataset with several "
                     "classes (config.eval.dataset).")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ProbeError(f"labels span [{labels.min()}, {labels.max()}], outside "
                     f"[0, {num_classes}): the dataset's num_classes is wrong.")
  scaler = Standardizer.fit(train[0])
  xtr, xva, xte = (jnp.asarray(scaler(s[0])) for s in (train, val, test))
  ytr = jnp.asarray(train[1], jnp.int32)
  best = None
  by_l2 = {}
  for l2 in l2_grid:
    if solver == "lbfgs":
      params, _, _ = fit_lbfgs(xtr, ytr, jnp.float32(l2), num_classes=num_classes,
                               max_iters=max_iters)
    elif solver == "sgd":
      params = fit_sgd(xtr, ytr, l2, num_classes=num_classes, epochs=sgd_epochs, seed=seed)
    else:
      raise ValueError(f"unknown probe solver {solver!r}; use 'lbfgs' or 'sgd'.")
    acc = accuracy(params, xva, val[1])
    by_l2[float(l2)] = acc
    if best is None or acc > best[1]:
      best = (float(l2), acc, params)
  l2, val_acc, params = best
  test_acc = accuracy(params, xte, test[1]) if len(test[0]) else float("nan")
  return ProbeResult(l2=l2, val_acc=val_acc, test_acc=test_acc, val_acc_by_l2=by_l2,
                     params=jax.tree_util.tree_map(np.asarray, params))


def per_class_subset(labels: np.ndarray, per_class: int, num_classes: int,
                     seed: int) -> np.ndarray:
  """Indices of `per_class` examples of each class, drawn without replacement by `seed`."""
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < per_class:
      raise ValueError(f"class {c} has {len(idx)} training examples, fewer than the "
                       f"{per_class} per class asked for; lower eval.low_data_per_class.")
    out.append(rng.choice(idx, per_class, replace=False))
  return np.sort(np.concatenate(out))
