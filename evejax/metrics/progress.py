"""A readable progress line: step, chosen scalars, steps/s and ETA."""

from __future__ import annotations

import time
from collections.abc import Mapping


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


class Progress:
  """Measures steady-state speed from the first timed step (after compilation) onward."""

  def __init__(self, total_steps: int, unit: str = 'step'):
    self.total_steps = total_steps
    self.unit = unit  # What is counted: 'step' for training, 'item' for an evaluation.
    self._start_step = self._start_time = None

  def start(self, step: int) -> None:
    self._start_step, self._start_time = step, time.perf_counter()

  def steps_per_second(self, step: int) -> float:
    if self._start_time is None or step <= self._start_step:
      return 0.0
    return (step - self._start_step) / (time.perf_counter() - self._start_time)

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    rate = self.steps_per_second(step)
    eta = format_duration((self.total_steps - step) / rate) if rate else '?'
    parts = [f'{self.unit} {step}/{self.total_steps}']
    if scalars:
      parts.append(' '.join(f'{k} {v:.4g}' for k, v in scalars.items()))
    return ' | '.join(parts + [f'{rate:.2f} {self.unit}s/s', f'ETA {eta}'])
