"""What the converters share: output flags, file-backed records, caption conversations."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from evejax.batch import IMAGE_PLACEHOLDER
from evejax.data import records, templates
from evejax.data.bad_records import TooManyBadRecords

OUT_DIR = flags.DEFINE_string('out_dir', None, 'Output directory of the ArrayRecord shards.')
SPLIT = flags.DEFINE_string('split', 'train', 'Split name: shards are {split}-KKKKK-of-NNNNN.')
NUM_SHARDS = flags.DEFINE_integer('num_shards', 0, 'Number of shards; 0: from --records_per_shard.')
RECORDS_PER_SHARD = flags.DEFINE_integer('records_per_shard', 10_000, 'Records per shard.')
WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Conversion processes.')
IMAGE_DIR = flags.DEFINE_string('image_dir', '', 'Folder relative image paths are resolved in.')
MAX_BAD_FRACTION = flags.DEFINE_float(
  'max_bad_fraction',
  0.01,
  'Entries that cannot become a record (a missing image, a malformed conversation) are skipped '
  'and listed in {out_dir}/{split}.quarantine.jsonl; the conversion fails when more than this '
  'fraction of the input is bad.',
)
EXTRAS_DIR = flags.DEFINE_string(
  'extras_dir',
  '',
  'Optional folder of {id}.npz files; each array becomes a record extra (e.g. '
  'precomputed teacher features).',
)


def caption_conversation(caption: str) -> list[dict[str, str]]:
  """An (image, caption) pair in the LLaVA layout (the plain template supervises the caption)."""
  return [{'from': 'human', 'value': IMAGE_PLACEHOLDER}, {'from': 'gpt', 'value': caption}]


def file_signature(path: str) -> str:
  """Path, size and modification time: a changed input file re-converts its shard."""
  stat = os.stat(path)
  return f'{path}:{stat.st_size}:{stat.st_mtime_ns}'


def read_extras(extras_dir: str, record_id: str) -> dict[str, np.ndarray]:
  if not extras_dir:
    return {}
  path = os.path.join(extras_dir, f'{record_id}.npz')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'record {record_id!r} has no extras file {path}; every record needs '
      'one when --extras_dir is set'
    )
  with np.load(path) as data:
    return {name: data[name] for name in data.files}


@dataclasses.dataclass(frozen=True)
class FileItem:
  """One record whose image is a file on disk (or none, for text-only)."""

  id: str
  image_path: str | None
  conversations: tuple[dict[str, str], ...]

  def describe(self) -> str:
    image = file_signature(self.image_path) if self.image_path else '-'
    return f'{self.id}|{image}|{self.conversations!r}'


@dataclasses.dataclass(frozen=True)
class FileRecords:
  """FileItem -> record (runs in the conversion processes)."""

  extras_dir: str = ''

  def __call__(self, item: FileItem) -> dict[str, Any]:
    image = None
    if item.image_path:
      with open(item.image_path, 'rb') as f:
        image = f.read()
    record = {'id': item.id, 'image': image, 'conversations': list(item.conversations)}
    extras = read_extras(self.extras_dir, item.id)
    if extras:
      record['extras'] = extras
    return record


@dataclasses.dataclass(frozen=True)
class BadEntry:
  """An input entry that cannot become a record: the loader's bad-record kinds
  (evejax/data/bad_records.py), with where it is in the input and its id."""

  where: str
  id: str
  kind: str
  reason: str


def file_item(
  where: str, record_id: str, image_dir: str, image: Any, conversations: Any
) -> FileItem | BadEntry:
  """The FileItem of one input entry (`image`: a file name under `image_dir`, or None for a
  text-only entry), or the BadEntry saying why it cannot be one."""
  try:
    templates.conversation_pairs(conversations)
  except templates.BadConversation as error:
    return BadEntry(where, record_id, 'bad_conversation', str(error))
  if image is None:
    return FileItem(record_id, None, tuple(conversations))
  if not isinstance(image, str) or not image:
    return BadEntry(where, record_id, 'bad_image', f'image {image!r} is not a file name')
  path = image if os.path.isabs(image) else os.path.join(image_dir, image)
  if not os.path.isfile(path):
    return BadEntry(
      where, record_id, 'bad_image', f'image {image!r} not found at {path}; check --image_dir'
    )
  return FileItem(record_id, path, tuple(conversations))


def quarantine_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f'{split}.quarantine.jsonl')


def keep_good(
  entries: Sequence[FileItem | BadEntry], source: str, quarantine: str, max_fraction: float
) -> tuple[list[FileItem], dict[str, int]]:
  """The good entries and the count of bad ones per kind. Like the loader's bad-record policy:
  each bad entry is logged and listed in `quarantine` (JSON lines, rewritten on every run), and
  more than `max_fraction` of them stops the conversion (TooManyBadRecords)."""
  bad = [e for e in entries if isinstance(e, BadEntry)]
  by_kind: dict[str, int] = {}
  for entry in bad:
    by_kind[entry.kind] = by_kind.get(entry.kind, 0) + 1
    logging.warning('Skipping %s (id %r, %s): %s', entry.where, entry.id, entry.kind, entry.reason)
  os.makedirs(os.path.dirname(quarantine) or '.', exist_ok=True)
  with open(quarantine, 'w') as f:
    f.writelines(json.dumps(dataclasses.asdict(entry)) + '\n' for entry in bad)
  if bad and len(bad) > max_fraction * len(entries):
    raise TooManyBadRecords(
      f'{len(bad)} of {len(entries)} entries of {source} are bad ({by_kind}), over '
      f'--max_bad_fraction={max_fraction}; they are listed in {quarantine}. Fix them, or raise '
      'the threshold to convert the rest.'
    )
  return [e for e in entries if not isinstance(e, BadEntry)], by_kind


def expand_globs(patterns: Sequence[str]) -> list[str]:
  paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
  if not paths:
    raise FileNotFoundError(f'no input files match {list(patterns)}')
  return paths


def write(entries: Sequence[Any], make_record, describe, info: dict[str, Any]) -> dict:
  """Writes the good `entries` (FileItems, say; BadEntries are skipped per `keep_good`) as the
  shards + manifest named by the output flags; logs a summary."""
  if not OUT_DIR.value:
    raise flags.IllegalFlagValueError('--out_dir is required')
  items, bad = keep_good(
    entries,
    info.get('input', 'the input'),
    quarantine_path(OUT_DIR.value, SPLIT.value),
    MAX_BAD_FRACTION.value,
  )
  manifest = records.write_dataset(
    items,
    make_record,
    OUT_DIR.value,
    SPLIT.value,
    num_shards=NUM_SHARDS.value or None,
    records_per_shard=RECORDS_PER_SHARD.value,
    num_workers=WORKERS.value,
    describe=describe,
    progress=True,
    info={**info, 'bad_entries': bad},
  )
  logging.info(
    'Wrote %d records in %d shards to %s (manifest %s); skipped %d bad entries %s',
    manifest['num_records'],
    len(manifest['shards']),
    OUT_DIR.value,
    records.manifest_path(OUT_DIR.value, SPLIT.value),
    sum(bad.values()),
    bad,
  )
  return manifest


class TarMembers:
  """Reads members of uncompressed/compressed tar files, keeping each file open per process."""

  def __init__(self):
    self._open: dict[str, tarfile.TarFile] = {}

  def read(self, tar_path: str, member: str) -> bytes:
    if tar_path not in self._open:
      self._open[tar_path] = tarfile.open(tar_path)
    return self._open[tar_path].extractfile(member).read()
