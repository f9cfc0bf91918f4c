"""Packing: several encoded examples per fixed-length row (segment ids and positions restart per
example, see `encode.pack_row`), as a Grain IterDataset with an exact, small, resumable state.

The policy is first-fit-decreasing over a window of examples: read `window` examples, sort them by
length, put each into the first row with room for both its tokens and its patch groups, emit the
rows. The state is (parent state at the window's start, rows already emitted), so a restore re-reads
the window and skips what was emitted: the next row is identical to an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from evejax.batch import BatchSpec
from evejax.data import encode

Example = dict[str, np.ndarray]


def num_patches(example: Example) -> int:
  return 0 if example['patches'] is None else len(example['patches'])


def fits(example: Example, spec: BatchSpec) -> bool:
  return len(example['tokens']) <= spec.seq_len and num_patches(example) <= spec.patch_slots


def first_fit_decreasing(examples: list[Example], spec: BatchSpec) -> list[list[Example]]:
  """Groups examples into rows; each example must fit an empty row. Deterministic."""
  order = sorted(range(len(examples)), key=lambda i: -len(examples[i]['tokens']))  # Stable.
  rows: list[list[Example]] = []
  room: list[list[int]] = []  # Per row: free positions, free patch slots.
  for i in order:
    ex = examples[i]
    need = (len(ex['tokens']), num_patches(ex))
    for row, free in zip(rows, room):
      if need[0] <= free[0] and need[1] <= free[1]:
        row.append(ex)
        free[0] -= need[0]
        free[1] -= need[1]
        break
    else:
      rows.append([ex])
      room.append([spec.seq_len - need[0], spec.patch_slots - need[1]])
  return rows


class _PackIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: BatchSpec, window: int):
    super().__init__(parent)
    self._spec, self._window = spec, window
    self._window_start = parent.get_state()
    self._rows: list[list[Example]] = []
    self._emitted = 0

  def _read_window(self) -> None:
    self._window_start = self._parent.get_state()
    examples = []
    for _ in range(self._window):
      try:
        examples.append(next(self._parent))
      except StopIteration:
        break
    self._rows = first_fit_decreasing(examples, self._spec)
    self._emitted = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._emitted == len(self._rows):
      self._read_window()
      if not self._rows:
        raise StopIteration
    row = self._rows[self._emitted]
    self._emitted += 1
    return encode.pack_row(row, self._spec)

  def get_state(self) -> dict[str, Any]:
    return {'window_start': self._window_start, 'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['window_start'])
    self._rows, self._emitted = [], 0
    if state['emitted']:
      self._read_window()
      self._emitted = state['emitted']


class PackIterDataset(grain.IterDataset):
  """Encoded examples (unpadded, as from `encode.encode_example`) -> packed rows of `spec`.

  `window=1` is one example per row (no packing).
  """

  def __init__(self, parent: grain.IterDataset, spec: BatchSpec, window: int):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f'data.pack_window must be >= 1 (1 = no packing), got {window}')
    self._spec, self._window = spec, window

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._spec, self._window)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Fills a short final batch with empty rows (segment 0, no loss weight) to the static shape."""
  rows = len(batch['tokens'])
  if rows == batch_size:
    return batch
  return {
    k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
    for k, v in batch.items()
  }


class _FillIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, empty: dict[str, np.ndarray], count: int):
    super().__init__(parent)
    self._empty, self._count, self._emitted = empty, count, 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._emitted == self._count:
      raise StopIteration
    self._emitted += 1
    try:
      return next(self._parent)
    except StopIteration:
      return self._empty

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._emitted = state['emitted']


class FillToCount(grain.IterDataset):
  """Exactly `count` batches: the parent's (there must be at most `count`), then empty ones.

  Multi-host evaluation needs it: every process must run the same number of steps, and how many
  packed rows a process's share needs depends on its examples.
  """

  def __init__(self, parent: grain.IterDataset, spec: BatchSpec, batch_size: int, count: int):
    super().__init__(parent)
    self._empty, self._count = spec.zeros(batch_size), count

  def __iter__(self) -> _FillIterator:
    return _FillIterator(self._parent.__iter__(), self._empty, self._count)
