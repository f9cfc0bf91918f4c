"""Scalars to TensorBoard event files (tensorboardX: no TensorFlow needed) and to a JSONL file.

Both take a local workdir or a URL (`gs://`): every event file goes through `evejax.storage`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from tensorboardX import SummaryWriter, record_writer

from evejax import storage

for _scheme in ('gs', 's3'):
  record_writer.register_writer_factory(_scheme, storage.EventFiles())


class ScalarSink(Protocol):
  """Another destination of the scalars (e.g. metrics/wandb_writer.py's WandbWriter)."""

  def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

  def close(self) -> None: ...


class MetricWriter:
  """Writes each `write(step, scalars)` to `{workdir}/tensorboard` and `{workdir}/metrics.jsonl`,
  and to every sink in `also`."""

  def __init__(self, workdir: str, enabled: bool = True, also: Sequence[ScalarSink] = ()):
    self.enabled = enabled  # Only one process of a multi-host job writes.
    self._also = tuple(also)
    if enabled:
      storage.makedirs(workdir)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = storage.Appender(os.path.join(workdir, 'metrics.jsonl'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for sink in self._also:
      sink.write(step, scalars)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      for sink in self._also:
        sink.close()


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
