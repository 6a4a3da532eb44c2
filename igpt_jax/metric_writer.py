"""Scalar metrics to `workdir/metrics.jsonl` and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in row.items():
        if k != "step":
          tf.summary.scalar(k, v)
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
