"""Grain input pipeline over record sources.

  indices -> global shuffle (reshuffled every epoch) -> repeat -> this process's slice
  -> read + decode + any-res resize + patchify + tokenise/template/label mask (threads)
  -> drop and quarantine bad records -> pack examples into rows -> batch -> worker processes.

`make_train_iterator` returns the Grain DatasetIterator whose `get_state()`/`set_state()` (or
`grain.checkpoint.CheckpointSave/Restore`) the checkpoint stores; `eval_batches` is one ordered pass
over a held-out set in which every supervised token is counted once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import grain
import numpy as np
from absl import logging

from evejax import storage
from evejax.batch import IMAGE_TOKEN_INDEX, BatchSpec
from evejax.data import bad_records, encode, images, packing, records, shapes, templates
from evejax.data.tokenizer import Tokenizer, train_bpe

if TYPE_CHECKING:  # evejax.config imports this package's modules.
  from evejax.config import DataConfig

DEMO_TOKENIZER_VOCAB = 512


@dataclasses.dataclass(frozen=True)
class Rejected:
  """Why a record cannot be used: its bad-record kind (bad_records.KINDS) and the reason."""

  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """One record (LLaVA layout: `image` bytes, `conversations`) -> one encoded example of `spec`."""

  tokenizer: Tokenizer
  template: templates.Template
  spec: BatchSpec
  blank_images: bool = False  # Ablation: keep the layout, erase the pixels.
  max_text_len: int = 0  # Text ids kept before the images expand (model_max_length); 0 = all.

  def image_patches(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> patch groups (N, S, F) and the visual-token grid (rows, cols)."""
    pixels = np.asarray(images.resize(images.decode_image(data), self.spec), np.uint8)
    if self.blank_images:
      pixels = np.zeros_like(pixels)
    return images.patch_groups(pixels, self.spec)

  def encode(self, record: Mapping[str, Any]) -> dict[str, np.ndarray] | Rejected:
    """The one path from a record to its unpadded example; a record that cannot be used gives a
    `Rejected` naming the step that failed (image, conversation, teacher features, length).

    Length as the reference: the text is cut to `max_text_len` ids before the images expand; an
    example still longer than a row loses its text tail (`encode.cut_to_row`). Either way it
    carries `truncated` (the reason), counted apart from bad records (bad_records.py)."""
    kind = 'bad_image'
    try:
      image_bytes = record.get('image')
      image_list = [] if image_bytes is None else [self.image_patches(image_bytes)]
      kind = 'bad_conversation'
      ids, supervised = templates.tokenize_conversation(
        record['conversations'], self.tokenizer, self.template
      )
      ids, supervised, text_cut = encode.cut_text(ids, supervised, self.max_text_len)
      if text_cut:  # Images whose placeholder was cut away are not shown (as the reference).
        image_list = image_list[: sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)]
      example = encode.encode_example(ids, supervised, image_list)
      kind = 'bad_teacher_features'
      example = self.with_teacher(example, record)
    except (ValueError, KeyError) as e:
      return Rejected(kind, f'{type(e).__name__}: {e}')
    positions = len(example['tokens'])
    example = encode.cut_to_row(example, self.spec.seq_len)
    if example is None or packing.num_patches(example) > self.spec.patch_slots:
      return Rejected(
        'too_long',
        f'{positions} positions do not fit a row of data.seq_len={self.spec.seq_len} and '
        f'{self.spec.patch_slots} patch groups without cutting into an image',
      )
    reasons = []
    if text_cut:
      reasons.append(f'text cut by {text_cut} ids to data.max_text_len={self.max_text_len}')
    if positions > self.spec.seq_len:
      reasons.append(f'{positions} positions cut to data.seq_len={self.spec.seq_len}')
    if reasons:
      example['truncated'] = '; '.join(reasons)
    return example

  def with_teacher(
    self, example: dict[str, np.ndarray], record: Mapping[str, Any]
  ) -> dict[str, np.ndarray]:
    """Offline PAL: the record's precomputed teacher features, one per visual token, checked."""
    size, pool = self.spec.teacher_size, self.spec.pal_pool
    if size and example['patches'] is not None:
      extras = record.get('extras') or {}
      if pool > 1:
        extras = {
          'teacher_features': encode.teacher_features_at_anchors(
            extras.get('teacher_features'), example['patch_coords'], pool, size
          )
        }
      example['teacher_features'] = encode.teacher_features(extras, len(example['patches']), size)
    return example

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The record alone in one row of the spec; raises ValueError for a record it cannot use."""
    example = self.encode(record)
    if isinstance(example, Rejected):
      raise ValueError(f'{example.kind}: {example.reason}')
    return encode.pack_row([example], self.spec)


class Source(Protocol):
  """Random access to record dicts, each with a location (shard, index) for the quarantine list;
  sources without `location` count as one shard."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...

  def location(self, index: int) -> dict[str, Any]: ...


def cache_dir(data: DataConfig) -> str:
  return (
    data.cache_dir
    or os.environ.get('EVEJAX_CACHE')
    or os.path.join(os.path.expanduser('~'), '.cache', 'evejax')
  )


def shard_copies_dir(data: DataConfig) -> str:
  """Local disk for copies of shards on object storage (`data.copy_remote_shards`); '' = none."""
  if not data.copy_remote_shards:
    return ''
  roots = (data.cache_dir, os.environ.get('EVEJAX_CACHE'), os.path.expanduser('~/.cache/evejax'))
  return os.path.join(next(r for r in roots if r and not storage.is_url(r)), 'shards')


def shapes_source(data: DataConfig, split: str) -> records.RecordSource:
  """The demo data of `split` ('train' or 'eval'), written to ArrayRecord once and read back.

  The cache key covers the dataset's arguments and the generator's source code, so a change to
  either writes a fresh copy.
  """
  kw = data.shapes.dataset_kwargs()
  # Held-out examples come from another seed, so they are images the model never saw.
  num, seed = (
    (data.num_train, data.seed) if split == 'train' else (data.num_eval, data.seed + 1_000_003)
  )
  dataset = shapes.ShapesDataset(num, seed, **kw)
  key = repr((num, seed, sorted(kw.items()))) + inspect.getsource(shapes)
  directory = os.path.join(
    cache_dir(data), f'shapes-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}'
  )
  if not storage.exists(records.manifest_path(directory, split)):
    # In this process: callers (scripts, notebooks) need no __main__ guard.
    records.write_dataset(
      list(range(num)),
      dataset.__getitem__,
      directory,
      split,
      records_per_shard=5000,
      describe=str,
      info={'corpus': dataset.corpus()},
    )
  return records.RecordSource(directory, split, copy_to=shard_copies_dir(data))


def make_sources(data: DataConfig) -> tuple[Source, Source | None]:
  """Train and held-out sources named by `data.source`: 'shapes' (the demo, via ArrayRecord),
  'records' (a dataset converted by data_pipelines/ at data.path) or 'tfds' (data.tfds).

  The held-out source is None when there is none to evaluate on: `data.eval_split=''`, no
  held-out shapes (`data.num_eval=0`), or a converted dataset without that split (logged)."""
  if data.source == 'shapes':
    return shapes_source(data, 'train'), shapes_source(data, 'eval') if data.num_eval else None
  if data.source == 'records':
    if not data.path:
      raise ValueError("data.source='records' needs data.path, the converted dataset's directory")
    held_out = None
    copy_to = shard_copies_dir(data)
    if data.eval_split and storage.exists(records.manifest_path(data.path, data.eval_split)):
      held_out = records.RecordSource(data.path, data.eval_split, copy_to=copy_to)
    elif data.eval_split:
      logging.warning(
        '%s has no split %r (no %s): training without held-out evaluation; set '
        "data.eval_split to the held-out split, or '' to say there is none",
        data.path,
        data.eval_split,
        records.manifest_path(data.path, data.eval_split),
      )
    return records.RecordSource(data.path, data.train_split, copy_to=copy_to), held_out
  from evejax.data import tfds_source  # Imports tensorflow_datasets (slow) only when used.

  tfds = data.tfds
  held_out = (
    tfds_source.TfdsSource(tfds.name, tfds.data_dir, tfds.eval_split)
    if tfds.eval_split and data.eval_split
    else None
  )
  return tfds_source.TfdsSource(tfds.name, tfds.data_dir, tfds.train_split), held_out


def text_eval_source(data: DataConfig) -> Source | None:
  """The held-out text-only records of `data.text_eval_split` (None when unset): for 'shapes' the
  held-out scenes as text, for 'records' that split of data.path (a missing one is an error)."""
  if not data.text_eval_split:
    return None
  if data.source == 'shapes':
    text = dataclasses.replace(data, shapes=dataclasses.replace(data.shapes, text_only=True))
    return shapes_source(text, 'eval')
  if not os.path.exists(records.manifest_path(data.path, data.text_eval_split)):
    raise ValueError(
      f'data.text_eval_split={data.text_eval_split!r}: {data.path} has no such split (no '
      f'{records.manifest_path(data.path, data.text_eval_split)}); convert text-only records '
      "into it or set data.text_eval_split=''"
    )
  return records.RecordSource(data.path, data.text_eval_split)


def load_tokenizer(data: DataConfig, source: Source) -> Tokenizer:
  """`data.tokenizer` (a tokenizer.json or HF folder), or a BPE trained on the corpus the source
  ships in its manifest (the demo data does)."""
  if data.tokenizer:
    return Tokenizer.load(data.tokenizer)
  corpus = getattr(source, 'info', {}).get('corpus')
  if not corpus:
    raise ValueError(
      f'{source!r} ships no tokenizer corpus: set data.tokenizer to a '
      'tokenizer.json or a Hugging Face tokenizer folder'
    )
  return train_bpe(corpus, DEMO_TOKENIZER_VOCAB)


def make_preprocessor(data: DataConfig, tokenizer: Tokenizer, spec: BatchSpec) -> Preprocessor:
  return Preprocessor(
    tokenizer=tokenizer,
    template=templates.get_template(data.template),
    spec=spec,
    blank_images=data.blank_images,
    max_text_len=data.max_text_len,
  )


@dataclasses.dataclass(frozen=True)
class ReadAndEncode:
  """Record index -> unpadded encoded example, or a `BadRecord` saying where and why."""

  source: Source
  preprocess: Preprocessor

  def __call__(self, index: int):
    try:
      record = self.source[index]
    except (ValueError, KeyError) as e:
      result = Rejected('unreadable_record', f'{type(e).__name__}: {e}')
    else:
      result = self.preprocess.encode(record)
    if not isinstance(result, Rejected):
      return result
    if hasattr(self.source, 'location'):
      where = self.source.location(index)
    else:  # An in-memory source (e.g. ShapesDataset in tests): one "shard".
      where = {'shard': type(self.source).__name__, 'index': index}
    return bad_records.BadRecord(**where, kind=result.kind, reason=result.reason)


def make_dataset(
  source: Source,
  preprocess: Preprocessor,
  batch_size: int,
  *,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  process_index: int = 0,
  process_count: int = 1,
  pack_window: int = 1,
  policy: bad_records.Policy | None = None,
  num_threads: int = 2,
  num_workers: int = 0,
  prefetch: int = 4,
) -> grain.IterDataset:
  """Batches of packed rows from `source`; `num_epochs=None` repeats forever.

  Training (`shuffle=True`) drops a short final batch; evaluation pads it with empty rows so every
  example is seen exactly once and every batch has the static shape.
  """
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)  # Global: the same permutation on every process.
  ds = ds.repeat(num_epochs)[process_index::process_count]
  ds = ds.map(ReadAndEncode(source, preprocess))
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))
  )
  ds = bad_records.FilterBadRecords(ds, policy or bad_records.Policy())
  ds = packing.PackIterDataset(ds, preprocess.spec, pack_window)
  ds = ds.batch(batch_size, drop_remainder=shuffle)
  if not shuffle:
    ds = ds.map(functools.partial(packing.pad_batch, batch_size=batch_size))
  if num_workers:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
    )
  return ds


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(
      f'batch_size={batch_size} (global) is not divisible by the {process_count} processes'
    )
  return batch_size // process_count


def quarantine_path(workdir: str, process_index: int = 0, process_count: int = 1) -> str:
  """`{workdir}/quarantine.jsonl`; one file per process when there are several (hosts do not share
  appends on network file systems)."""
  if not workdir:
    return ''
  name = 'quarantine.jsonl' if process_count == 1 else f'quarantine-{process_index:05d}.jsonl'
  return os.path.join(workdir, name)


def _options(data: DataConfig, quarantine: str) -> dict[str, Any]:
  return dict(
    pack_window=data.pack_window,
    num_threads=data.num_threads,
    num_workers=data.num_workers,
    prefetch=data.prefetch,
    policy=bad_records.Policy(
      data.bad_records.max_fraction, data.bad_records.min_records, quarantine
    ),
  )


def make_train_iterator(
  data: DataConfig,
  source: Source,
  preprocess: Preprocessor,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  workdir: str = '',
) -> grain.DatasetIterator:
  """The training iterator: an endless shuffled stream of this process's share of `batch_size`
  (global) rows. Checkpoint it with `grain.checkpoint.CheckpointSave(iterator)` (or
  `get_state()`); restoring the state continues with exactly the next batch. Bad records go to
  `quarantine_path(workdir, ...)`."""
  ds = make_dataset(
    source,
    preprocess,
    local_batch_size(batch_size, process_count),
    seed=data.seed,
    shuffle=True,
    num_epochs=None,
    process_index=process_index,
    process_count=process_count,
    **_options(data, quarantine_path(workdir, process_index, process_count)),
  )
  return iter(ds)


def eval_batches(
  data: DataConfig,
  source: Source,
  preprocess: Preprocessor,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  workdir: str = '',
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over a held-out source, each usable example exactly once (packed like
  training); bad records are skipped and counted, never a failure.
  With several processes each reads its slice, and all yield the same number of batches."""
  local = local_batch_size(batch_size, process_count)
  options = _options(data, quarantine_path(workdir, process_index, process_count))
  # Bad held-out records are skipped, counted and quarantined like training's, but never end a
  # run (its evaluation may come after all the training): the pass ends with their count.
  options['policy'] = dataclasses.replace(options['policy'], max_fraction=1.0)
  ds = make_dataset(
    source,
    preprocess,
    local,
    seed=0,
    shuffle=False,
    num_epochs=1,
    process_index=process_index,
    process_count=process_count,
    **options,
  )
  if process_count > 1:
    # Every process runs the same number of eval steps: the count for one example per row, the
    # most any process's share can need; the packed batches are followed by empty ones.
    most_examples = -(-len(source) // process_count)
    ds = packing.FillToCount(ds, preprocess.spec, local, -(-most_examples // local))
  return _closing(iter(ds))


def _closing(iterator: grain.DatasetIterator) -> Iterator[dict[str, np.ndarray]]:
  """Yields the iterator's batches, then closes it (stopping its worker processes, if any)."""
  try:
    yield from iterator
  finally:
    iterator.close()
