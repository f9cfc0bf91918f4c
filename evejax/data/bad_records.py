"""The bad-record policy: skip, count, quarantine (shard + index + reason), fail past a threshold.

A record is bad when it cannot be read, its image cannot be decoded or its conversation does not
tokenise (e.g. a placeholder count that does not match its images).
The preprocessing map returns a `BadRecord` instead of raising; `FilterBadRecords` drops them,
counts them per kind in its (checkpointed) state, appends one JSON line per record to the
quarantine file, and raises `TooManyBadRecords` when the bad fraction passes the threshold.

A sample that is too long is not bad data (the reference cuts it and trains on it): examples
marked `truncated` by the preprocessor pass on and are counted in `truncated`; one that could not
be cut to a row without splitting an image (kind 'too_long') is skipped, quarantined and counted
in `truncated` and `too_long_skipped`. Neither counts towards the threshold.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
from absl import logging

from evejax import storage

KINDS = ('unreadable_record', 'bad_image', 'bad_conversation', 'bad_teacher_features')
TOO_LONG = 'too_long'  # The kind of a skipped too-long sample: counted as truncated, not bad.
TRUNCATION_LOG_SECONDS = 60  # Truncated samples are logged at most this often (they can be many).


class TooManyBadRecords(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """What the preprocessing map returns for a record it cannot use."""

  shard: str
  index: int
  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Policy:
  """Fail once more than `max_fraction` of the records read are bad, checked from `min_records`
  records on (and at the end of a finite pass); `quarantine` is a JSON-lines file, '' for none."""

  max_fraction: float = 0.01
  min_records: int = 1000
  quarantine: str = ''


def read_quarantine(path: str) -> list[dict[str, Any]]:
  """The quarantined records, each once (a restored run re-reads records after its checkpoint)."""
  if not storage.exists(path):
    return []
  entries = {}
  with storage.open(path) as f:
    for line in f:
      entry = json.loads(line)
      entries.setdefault((entry['shard'], entry['index'], entry['kind']), entry)
  return list(entries.values())


class _FilterIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, policy: Policy):
    super().__init__(parent)
    self._policy = policy
    self.seen, self.bad = 0, 0
    self.by_kind = dict.fromkeys(KINDS, 0)
    self.truncated, self.too_long_skipped = 0, 0

  def _quarantine(self, record: BadRecord) -> None:
    logging.warning(
      'Skipping %s record %s[%d] (%s): %s',
      'too long' if record.kind == TOO_LONG else 'bad',
      record.shard,
      record.index,
      record.kind,
      record.reason,
    )
    if record.kind == TOO_LONG:
      self.truncated += 1
      self.too_long_skipped += 1
    else:
      self.bad += 1
      self.by_kind[record.kind] += 1
    if self._policy.quarantine:
      # One short line per O_APPEND write: safe with several worker processes on one local file
      # (on object storage the object is rewritten: one writer per file, num_workers=0).
      with storage.Appender(self._policy.quarantine) as f:
        f.write(json.dumps(dataclasses.asdict(record)) + '\n')

  def _count_truncated(self, reason: str) -> None:
    self.truncated += 1
    logging.log_every_n_seconds(
      logging.WARNING,
      'Truncated a too-long sample (%s); %d of %d samples so far (not bad records)',
      TRUNCATION_LOG_SECONDS,
      reason,
      self.truncated,
      self.seen,
    )

  def _summary(self) -> str:
    return ', '.join(f'{k}: {v}' for k, v in self.by_kind.items() if v)

  def _check(self, final: bool) -> None:
    if final and self.truncated:
      logging.warning(
        'Truncated %d of %d samples (%d of them skipped: no cut fits a row)',
        self.truncated,
        self.seen,
        self.too_long_skipped,
      )
    if final and self.bad:
      logging.warning('Skipped %d of %d records (%s)', self.bad, self.seen, self._summary())
    if not self.bad or (self.seen < self._policy.min_records and not final):
      return
    fraction = self.bad / self.seen
    if fraction > self._policy.max_fraction:
      where = f'; see {self._policy.quarantine}' if self._policy.quarantine else ''
      raise TooManyBadRecords(
        f'{self.bad} of {self.seen} records ({fraction:.1%}) were bad, over '
        f'data.bad_records.max_fraction={self._policy.max_fraction} '
        f'({self._summary()}){where}. Fix or '
        're-convert the data, or raise the threshold.'
      )

  def __next__(self):
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        self._check(final=True)
        raise
      self.seen += 1
      if not isinstance(element, BadRecord):
        if 'truncated' in element:
          self._count_truncated(element.pop('truncated'))
        self._check(final=False)
        return element
      self._quarantine(element)
      self._check(final=False)

  def get_state(self) -> dict[str, Any]:
    return {
      'parent': self._parent.get_state(),
      'seen': self.seen,
      'bad': self.bad,
      'by_kind': dict(self.by_kind),
      'truncated': self.truncated,
      'too_long_skipped': self.too_long_skipped,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self.seen, self.bad = state['seen'], state['bad']
    # Checkpoints from before the truncation counters counted too-long samples as bad records.
    self.by_kind = {kind: state['by_kind'].get(kind, 0) for kind in KINDS}
    self.truncated = state.get('truncated', 0)
    self.too_long_skipped = state.get('too_long_skipped', 0)


class FilterBadRecords(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, policy: Policy):
    super().__init__(parent)
    self._policy = policy

  def __iter__(self) -> _FilterIterator:
    return _FilterIterator(self._parent.__iter__(), self._policy)
