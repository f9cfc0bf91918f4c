"""Step time, tokens/s, images/s, achieved TFLOP/s per device and MFU over a logging window."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from evejax import batch as batch_format
from evejax.metrics import flops


def batch_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(non-padding tokens, images) of a host batch; every image starts with one CLASS token."""
  return (
    int(np.count_nonzero(batch['segment_ids'])),
    int(np.count_nonzero(batch['token_kind'] == batch_format.CLASS)),
  )


class Throughput:
  """Accumulates timed steps; `scalars()` reports the window's averages and starts a new one."""

  def __init__(self, flops_per_step: float, num_devices: int, peak_flops: float | None):
    self.flops_per_step, self.num_devices, self.peak_flops = flops_per_step, num_devices, peak_flops
    self._reset()

  def _reset(self) -> None:
    self._steps, self._seconds, self._tokens, self._images = 0, 0.0, 0, 0

  def add(self, seconds: float, tokens: int, images: int) -> None:
    self._steps += 1
    self._seconds += seconds
    self._tokens += tokens
    self._images += images

  def scalars(self) -> dict[str, float]:
    if not self._steps:
      return {}
    steps_per_s = self._steps / self._seconds
    out = {
      'step_time_s': self._seconds / self._steps,
      'tokens_per_s': self._tokens / self._seconds,
      'images_per_s': self._images / self._seconds,
      'tflops_per_device': self.flops_per_step * steps_per_s / self.num_devices / 1e12,
    }
    if self.peak_flops:
      out['mfu'] = flops.mfu(self.flops_per_step, steps_per_s, self.num_devices, self.peak_flops)
    self._reset()
    return out
