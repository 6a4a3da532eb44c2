"""Linear probes: multinomial logistic regression on frozen features, fit in JAX.

Pure functions over arrays; nothing here knows about the model. Features are standardised with
the training split's mean and standard deviation, then a softmax classifier is fit to

    mean_i CE(softmax(x_i W + b), y_i) + 0.5 * l2 * ||W||^2

(the bias is not penalised) either full-batch with L-BFGS (the paper's choice for CIFAR/STL; it
converges to the optimum, so the probe measures the features rather than the optimiser) or with
minibatch SGD with momentum 0.9 (the paper's choice for ImageNet, where the features do not fit
one full-batch solve). The L2 strength is chosen on a held-out split (widened once when the best
is at an end of the grid); low-data probes choose it by k-fold cross-validation inside their
labelled subset. Every fit records its iterations, final loss and gradient norm, and whether it
converged before its iteration cap.

`l2` relates to scikit-learn's `C` by `C = 1 / (l2 * n_train)`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from igpt_jax import errors


class ProbeError(errors.UserError, ValueError):
  """The data cannot give a meaningful probe; the message says why."""


CHUNK_ROWS = 16_384  # rows read at a time from features that may live on disk
# SGD steps dispatched and not yet finished: each holds its minibatch in host memory until it
# runs, and an unbounded run-ahead held up to ~15 of them (a streamed fit's peak varied 4-18 MB
# against an 8 MiB budget). Two keep the host preparing a batch while the device runs one.
SGD_STEPS_IN_FLIGHT = 2
# Peak host memory of a probe fit in memory, in units of the float32 training features: the
# standardised copy, the device's copy of it (on a CPU, host memory too), chunks read from disk
# and the solver's buffers. Measured 3.05x (SGD) and 3.13x (L-BFGS) on 2.7-4 GiB of features,
# and up to 3.41x (SGD, 123 MB) while other tests loaded the machine (tests/test_evaluate.py
# measures it again); 3.5 keeps a margin over all of them.
IN_MEMORY_PEAK_FACTOR = 3.5


def chunks(n: int, rows: int = CHUNK_ROWS):
  """[start, stop) row ranges covering n rows."""
  return [(a, min(n, a + rows)) for a in range(0, n, rows)]


@dataclasses.dataclass(frozen=True)
class Standardizer:
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, x, rows: int = CHUNK_ROWS) -> "Standardizer":
    """Per-feature mean and standard deviation of `x` [n, d] (an array or a memory map of any
    dtype), in one pass over row chunks: float64 statistics merged chunk by chunk (Chan et
    al.), so host memory holds one chunk, not x."""
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for a, b in chunks(x.shape[0], rows):
      c = np.asarray(x[a:b], np.float64)
      n_c, mean_c = len(c), c.mean(axis=0)
      m2_c = np.square(c - mean_c).sum(axis=0)
      delta, total = mean_c - mean, count + n_c
      mean = mean + delta * (n_c / total)
      m2 = m2 + m2_c + np.square(delta) * (count * n_c / total)
      count = total
    std = np.sqrt(m2 / max(count, 1))
    return cls(mean=mean.astype(np.float32),
               std=np.where(std > 1e-6, std, 1.0).astype(np.float32))

  def __call__(self, x) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)

  def apply(self, x, rows: int = CHUNK_ROWS) -> np.ndarray:
    """The standardised float32 copy of `x`, built chunk by chunk (x may be a memory map)."""
    out = np.empty(x.shape, np.float32)
    for a, b in chunks(x.shape[0], rows):
      out[a:b] = self(x[a:b])
    return out


def init_params(dim: int, num_classes: int) -> dict:
  return {"w": jnp.zeros((dim, num_classes), jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}


def logits_fn(params, x):
  return x @ params["w"] + params["b"]


def objective(params, x, y, l2, weights=None):
  """Mean cross-entropy (over the examples with weight 1 when `weights` is given) plus
  0.5 * l2 * ||W||^2."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)
  mean = jnp.mean(ce) if weights is None else jnp.sum(weights * ce) / jnp.sum(weights)
  return mean + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


@dataclasses.dataclass
class Fit:
  """A fitted probe and how its optimisation ended."""
  params: dict
  iterations: int
  final_loss: float  # the objective (cross-entropy + L2 term) at the returned parameters
  grad_norm: float  # its gradient's L2 norm there
  converged: bool  # the stopping rule stopped it, not the iteration cap

  def record(self) -> dict:
    return {"iterations": self.iterations, "final_loss": self.final_loss,
            "grad_norm": self.grad_norm, "converged": self.converged}


def put_rows(x, mesh) -> jax.Array:
  """Host array `x` [n, ...] as one global array with its rows split over every device of
  `mesh` (n a multiple of mesh.size). Every process passes the same `x` (each keeps its own copy
  of the features) and places only its devices' rows."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, _rows(mesh), lambda index: x[index])


def _rows(mesh) -> NamedSharding:
  """Dimension 0 split over every axis of `mesh`."""
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicate(tree, mesh):
  """Host arrays as global arrays replicated on every device of `mesh`."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(
      lambda v: jax.make_array_from_callback(np.shape(v), sharding,
                                             lambda index: np.asarray(v)[index]), tree)


def on_devices(x, y, weights, mesh=None):
  """(x, y, weights) ready for a full-batch fit: with a mesh of several devices, padded with
  weight-0 rows to a multiple of its size and split over it by rows (features, labels and
  logits sharded, the gradient summed over devices); otherwise on the default device. What
  this returned passes through unchanged, so a caller fitting several times places once."""
  n = x.shape[0]
  if mesh is None or mesh.size == 1:
    weights = jnp.ones(n, jnp.float32) if weights is None else weights
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights, jnp.float32)
  if isinstance(x, jax.Array) and x.sharding == _rows(mesh) and weights is not None:
    return x, y, weights  # placed (and padded) by an earlier call
  weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
  pad = -n % mesh.size
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  if pad:
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)])
    y = np.concatenate([y, np.zeros(pad, np.int32)])
    weights = np.concatenate([weights, np.zeros(pad, np.float32)])
  return put_rows(x, mesh), put_rows(y, mesh), put_rows(weights, mesh)


def _lbfgs(x, y, l2, weights, *, num_classes: int, max_iters: int, tol: float):
  fun = functools.partial(objective, x=x, y=y, l2=l2, weights=weights)
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
  params, _, _, iters = jax.lax.while_loop(keep_going, step, carry)
  loss, grad = jax.value_and_grad(fun)(params)  # at the parameters returned
  return params, iters, loss, optax.tree_utils.tree_norm(grad)


_STATIC = ("num_classes", "max_iters")


@functools.lru_cache(maxsize=None)
def _lbfgs_jit(mesh=None):
  """`_lbfgs` compiled; on a mesh, its results replicated (every process reads them whole)."""
  if mesh is None:
    return jax.jit(_lbfgs, static_argnames=_STATIC)
  return jax.jit(_lbfgs, static_argnames=_STATIC,
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


def fit_lbfgs(x, y, l2, *, num_classes: int, max_iters: int = 1000, tol: float = 1e-5,
              weights=None, mesh=None) -> Fit:
  """Full-batch L-BFGS (zoom line search), until the gradient's L2 norm is below `tol` or
  `max_iters` iterations. `weights` (0/1 per example) fits on a subset without a new shape.
  With `mesh`, the examples are split over its devices (`on_devices`)."""
  mesh = mesh if mesh is not None and mesh.size > 1 else None
  x, y, weights = on_devices(x, y, weights, mesh)
  params, iters, loss, grad_norm = jax.device_get(_lbfgs_jit(mesh)(
      x, y, np.float32(l2), weights, num_classes=num_classes, max_iters=max_iters,
      tol=np.float32(tol)))
  # The loop tests the gradient before each update, so it can stop just after a step that
  # left the norm a hair above `tol` again: what counts is that the cap did not stop it.
  return Fit(params=params, iterations=int(iters), final_loss=float(loss),
             grad_norm=float(grad_norm), converged=bool(iters < max_iters or grad_norm <= tol))


def fit_sgd(x, y, l2, *, num_classes: int, epochs: int = 30, batch_size: int = 1024,
            learning_rate: float = 0.1, seed: int = 0, tol: float = 1e-3,
            transform=None, rows: int = CHUNK_ROWS, log=None, log_every_s: float = 30.0,
            mesh=None) -> Fit:
  """Minibatch SGD, momentum 0.9, cosine-decayed learning rate, for `epochs`; converged when
  the full-batch gradient norm at the end is below `tol` (looser than L-BFGS's: SGD's answer
  is noisier). With `transform` (e.g. a Standardizer), `x` may be a memory map of raw features:
  each minibatch is read and transformed on its own, so host memory holds one batch. With
  `log`, a progress line every `log_every_s` seconds (ImageNet-sized fits take minutes). With
  `mesh` (and `batch_size` a multiple of its size), each minibatch is split over its devices."""
  transform = transform or (lambda v: v)
  n = x.shape[0]
  y = np.asarray(y)
  steps_per_epoch = max(1, n // batch_size)
  tx = optax.sgd(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch),
                 momentum=0.9)
  params = init_params(x.shape[1], num_classes)
  opt_state = tx.init(params)
  mesh = mesh if mesh is not None and mesh.size > 1 and batch_size % mesh.size == 0 else None
  place, jit_kw = (lambda v: v), {}
  if mesh is not None:
    params, opt_state = replicate(jax.device_get((params, opt_state)), mesh)
    place = functools.partial(put_rows, mesh=mesh)
    jit_kw = dict(out_shardings=NamedSharding(mesh, PartitionSpec()))

  @functools.partial(jax.jit, **jit_kw)
  def step(params, opt_state, xb, yb):
    grads = jax.grad(objective)(params, xb, yb, l2)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  total, start = epochs * steps_per_epoch, time.time()
  last, in_flight = start, collections.deque()
  for e in range(epochs):
    order = rng.permutation(n)
    for s in range(steps_per_epoch):
      idx = np.sort(order[s * batch_size:(s + 1) * batch_size])  # sorted: sequential reads
      params, opt_state = step(params, opt_state, place(transform(x[idx])), place(y[idx]))
      in_flight.append(params)
      if len(in_flight) > SGD_STEPS_IN_FLIGHT:  # its batch is freed once it has run
        jax.block_until_ready(in_flight.popleft())
      if log is not None and time.time() - last > log_every_s:
        last, done = time.time(), e * steps_per_epoch + s + 1
        log(f"  probe l2={l2:g} (SGD): epoch {e + 1}/{epochs}, step {done}/{total} "
            f"({(last - start) / done * (total - done):.0f}s left)")
  params = jax.device_get(params)
  loss, grad_norm = full_objective(params, x, y, l2, transform, rows=rows)
  return Fit(params=params, iterations=epochs * steps_per_epoch,
             final_loss=loss, grad_norm=grad_norm, converged=grad_norm <= tol)


@jax.jit
def _ce_sum_and_grad(params, x, y):
  def ce_sum(p):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y))
  return jax.value_and_grad(ce_sum)(params)


def full_objective(params, x, y, l2, transform=None, rows: int = CHUNK_ROWS):
  """(objective, its gradient norm) over all of `x`, summed chunk by chunk."""
  transform = transform or (lambda v: v)
  total, grad = 0.0, jax.tree_util.tree_map(np.zeros_like, jax.device_get(params))
  for a, b in chunks(x.shape[0], rows):
    value, g = jax.device_get(_ce_sum_and_grad(params, transform(x[a:b]), np.asarray(y[a:b])))
    total += float(value)
    grad = jax.tree_util.tree_map(np.add, grad, g)
  n = x.shape[0]
  w = np.asarray(jax.device_get(params["w"]))
  grad = {"w": grad["w"] / n + l2 * w, "b": grad["b"] / n}
  loss = total / n + 0.5 * l2 * float(np.sum(np.square(w)))
  return loss, float(np.sqrt(sum(np.sum(np.square(g)) for g in grad.values())))


def predict(params, x) -> np.ndarray:
  return np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(x)), axis=-1))


def accuracy(params, x, y, transform=None, rows: int = CHUNK_ROWS) -> float:
  """Accuracy over `x` in row chunks (`x` may be a memory map; `transform` applied per chunk)."""
  transform = transform or (lambda v: v)
  y = np.asarray(y)
  if len(y) == 0:
    return float("nan")
  hits = sum(int(np.sum(predict(params, transform(x[a:b])) == y[a:b]))
             for a, b in chunks(x.shape[0], rows))
  return hits / len(y)


@dataclasses.dataclass
class ProbeResult:
  l2: float  # the strength chosen on validation
  val_acc: float
  test_acc: float
  val_acc_by_l2: dict  # {l2: validation accuracy}
  params: dict
  fit: Fit  # how the chosen probe's optimisation ended
  l2_at_edge: bool  # the chosen L2 is at an end of the (once widened) grid
  fits: dict  # {l2: Fit} of every strength swept
  solver: str = "lbfgs"  # the solver that ran ("sgd" when the features had to be streamed)
  streamed: bool = False  # minibatches read from (disk-backed) features, not held in memory

  @property
  def unconverged_l2(self) -> list:
    """The strengths whose fit hit the iteration cap."""
    return sorted(l2 for l2, f in self.fits.items() if not f.converged)

  def record(self) -> dict:
    """The JSON-able summary: accuracies, the L2 choice and the chosen fit's convergence."""
    return {"val_acc": self.val_acc, "test_acc": self.test_acc, "l2": self.l2,
            "l2_grid": sorted(self.val_acc_by_l2), "l2_at_edge": self.l2_at_edge,
            "unconverged_l2": self.unconverged_l2, "solver": self.solver,
            "streamed": self.streamed, **self.fit.record()}


def _fit_one(x, y, l2, *, num_classes, solver, max_iters, sgd_epochs, seed, weights=None,
             transform=None, rows=CHUNK_ROWS, log=None, mesh=None):
  if solver == "lbfgs":
    return fit_lbfgs(x, y, l2, num_classes=num_classes, max_iters=max_iters, weights=weights,
                     mesh=mesh)
  if solver == "sgd":
    if weights is not None:
      keep = np.asarray(weights) > 0
      x, y = np.asarray(x)[keep], np.asarray(y)[keep]
    return fit_sgd(x, y, l2, num_classes=num_classes, epochs=sgd_epochs, seed=seed,
                   transform=transform, rows=rows, log=log, mesh=mesh)
  raise ValueError(f"unknown probe solver {solver!r}; use 'lbfgs' or 'sgd'.")


def _check_labels(train, val, test, num_classes):
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


def widen(grid: Sequence[float], best: float) -> list[float]:
  """The strengths one and two decades past the end of `grid` that `best` sits at, to 6
  significant digits (1e-07, not 1.0000000000000001e-07, in the JSON and the logs)."""
  grid = sorted(grid)
  if best == grid[0] and best > 0:
    factors = (0.1, 0.01)
  elif best == grid[-1]:
    factors = (10.0, 100.0)
  else:
    return []
  return [float(f"{best * f:.6g}") for f in factors]


def fit_and_select(train: tuple, val: tuple, test: tuple, *, num_classes: int,
                   l2_grid: Sequence[float], solver: str = "lbfgs", max_iters: int = 1000,
                   sgd_epochs: int = 30, seed: int = 0, log=None,
                   max_host_bytes: float | None = None, mesh=None) -> ProbeResult:
  """Standardises on train, fits one probe per L2 strength, picks the best on val, tests it.

  Each of train/val/test is (features [n, d], labels [n]); features may be memory maps of any
  dtype (features on disk), read in row chunks. When the standardised training features (float32)
  would exceed `max_host_bytes`, they are never held at once: the probe is fit by minibatch SGD
  reading and standardising one batch at a time (`solver` 'sgd', `streamed`). When the best
  strength is at an end of the grid, the grid is widened once by two decades on that side; a
  choice still at the edge is reported (`l2_at_edge`). Fits that stop at the iteration cap are
  listed and, for the chosen one, warned about through `log`. With `mesh`, every fit splits
  its examples over the mesh's devices.
  """
  _check_labels(train, val, test, num_classes)
  # Rows read at a time: a chunk's float64 statistics stay well inside the budget.
  rows = CHUNK_ROWS if max_host_bytes is None else int(
      np.clip(max_host_bytes // (64 * train[0].shape[1]), 256, CHUNK_ROWS))
  scaler = Standardizer.fit(train[0], rows=rows)
  in_memory_bytes = IN_MEMORY_PEAK_FACTOR * 4 * np.prod(train[0].shape)
  streamed = bool(max_host_bytes is not None and in_memory_bytes > max_host_bytes)
  if streamed:
    solver, xtr, transform = "sgd", train[0], scaler
    if log is not None:
      log(f"  fitting in memory would peak at {in_memory_bytes / 2**30:.1f} GiB "
          f"({IN_MEMORY_PEAK_FACTOR:g} x the float32 training features), over the host budget "
          f"({max_host_bytes / 2**30:g} GiB, eval.max_host_gib): fitting by minibatch SGD over "
          "features read from disk")
  else:
    xtr, transform = scaler.apply(train[0]), None
  ytr, wtr = np.asarray(train[1], np.int32), None
  if not streamed:  # on the device(s) once, for every strength's fit
    if solver == "lbfgs":
      xtr, ytr, wtr = on_devices(xtr, ytr, None, mesh)
    elif mesh is None or mesh.size == 1:
      xtr = jnp.asarray(xtr)
  fits, by_l2 = {}, {}

  def sweep(grid):
    for l2 in grid:
      fit = _fit_one(xtr, ytr, float(l2), num_classes=num_classes, solver=solver,
                     max_iters=max_iters, sgd_epochs=sgd_epochs, seed=seed, transform=transform,
                     rows=rows, log=log, mesh=mesh, weights=wtr)
      fits[float(l2)] = fit
      by_l2[float(l2)] = accuracy(fit.params, val[0], val[1], transform=scaler, rows=rows)

  sweep(l2_grid)
  best = max(by_l2, key=lambda l2: (by_l2[l2], l2))  # ties: the stronger regularisation
  extra = widen(list(by_l2), best)
  if extra:
    sweep(extra)
    best = max(by_l2, key=lambda l2: (by_l2[l2], l2))
  fit = fits[best]
  at_edge = best in (min(by_l2), max(by_l2))
  if log is not None and not fit.converged:
    cap = ("its iteration cap", "config.eval.probe_max_iters") if solver == "lbfgs" else (
        "the end of its epochs with a large gradient", "config.eval.probe_sgd_epochs")
    log(f"  warning: the probe at l2={best:g} stopped at {cap[0]} ({fit.iterations} steps, "
        f"gradient norm {fit.grad_norm:.2g}): its accuracy may be understated; raise "
        f"{cap[1]}.")
  if log is not None and at_edge:
    log(f"  note: the chosen l2={best:g} is at the edge of the swept grid "
        f"{sorted(by_l2)} (widened once); the optimum may lie beyond it.")
  test_acc = accuracy(fit.params, test[0], test[1], transform=scaler, rows=rows)
  return ProbeResult(l2=best, val_acc=by_l2[best], test_acc=test_acc, val_acc_by_l2=by_l2,
                     params=jax.tree_util.tree_map(np.asarray, fit.params), fit=fit,
                     l2_at_edge=at_edge, fits=fits, solver=solver, streamed=streamed)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Fold index in [0, k) of every example, each class dealt round-robin over the folds."""
  rng = np.random.default_rng(seed)
  folds = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    folds[idx] = np.arange(len(idx)) % k
  return folds


def fit_low_data(train: tuple, test: tuple, *, num_classes: int, l2_grid: Sequence[float],
                 folds: int = 5, solver: str = "lbfgs", max_iters: int = 1000,
                 sgd_epochs: int = 30, seed: int = 0, mesh=None) -> dict:
  """A probe that sees only the labelled examples in `train`: L2 chosen by stratified k-fold
  cross-validation inside them (no other labels), then refit on all of them and tested.

  Standardisation statistics come from `train` alone too. Returns the test accuracy, the
  chosen L2, the cross-validated accuracy per L2 and the final fit's convergence. `mesh`: as
  for `fit_and_select`.
  """
  _check_labels(train, train, test, num_classes)
  scaler = Standardizer.fit(train[0])
  x = scaler.apply(train[0])  # placed on the device(s) by each fit
  y = np.asarray(train[1], np.int32)
  k = int(min(folds, np.bincount(y, minlength=num_classes)[np.unique(y)].min()))
  if k < 2:
    raise ProbeError("a low-data probe needs at least 2 labelled examples per class to choose "
                     "its L2 by cross-validation; raise config.eval.low_data_per_class.")
  fold_of = stratified_folds(y, k, seed)
  kw = dict(num_classes=num_classes, solver=solver, max_iters=max_iters, sgd_epochs=sgd_epochs,
            seed=seed, mesh=mesh)
  cv = {}
  for l2 in l2_grid:
    accs = []
    for f in range(k):  # one shape for every fold: the held-out fold has weight 0
      fit = _fit_one(x, y, float(l2), weights=(fold_of != f).astype(np.float32), **kw)
      held = fold_of == f
      accs.append(accuracy(fit.params, x[held], y[held]))
    cv[float(l2)] = float(np.mean(accs))
  best = max(cv, key=lambda l2: (cv[l2], l2))
  fit = _fit_one(x, y, best, **kw)
  return {"test_acc": accuracy(fit.params, test[0], test[1], transform=scaler), "l2": best,
          "cv_folds": k,
          "cv_acc_by_l2": cv, **fit.record()}


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
