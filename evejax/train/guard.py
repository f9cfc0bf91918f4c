"""Stops (or skips) training steps whose loss or gradients are not finite."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from absl import logging

if TYPE_CHECKING:
  from evejax.config import GuardConfig


class NonFiniteError(RuntimeError):
  pass


class NonFiniteGuard:
  """`stop`: raise naming the step and the newest checkpoint (`last_checkpoint()` says whether it
  is verified good). `skip`: the jitted step already left the weights unchanged; count it, and
  stop once more than `max_skipped` steps were skipped."""

  def __init__(self, cfg: GuardConfig):
    self.mode, self.max_skipped, self.skipped = cfg.nonfinite, cfg.max_skipped, 0

  def check(
    self, step: int, loss_sum: float, grad_norm: float, last_checkpoint: Callable[[], str]
  ) -> bool:
    """True when the step was finite; False when it was skipped; raises when training must stop."""
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
      return True
    what = (
      f'non-finite {"loss" if not math.isfinite(loss_sum) else "gradients"} at step {step} '
      f'(loss sum {loss_sum}, gradient norm {grad_norm})'
    )
    if self.mode == 'skip' and self.skipped < self.max_skipped:
      self.skipped += 1
      logging.warning(
        'Skipped the update of step %d: %s (%d of at most %d skipped)',
        step,
        what,
        self.skipped,
        self.max_skipped,
      )
      return False
    reason = '' if self.mode == 'stop' else f' after skipping {self.skipped} steps'
    raise NonFiniteError(
      f'Training stopped{reason}: {what}. {last_checkpoint()}. Lower '
      "optim.lr or check the data; guard.nonfinite='skip' skips such steps instead."
    )


class GuardedWindow:
  """Train metrics of the steps since the last report, each step checked by a `NonFiniteGuard`.

  A step is checked once the next one has been dispatched (or at `settle()`), so the host does not
  wait for the step it just launched: the device stays busy while the host fetches the next batch.
  """

  def __init__(self, guard: NonFiniteGuard, last_checkpoint: Callable[[], str]):
    self.guard, self._last_checkpoint = guard, last_checkpoint
    self._pending = self._accumulated = None

  def add(self, step: int, step_metrics) -> None:
    """`step_metrics`: the train step's (loss metrics, StepMetrics); checks the previous step."""
    self.settle()
    self._pending = (step, step_metrics)

  def settle(self) -> None:
    """Waits for the pending step; stops or skips it per the guard, else adds it to the window."""
    if self._pending is None:
      return
    (step, (loss_metrics, update_metrics)), self._pending = self._pending, None
    if self.guard.check(
      step,
      float(loss_metrics[0].loss.total),
      float(update_metrics.grad_norm.compute()),
      self._last_checkpoint,
    ):
      collections = (*loss_metrics, update_metrics)
      self._accumulated = (
        collections
        if self._accumulated is None
        else tuple(a.merge(b) for a, b in zip(self._accumulated, collections))
      )

  def compute(self) -> dict[str, float]:
    """The window's averages (none when all its steps were skipped); then starts a new window."""
    self.settle()
    collections, self._accumulated = self._accumulated or (), None
    return {k: float(v) for m in collections for k, v in m.compute().items()}
