"""A profiler window: trace `num_steps` steps from `first_step` into `{workdir}/profile`."""

from __future__ import annotations

import os

import jax
from absl import logging


class ProfileWindow:
  """Call `step_begins(step)` before each step's dispatch; `num_steps=0` disables tracing."""

  def __init__(self, workdir: str, first_step: int, num_steps: int, enabled: bool = True):
    self.log_dir = os.path.join(workdir, 'profile')
    self.first_step, self.last_step = first_step, first_step + num_steps - 1
    self.enabled = enabled and num_steps > 0
    self._active = False

  def step_begins(self, step: int, pending=None) -> None:
    """`pending`: arrays of the previous step, waited for so the trace holds whole steps."""
    if not self.enabled:
      return
    if step == self.first_step:
      jax.block_until_ready(pending)
      jax.profiler.start_trace(self.log_dir)
      self._active = True
    elif step == self.last_step + 1 and self._active:
      self.stop(pending)

  def stop(self, pending=None) -> None:
    if self._active:
      jax.block_until_ready(pending)
      jax.profiler.stop_trace()
      self._active = False
      logging.info(
        'Profile of steps %d-%d written to %s', self.first_step, self.last_step, self.log_dir
      )
