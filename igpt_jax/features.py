"""Frozen features for linear probes: per-layer, normalised, average-pooled; cached on disk.

The feature of layer l is `mean over positions of norm(h_l)`, the normalised input to the next
block (the paper's probe features): layer 0 is the embedding, layer l in 1..L-1 the residual stream
after block l normalised by block l+1's `ln_1`, layer L the final stream through `ln_f`. One
forward pass gives every requested layer (`IGPT(..., output="features")`).
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np

from igpt_jax import input_pipeline
from igpt_jax import sharding


def parse_layers(spec: str, num_layers: int) -> list[int]:
  """'auto' | 'all' | '0,12,24' -> sorted layer indices in [0, num_layers].

  'auto' is every layer for models of up to 12 layers, otherwise 8 layers spread over the depth
  with the middle one included (where the paper finds the best features).
  """
  spec = str(spec).strip().lower()
  if spec == "all":
    return list(range(num_layers + 1))
  if spec in ("", "auto"):
    if num_layers <= 12:
      return list(range(1, num_layers + 1))
    spread = np.rint(np.linspace(1, num_layers, 8)).astype(int).tolist()
    return sorted(set(spread) | {num_layers // 2})
  try:
    layers = sorted({int(s) for s in spec.split(",") if s.strip()})
  except ValueError:
    layers = []
  if not layers or layers[0] < 0 or layers[-1] > num_layers:
    raise ValueError(f"config.eval.layers={spec!r} must be 'auto', 'all' or comma-separated "
                     f"layer indices in [0, {num_layers}] (0 = embeddings, {num_layers} = final "
                     "normalised output).")
  return layers


def make_extract_fn(model, layers: list[int]):
  """(params, tokens [b, l]) -> float32 features [b, len(layers), width]."""
  idx = np.asarray(layers)

  def extract(params, tokens):
    feats = model.apply({"params": params}, tokens, output="features")
    return feats[:, idx]

  return extract


class Extractor:
  """Runs the frozen model over whole splits, sharded over every device, with progress."""

  def __init__(self, run, layers: list[int], batch_size: int):
    self.run = run
    self.layers = layers
    self.local_batch = batch_size // jax.process_count()
    extract = make_extract_fn(run.model, layers)

    def step(params, batch):
      return extract(params, batch["tokens"]), batch["label"], batch["mask"]

    self._step = jax.jit(step, in_shardings=(run.param_shardings,
                                             sharding.batch_sharding(run.mesh)),
                         out_shardings=sharding.replicated(run.mesh))

  def split(self, params, split: str, *, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [n, len(layers), width], labels int32 [n]) of every image of `split`."""
    total = input_pipeline.num_eval_batches(self.run.source, split, self.local_batch,
                                            jax.process_count())
    feats, labels = [], []
    start = last = time.time()
    for i, batch in enumerate(self.run.eval_batches(split, local_batch=self.local_batch)):
      f, y, m = self._step(params, batch)
      m = np.asarray(m)
      feats.append(np.asarray(f)[m])
      labels.append(np.asarray(y)[m])
      now = time.time()
      if now - last > 10 or i + 1 == total:
        last = now
        rate = (i + 1) / (now - start)
        log(f"  features {split}: batch {i + 1}/{total} "
            f"({(total - i - 1) / max(rate, 1e-9):.0f}s left)")
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def cache_path(workdir: str, dataset: str, split: str, step: int, layers: list[int],
               image_size: int, holdout_fraction: float) -> str:
  """Where one split's features live; the name changes whenever what they mean changes."""
  key = f"{dataset}|{split}|{image_size}|{holdout_fraction}|{','.join(map(str, layers))}"
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  name = os.path.basename(os.path.normpath(dataset)) or "dataset"
  return os.path.join(workdir, "eval", "features", f"{name}_{split}_step{step}_{digest}.npz")


def cached(path: str, compute, *, log=print) -> tuple[np.ndarray, np.ndarray]:
  """Loads (features, labels) from `path`, or computes and writes them (process 0)."""
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        log(f"  features from cache {path}")
        return f["features"], f["labels"]
    except (OSError, ValueError, KeyError) as e:  # a truncated or foreign file: recompute
      log(f"  ignoring unreadable feature cache {path} ({e}); recomputing")
  feats, labels = compute()
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, labels=labels)
    os.replace(tmp, path)  # never leave a half-written cache under the real name
  return feats, labels


def raw_pixels(config, source, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The raw-pixel baseline's features: the resized RGB image, flattened, in [0, 1]."""
  ds = input_pipeline.eval_images(config, source, split, sharded=False).batch(1024)
  xs, ys = [], []
  for ex in input_pipeline.iterate(ds, config):
    xs.append(ex["image"].reshape(len(ex["image"]), -1).astype(np.float32) / 255.0)
    ys.append(ex["label"])
  return np.concatenate(xs), np.concatenate(ys).astype(np.int32)

