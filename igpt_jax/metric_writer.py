"""Scalar metrics to `workdir/metrics.jsonl` and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np

from igpt_jax import atomic


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._jsonl = open(self._path, "a")
      self._tb = _event_file(os.path.join(workdir, "tensorboard"))

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
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in row.items()
              if k != "step"]
    self._tb.write(event_pb2.Event(wall_time=time.time(), step=row["step"],
                                   summary=summary_pb2.Summary(value=values)).SerializeToString())
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def _event_file(directory: str):
  """A new TensorBoard event file in `directory`, written with TensorBoard's record writer over
  a plain file: its EventFileWriter would import TensorFlow (4 s) at every training start."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer import record_writer
  os.makedirs(directory, exist_ok=True)
  name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.igpt_jax"
  writer = record_writer.RecordWriter(open(os.path.join(directory, name), "ab"))  # pylint: disable=consider-using-with
  writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
               .SerializeToString())
  return writer


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
