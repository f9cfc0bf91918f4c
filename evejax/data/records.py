"""The converted-data format: sharded ArrayRecord files of msgpack records, plus a manifest.

One record is a dict in the LLaVA layout:
  id: str; image: encoded image bytes (PNG/JPEG/..., never decoded pixels) or None for text-only;
  conversations: [{'from': 'human'|'gpt', 'value': str}, ...];
  extras: {name: np.ndarray} (optional, e.g. precomputed teacher features for EVEv1 PAL).

A dataset directory holds `{split}-{k:05d}-of-{n:05d}.array_record` shards and
`{split}.manifest.json` with each shard's record count and SHA-256, so a reader can check every
shard at start-up.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from array_record.python import array_record_module

from evejax import storage

FORMAT = 'evejax-records-v1'
SHARD_SUFFIX = '.array_record'
_GCSFUSE = (
  'ArrayRecord (what Grain reads) opens local files only. Mount the bucket with gcsfuse, as '
  'MaxText does for Grain (gcsfuse --implicit-dirs -o ro BUCKET /mnt/BUCKET), and give the '
  'mounted path; or set data.copy_remote_shards=True to copy the shards to local disk first'
)


def serialize(record: Mapping[str, Any]) -> bytes:
  """Record dict -> bytes. Raises ValueError naming the bad field."""
  unknown = set(record) - {'id', 'image', 'conversations', 'extras'}
  if unknown:
    raise ValueError(
      f'record {record.get("id")!r} has unknown fields {sorted(unknown)}; put '
      "additional data under 'extras' as numpy arrays"
    )
  image = record.get('image')
  if image is not None and not isinstance(image, bytes):
    raise ValueError(
      f'record {record.get("id")!r}: image must be encoded bytes, got {type(image).__name__}'
    )
  return msgpack.packb(
    {
      'id': str(record.get('id', '')),
      'image': image,
      'conversations': list(record['conversations']),
      'extras': _array_fields(record.get('extras', {})),
    },
    use_bin_type=True,
  )


def _array_fields(arrays: Mapping[str, np.ndarray]) -> dict[str, dict]:
  return {
    name: {
      'dtype': np.asarray(v).dtype.str,
      'shape': list(np.shape(v)),
      'data': np.ascontiguousarray(v).tobytes(),
    }
    for name, v in arrays.items()
  }


def _arrays(fields: Mapping[str, dict]) -> dict[str, np.ndarray]:
  return {
    name: np.frombuffer(v['data'], np.dtype(v['dtype'])).reshape(v['shape'])
    for name, v in fields.items()
  }


def pack_extras(extras: Mapping[str, np.ndarray]) -> bytes:
  """Extras alone as bytes (the TFDS builder stores them in one feature)."""
  return msgpack.packb(_array_fields(extras), use_bin_type=True)


def unpack_extras(data: bytes) -> dict[str, np.ndarray]:
  return _arrays(msgpack.unpackb(data, raw=False)) if data else {}


def deserialize(data: bytes) -> dict[str, Any]:
  """Bytes -> record dict; ValueError if the bytes are not a record."""
  try:
    raw = msgpack.unpackb(data, raw=False)
    extras = _arrays(raw['extras'])
    record = {'id': raw['id'], 'image': raw['image'], 'conversations': raw['conversations']}
  except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData) as e:
    raise ValueError(f'undecodable record: {type(e).__name__}: {e}') from e
  if extras:
    record['extras'] = extras
  return record


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}'


def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f'{split}.manifest.json')


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes to a temporary name and renames (or uploads: ArrayRecord writes local files only),
  so a shard in place is always complete."""
  with storage.local_file_for_writing(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    count = 0
    for data in records:
      writer.write(data)
      count += 1
    writer.close()
  return count


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """Shard `index` of a conversion: the items it holds and the fingerprint of its inputs."""

  path: str
  items: Sequence[Any]
  fingerprint: str


def _shard_up_to_date(job: ShardJob) -> dict | None:
  """The shard's sidecar entry if the shard was already written from the same inputs."""
  sidecar = job.path + '.json'
  if not (storage.exists(job.path) and storage.exists(sidecar)):
    return None
  entry = json.loads(storage.read_text(sidecar))
  if entry.get('fingerprint') != job.fingerprint or entry.get('sha256') != file_sha256(job.path):
    return None
  return entry


def _run_shard(job: ShardJob, make_record: Callable[[Any], Mapping[str, Any]]) -> dict:
  entry = _shard_up_to_date(job)
  if entry is not None:
    return entry
  count = _write_shard(job.path, (serialize(make_record(item)) for item in job.items))
  entry = {
    'file': os.path.basename(job.path),
    'num_records': count,
    'sha256': file_sha256(job.path),
    'fingerprint': job.fingerprint,
  }
  _write_json(job.path + '.json', entry)
  return entry


def write_dataset(
  items: Sequence[Any],
  make_record: Callable[[Any], Mapping[str, Any]],
  directory: str,
  split: str,
  *,
  num_shards: int | None = None,
  records_per_shard: int = 10_000,
  num_workers: int = 1,
  describe: Callable[[Any], str] = repr,
  progress: bool = False,
  info: Mapping[str, Any] | None = None,
) -> dict:
  """Converts `items` (cheap descriptions, e.g. file paths) into ArrayRecord shards + manifest.

  Shard k holds a contiguous slice of `items`; shards are written by `num_workers` processes.
  Re-running with the same items skips shards whose inputs (fingerprint of `describe(item)`) and
  checksum are unchanged, so an interrupted conversion resumes and a finished one is a no-op.
  `make_record` runs in the worker processes and must be picklable (a module-level function or
  a dataclass instance).
  Returns the manifest.
  """
  if not items:
    raise ValueError(f'no items to convert into {directory}/{split}')
  num_shards = num_shards or max(1, -(-len(items) // records_per_shard))
  num_shards = min(num_shards, len(items))
  storage.makedirs(directory)
  bounds = np.linspace(0, len(items), num_shards + 1).astype(int)
  jobs = []
  for k in range(num_shards):
    shard_items = items[bounds[k] : bounds[k + 1]]
    fingerprint = hashlib.sha256('\n'.join(map(describe, shard_items)).encode()).hexdigest()
    jobs.append(
      ShardJob(os.path.join(directory, shard_name(split, k, num_shards)), shard_items, fingerprint)
    )
  bar = _progress_bar(len(jobs), f'{split} shards', progress)
  if num_workers > 1:
    # Spawned (forking a process that runs JAX threads can deadlock): the caller's entry point
    # needs a __main__ guard, and `make_record` must be importable.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      futures = [pool.submit(_run_shard, job, make_record) for job in jobs]
      for future in concurrent.futures.as_completed(futures):
        future.result()
        bar.update()
      entries = [f.result() for f in futures]
  else:
    entries = []
    for job in jobs:
      entries.append(_run_shard(job, make_record))
      bar.update()
  bar.close()
  manifest = {
    'format': FORMAT,
    'split': split,
    'num_records': sum(e['num_records'] for e in entries),
    'shards': [{k: e[k] for k in ('file', 'num_records', 'sha256')} for e in entries],
    'info': dict(info or {}),
  }
  _write_json(manifest_path(directory, split), manifest)
  _remove_stale_shards(directory, split, {e['file'] for e in entries})
  return manifest


def _remove_stale_shards(directory: str, split: str, keep: set[str]) -> None:
  """Deletes shards of an earlier conversion with another shard count (not in the manifest)."""
  for path in storage.glob(directory, f'{split}-?????-of-?????{SHARD_SUFFIX}'):
    if os.path.basename(path) not in keep:
      storage.remove(path)
      if storage.exists(path + '.json'):
        storage.remove(path + '.json')


def _write_json(path: str, content: Any) -> None:
  """Atomic: concurrent converters or readers never see half a file."""
  storage.write_atomic(path, json.dumps(content, indent=1))


def _progress_bar(total: int, desc: str, enabled: bool):
  import tqdm  # Only the CLIs show progress.

  return tqdm.tqdm(total=total, desc=desc, unit='shard', disable=not enabled)


def read_manifest(directory: str, split: str) -> dict:
  path = manifest_path(directory, split)
  if not storage.exists(path):
    raise FileNotFoundError(
      f'no manifest {path}: convert the data with data_pipelines/ first (or '
      'check data.path and data.train_split / data.eval_split)'
    )
  manifest = json.loads(storage.read_text(path))
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{path} has format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


class RecordSource:
  """Random access to one split of a converted dataset: `source[i]` is a record dict.

  Checks at construction that every shard in the manifest exists and holds the listed number of
  records (and, with `verify_checksums`, its SHA-256), so a missing or unreadable shard fails at
  start-up rather than hours into a run.
  """

  def __init__(
    self, directory: str, split: str, *, verify_checksums: bool = False, copy_to: str = ''
  ):
    """`copy_to`: a local folder where shards on object storage are copied (else an error)."""
    self.directory, self.split = directory, split
    if storage.is_url(directory) and not copy_to:
      raise ValueError(f'{directory}: the shards are on object storage. {_GCSFUSE}.')
    manifest = read_manifest(directory, split)
    self.info = manifest.get('info', {})
    paths = []
    for shard in manifest['shards']:
      path = os.path.join(directory, shard['file'])
      if not storage.exists(path):
        raise FileNotFoundError(
          f'shard {path} listed in {manifest_path(directory, split)} is '
          'missing; re-run the converter or restore the file'
        )
      if verify_checksums and file_sha256(path) != shard['sha256']:
        raise ValueError(
          f'shard {path} does not match its SHA-256 in the manifest: the file is '
          'corrupt or was rewritten; re-run the converter'
        )
      paths.append(_local_copy(path, shard['sha256'], copy_to) if storage.is_url(path) else path)
    try:
      self._source = grain.sources.ArrayRecordDataSource(paths)
    except Exception as e:  # array_record raises bare RuntimeErrors on unreadable files.
      raise ValueError(f'cannot read the shards of {directory}/{split}: {e}') from e
    counts = [s['num_records'] for s in manifest['shards']]
    if len(self._source) != sum(counts):
      raise ValueError(
        f'{directory}/{split}: the shards hold {len(self._source)} records but the '
        f'manifest lists {sum(counts)}; re-run the converter'
      )
    self._files = [s['file'] for s in manifest['shards']]
    self._starts = np.cumsum([0] + counts[:-1]).tolist()

  def __len__(self) -> int:
    return len(self._source)

  def location(self, index: int) -> dict[str, Any]:
    """The shard file and the index inside it of global record `index`."""
    shard = bisect.bisect_right(self._starts, index) - 1
    return {'shard': self._files[shard], 'index': index - self._starts[shard]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return deserialize(self._source[index])

  def __repr__(self) -> str:
    return f'RecordSource({self.directory!r}, {self.split!r}, {len(self)} records)'


def _local_copy(path: str, sha256: str, folder: str) -> str:
  """A local copy of shard `path`, named by its SHA-256 (so a copy is made once and reused)."""
  local = os.path.join(folder, f'{sha256}{SHARD_SUFFIX}')
  if os.path.exists(local):
    return local
  os.makedirs(folder, exist_ok=True)
  with storage.local_file_for_writing(local) as tmp:
    storage.copy(path, tmp)
    if file_sha256(tmp) != sha256:
      raise ValueError(
        f'shard {path} does not match its SHA-256 in the manifest: the file is corrupt or '
        'was rewritten; re-run the converter'
      )
  return local
