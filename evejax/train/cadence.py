"""When periodic work is due in the training loop (big_vision's `itstime`)."""

from __future__ import annotations


def itstime(
  step: int, every: int, total_steps: int, *, first: bool = False, last: bool = True
) -> bool:
  """Whether `step` (1-based) is a multiple of `every` (0 = never), the last step (`last`) or the
  first one (`first`)."""
  return (
    (last and step == total_steps) or (first and step == 1) or (every > 0 and step % every == 0)
  )
