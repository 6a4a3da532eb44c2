"""Frozen features for linear probes: per-layer, normalised, average-pooled; streamed to disk.

The feature of layer l is `mean over positions of norm(h_l)`, the normalised input to the next
block (the paper's probe features): layer 0 is the embedding, layer l in 1..L-1 the residual stream
after block l normalised by block l+1's `ln_1`, layer L the final stream through `ln_f`. One
forward pass gives every requested layer (`IGPT(..., output="features")`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np

from igpt_jax import atomic
from igpt_jax import heldout
from igpt_jax import input_pipeline
from igpt_jax import sharding


def make_extract_fn(model, layers: list[int]):
  """(params, tokens [b, l]) -> float32 features [b, len(layers), width].

  Only the blocks the deepest requested layer needs are run: the feature of layer l < L is
  block l+1's normalised input, so a probe of layer 20 of 48 runs 21 blocks, not 48."""
  idx = np.asarray(layers)
  depth = max(layers) + 1
  truncated = depth < model.cfg.num_layers
  if truncated:
    model = model.clone(cfg=dataclasses.replace(model.cfg, num_layers=depth))

  def extract(params, tokens):
    if truncated:  # the first `depth` blocks' parameters (the leading axis is the layer)
      params = dict(params, blocks=jax.tree_util.tree_map(lambda w: w[:depth],
                                                          params["blocks"]))
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

  def num_batches(self, split: str) -> int:
    return input_pipeline.num_eval_batches(self.run.source, split, self.local_batch,
                                           jax.process_count())

  def batches(self, params, split: str, *, start_batch: int = 0, log=print):
    """(features float32 [m, len(layers), width], labels int32 [m]) of each batch of `split`
    from `start_batch` on (padding removed), with a progress line every ~10 s."""
    total = self.num_batches(split)
    start = last = time.time()
    for i, batch in enumerate(heldout.batches(self.run, split, local_batch=self.local_batch,
                                              start_batch=start_batch), start_batch):
      f, y, m = jax.device_get(self._step(params, batch))
      yield f[m].astype(np.float32), y[m].astype(np.int32)
      now = time.time()
      if now - last > 10 or i + 1 == total:
        last = now
        rate = (i + 1 - start_batch) / (now - start)
        log(f"  features {split}: batch {i + 1}/{total} "
            f"({(total - i - 1) / max(rate, 1e-9):.0f}s left)")

  def to_disk(self, params, split: str, directory: str, *, dtype: str = "float16",
              log=print) -> "FeatureSet":
    """Writes `split`'s features into `directory` (`process_dir` of it: every process of a
    multi-process job keeps its own copy of the replicated features, so its probe reads them
    locally) batch by batch, resumably (see FeatureSet); host memory holds one batch at a time
    whatever the split's size."""
    n = self.run.source.split_sizes[split]
    shape = (n, len(self.layers), self.run.model.cfg.width)
    own = process_dir(directory)
    writer = _Writer(own, shape, dtype)
    if jax.process_count() > 1:  # all restart at the position every process has reached
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      reached = multihost_utils.process_allgather(
          np.asarray([writer.done["batches"], writer.done["rows"]]))
      writer.done = dict(zip(("batches", "rows"), (int(v) for v in np.min(reached, axis=0))))
    done = writer.done
    if done["rows"] < n:
      if done["batches"]:
        log(f"  features {split}: resuming at batch {done['batches']} ({done['rows']:,} of "
            f"{n:,} images already in {own})")
      for f, y in self.batches(params, split, start_batch=done["batches"], log=log):
        writer.append(f, y)
    writer.close()
    return FeatureSet.open(directory)


FLUSH_BATCHES, FLUSH_S = 64, 5.0  # the position is recorded at least this often


class _Writer:
  """Appends rows to features.npy / labels.npy (preallocated, memory-mapped) and records the
  position in progress.json after each flush, so a killed extraction continues there."""

  def __init__(self, directory: str, shape: tuple, dtype: str):
    self.directory, self.shape = directory, tuple(shape)
    os.makedirs(directory, exist_ok=True)
    progress = _read_json(os.path.join(directory, "progress.json"))
    fresh = progress is None or tuple(progress.get("shape", ())) != self.shape or progress.get(
        "dtype") != dtype
    mode = "w+" if fresh else "r+"
    self.features = np.lib.format.open_memmap(os.path.join(directory, "features.npy"), mode,
                                              dtype=np.dtype(dtype), shape=self.shape)
    self.labels = np.lib.format.open_memmap(os.path.join(directory, "labels.npy"), mode,
                                            dtype=np.int32, shape=self.shape[:1])
    self.dtype = dtype
    self.done = {"batches": 0, "rows": 0} if fresh else {k: progress[k] for k in
                                                          ("batches", "rows")}
    self._last_flush, self._unflushed = time.time(), 0
    if fresh:
      self._record()

  def append(self, feats: np.ndarray, labels: np.ndarray) -> None:
    r, m = self.done["rows"], len(labels)
    self.features[r:r + m] = feats.astype(self.features.dtype)
    self.labels[r:r + m] = labels
    self.done = {"batches": self.done["batches"] + 1, "rows": r + m}
    self._unflushed += 1
    if self._unflushed >= FLUSH_BATCHES or time.time() - self._last_flush > FLUSH_S:
      self._record()

  def _record(self) -> None:
    self.features.flush()
    self.labels.flush()
    atomic.write_json(os.path.join(self.directory, "progress.json"),
                      {**self.done, "shape": list(self.shape), "dtype": self.dtype,
                       "complete": self.done["rows"] == self.shape[0]})
    self._last_flush, self._unflushed = time.time(), 0

  def close(self) -> None:
    self._record()
    del self.features, self.labels


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def process_dir(directory: str) -> str:
  """This process's copy of a feature directory: the directory itself on process 0 (and in
  single-process runs), `<directory>.process<p>` on the others."""
  p = jax.process_index()
  return directory if p == 0 else f"{directory}.process{p}"


@dataclasses.dataclass
class FeatureSet:
  """One split's features on disk: `features` [n, layers, width] and `labels` [n], both
  memory-mapped (read on demand, in the pages touched)."""
  features: np.ndarray
  labels: np.ndarray

  @classmethod
  def open(cls, directory: str) -> "FeatureSet":
    """This process's complete copy (`process_dir`) of the features in `directory`."""
    directory = process_dir(directory)
    progress = _read_json(os.path.join(directory, "progress.json"))
    if not progress or not progress.get("complete"):
      raise FileNotFoundError(f"{directory} holds no complete feature extraction")
    return cls(np.load(os.path.join(directory, "features.npy"), mmap_mode="r"),
               np.load(os.path.join(directory, "labels.npy"), mmap_mode="r"))

  def layer(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(features of the j-th extracted layer [n, width] (a view, not read yet), labels)."""
    return self.features[:, j], np.asarray(self.labels)

  def concat(self, js: list[int]) -> tuple["Concatenated", np.ndarray]:
    """(the extracted layers `js` side by side [n, len(js) * width] (read on demand), labels)."""
    return Concatenated(self.features, js), np.asarray(self.labels)


class Concatenated:
  """Several layers of features [n, layers, width] side by side, [n, len(js) * width], read
  in the rows asked for (a slice or an index array), as the probe reads a memory map: the
  concatenation is never built whole."""

  def __init__(self, features: np.ndarray, js: list[int]):
    self._features, self._js = features, np.asarray(js)
    self.shape = (features.shape[0], len(js) * features.shape[2])
    self.dtype = features.dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows) -> np.ndarray:
    x = np.asarray(self._features[rows])  # a row's layers are contiguous: read them together
    return x[:, self._js].reshape(len(x), self.shape[1])


def cache_dir(eval_dir: str, dataset: str, split: str, step: int, layers: list[int],
              image_size: int, holdout_fraction: float) -> str:
  """Where one split's features live under `eval_dir` (WORKDIR/eval); the name changes
  whenever what they mean changes."""
  key = f"{dataset}|{split}|{image_size}|{holdout_fraction}|{','.join(map(str, layers))}"
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  name = os.path.basename(os.path.normpath(dataset)) or "dataset"
  return os.path.join(eval_dir, "features", f"{name}_{split}_step{step}_{digest}")


def raw_pixels(config, source, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The raw-pixel baseline's features: the resized RGB image, flattened, as uint8 (a quarter of
  float32's bytes: 3.9 GB for ImageNet at 32x32; the probe standardises it chunk by chunk)."""
  ds = input_pipeline.eval_images(config, source, split, sharded=False).batch(1024)
  xs, ys = [], []
  for ex in input_pipeline.iterate(ds, config):
    xs.append(ex["image"].reshape(len(ex["image"]), -1).astype(np.uint8))
    ys.append(ex["label"])
  return np.concatenate(xs), np.concatenate(ys).astype(np.int32)

