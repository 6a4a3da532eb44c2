"""Scalar metrics to `workdir/metrics.jsonl` and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from igpt_jax import atomic


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._jsonl = open(self._path, "a")
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def forget_after(self, step: int) -> None:
    """Drops the rows of steps after `step` (logged before a crash, or after the checkpoint a
    resume fell back to): the resumed run logs them again, so each step keeps one row."""
    if not self._enabled:
      return
    self._jsonl.close()
    with open(self._path) as f:
      rows = [line for line in f if line.strip() and _step_of(line) <= step]
    atomic.write_text(self._path, "".join(rows))
    self._jsonl = open(self._path, "a")

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


def rows(workdir: str) -> list[dict]:
  """Every row of workdir/metrics.jsonl, in the order written."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read(workdir: str) -> dict:
  """{step: row} of workdir/metrics.jsonl; a step logged twice (before a crash and after the
  resume) keeps the last."""
  return {row["step"]: row for row in rows(workdir)}


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a line cut by a crash: drop it
    return 1 << 62
