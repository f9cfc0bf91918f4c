"""Preemption: a SIGTERM (or, multi-host, JAX's preemption sync point) asks for a save and exit at
the next step boundary."""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Single process: a SIGTERM handler sets a flag. Multi-process: JAX's preemption sync point,
  where all processes agree on the same step (JAX's coordination service handles the signal)."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the end of this step, then exiting')
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
