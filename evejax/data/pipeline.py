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
from typing import Any, Iterator, Mapping, Protocol

import grain
import numpy as np

from evejax.data import bad_records, encode, images, packing, records, shapes, templates
from evejax.data.tokenizer import Tokenizer, train_bpe

DEMO_TOKENIZER_VOCAB = 512


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """One record (LLaVA layout: `image` bytes, `conversations`) -> one padded row of the batch format."""
  tokenizer: Tokenizer
  template: templates.Template
  patch_size: int
  merge: int
  max_size: int
  seq_len: int
  resize: str = 'eve_v2_train'
  blank_images: bool = False  # Ablation: keep the layout, erase the pixels.
  valid_channel: bool = False  # EVEv1: a 4th, valid-pixel channel and the V1_KEYS of evejax/batch.py.
  teacher_size: int = 0  # > 0: offline PAL, each image record's extras['teacher_features'].
  pal_pool: int = 1  # EVEv1 HD: short sides round to pal_pool tokens; features per token block.

  @property
  def token_pixels(self) -> int:
    return self.patch_size * self.merge

  @property
  def max_patches(self) -> int:
    return images.max_patch_groups(self.max_size, self.token_pixels)

  @property
  def patch_shape(self) -> tuple[int, int]:
    return self.merge ** 2, self.patch_size ** 2 * (4 if self.valid_channel else 3)

  def image_patches(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    image = images.resize(images.decode_image(data), self.max_size,
                          self.token_pixels * self.pal_pool, self.resize)
    pixels = np.asarray(image, np.uint8)
    if self.blank_images:
      pixels = np.zeros_like(pixels)
    if self.valid_channel:
      pixels = images.with_valid_channel(pixels, self.token_pixels)
    elif self.resize == 'pad':
      raise ValueError("data.resize='pad' needs the valid-pixel channel of EVEv1 "
                       "(model.vision_tokenizer='v1')")
    groups, grid = images.patchify(pixels, self.patch_size, self.merge)
    if len(groups) > self.max_patches:
      raise ValueError(f'image of {image.width}x{image.height} px needs {len(groups)} visual tokens, '
                       f'over the budget of {self.max_patches} for data.max_size={self.max_size}; '
                       "resize it with data.resize='eve_v2_train' or raise data.max_size")
    return groups, grid

  def encode(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The unpadded sequence arrays of one record."""
    image_bytes = record.get('image')
    image_list = [] if image_bytes is None else [self.image_patches(image_bytes)]
    return self.with_teacher(self.encode_conversation(record['conversations'], image_list), record)

  def with_teacher(self, example: dict[str, np.ndarray],
                   record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Offline PAL: the record's precomputed teacher features, one per visual token, checked."""
    if self.teacher_size and example['patches'] is not None:
      extras = record.get('extras') or {}
      if self.pal_pool > 1:
        extras = {'teacher_features': encode.teacher_features_at_anchors(
            extras.get('teacher_features'), example['patch_coords'], self.pal_pool,
            self.teacher_size)}
      example['teacher_features'] = encode.teacher_features(extras, len(example['patches']),
                                                            self.teacher_size)
    return example

  def encode_conversation(self, conversation, image_list) -> dict[str, np.ndarray]:
    """Tokenise + template + label mask, with the images' patch groups in place."""
    ids, supervised = templates.tokenize_conversation(conversation, self.tokenizer, self.template)
    return encode.encode_example(ids, supervised, image_list)

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return encode.pack_row([self.encode(record)], self.seq_len, self.max_patches, self.patch_shape,
                           image_keys=self.valid_channel, teacher_size=self.teacher_size)


# Data options a config may leave out (configs/demo.py lists them all).
DEFAULTS = dict(
    path='', train_split='train', eval_split='eval',  # data.source='records': a converted dataset.
    tfds=dict(name='', data_dir='', train_split='train', eval_split='validation'),
    cache_dir='',  # Where the demo data is written as ArrayRecord; '' = $EVEJAX_CACHE or ~/.cache.
    pack_window=1, row_patches=0,  # Examples packed per window (1 = one per row); 0 = one image.
    num_threads=2, num_workers=0, prefetch=4,
    bad_records=dict(max_fraction=0.01, min_records=1000),
)


def option(data_cfg, name: str):
  default = DEFAULTS[name]
  if isinstance(default, dict):
    return {**default, **dict(data_cfg.get(name, {}))}
  return data_cfg.get(name, default)


class Source(Protocol):
  """Random access to record dicts, each with a location (shard, index) for the quarantine list;
  sources without `location` count as one shard."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...

  def location(self, index: int) -> dict[str, Any]: ...


def cache_dir(data_cfg) -> str:
  return (option(data_cfg, 'cache_dir') or os.environ.get('EVEJAX_CACHE')
          or os.path.join(os.path.expanduser('~'), '.cache', 'evejax'))


def shapes_source(data_cfg, split: str) -> records.RecordSource:
  """The demo data of `split` ('train' or 'eval'), written to ArrayRecord once and read back.

  The cache key covers the dataset's arguments and the generator's source code, so a change to
  either writes a fresh copy.
  """
  kw = dict(data_cfg.shapes)
  kw['question_kinds'] = tuple(kw['question_kinds'].split(','))
  # Held-out examples come from another seed, so they are images the model never saw.
  num, seed = ((data_cfg.num_train, data_cfg.seed) if split == 'train' else
               (data_cfg.num_eval, data_cfg.seed + 1_000_003))
  dataset = shapes.ShapesDataset(num, seed, **kw)
  key = repr((num, seed, sorted(kw.items()))) + inspect.getsource(shapes)
  directory = os.path.join(cache_dir(data_cfg),
                           f'shapes-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}')
  if not os.path.exists(records.manifest_path(directory, split)):
    # In this process: callers (scripts, notebooks) need no __main__ guard.
    records.write_dataset(list(range(num)), dataset.__getitem__, directory, split,
                          records_per_shard=5000, describe=str, info={'corpus': dataset.corpus()})
  return records.RecordSource(directory, split)


def make_sources(data_cfg) -> tuple[Source, Source]:
  """Train and held-out sources named by `data.source`: 'shapes' (the demo, via ArrayRecord),
  'records' (a dataset converted by data_pipelines/ at data.path) or 'tfds' (data.tfds)."""
  if data_cfg.source == 'shapes':
    return shapes_source(data_cfg, 'train'), shapes_source(data_cfg, 'eval')
  if data_cfg.source == 'records':
    if not option(data_cfg, 'path'):
      raise ValueError("data.source='records' needs data.path, the converted dataset's directory")
    return tuple(records.RecordSource(option(data_cfg, 'path'), option(data_cfg, split))
                 for split in ('train_split', 'eval_split'))
  if data_cfg.source == 'tfds':
    from evejax.data import tfds_source  # Imports tensorflow_datasets (slow) only when used.
    cfg = option(data_cfg, 'tfds')
    return tuple(tfds_source.TfdsSource(cfg['name'], cfg['data_dir'], cfg[split])
                 for split in ('train_split', 'eval_split'))
  raise ValueError(f"Unknown data.source {data_cfg.source!r}; available: 'shapes', 'records', "
                   "'tfds'")


def load_tokenizer(data_cfg, source: Source) -> Tokenizer:
  """`data.tokenizer` (a tokenizer.json or HF folder), or a BPE trained on the corpus the source
  ships in its manifest (the demo data does)."""
  if data_cfg.tokenizer:
    return Tokenizer.load(data_cfg.tokenizer)
  corpus = getattr(source, 'info', {}).get('corpus')
  if not corpus:
    raise ValueError(f'{source!r} ships no tokenizer corpus: set data.tokenizer to a '
                     'tokenizer.json or a Hugging Face tokenizer folder')
  return train_bpe(corpus, DEMO_TOKENIZER_VOCAB)


def make_preprocessor(data_cfg, tokenizer: Tokenizer, patch_size: int, merge: int, *,
                      blank_images: bool | None = None, valid_channel: bool = False,
                      teacher_size: int = 0, pal_pool: int = 1) -> Preprocessor:
  return Preprocessor(
      tokenizer=tokenizer, template=templates.get_template(data_cfg.template),
      patch_size=patch_size, merge=merge, max_size=data_cfg.max_size, seq_len=data_cfg.seq_len,
      resize=data_cfg.resize,
      blank_images=data_cfg.blank_images if blank_images is None else blank_images,
      valid_channel=valid_channel, teacher_size=teacher_size, pal_pool=pal_pool)


def row_spec(data_cfg, preprocess: Preprocessor) -> packing.RowSpec:
  row_patches = option(data_cfg, 'row_patches') or preprocess.max_patches
  if row_patches < preprocess.max_patches:
    raise ValueError(f'data.row_patches={row_patches} is below the {preprocess.max_patches} patch '
                     f'groups one image may need at data.max_size={preprocess.max_size}; raise it '
                     '(or 0 for exactly one image)')
  return packing.RowSpec(preprocess.seq_len, row_patches, preprocess.patch_shape,
                         image_keys=preprocess.valid_channel,
                         teacher_size=preprocess.teacher_size)


@dataclasses.dataclass(frozen=True)
class SafeEncode:
  """Record index -> unpadded encoded example, or a `BadRecord` saying where and why."""
  source: Source
  preprocess: Preprocessor
  spec: packing.RowSpec

  def _bad(self, index: int, kind: str, reason: str) -> bad_records.BadRecord:
    if hasattr(self.source, 'location'):
      where = self.source.location(index)
    else:  # An in-memory source (e.g. ShapesDataset in tests): one "shard".
      where = {'shard': type(self.source).__name__, 'index': index}
    return bad_records.BadRecord(**where, kind=kind, reason=reason)

  def __call__(self, index: int):
    kind = 'unreadable_record'
    try:
      record = self.source[index]
      kind = 'bad_image'
      image_bytes = record.get('image')
      image_list = [] if image_bytes is None else [self.preprocess.image_patches(image_bytes)]
      kind = 'bad_conversation'
      example = self.preprocess.encode_conversation(record['conversations'], image_list)
      kind = 'bad_teacher_features'
      example = self.preprocess.with_teacher(example, record)
    except (ValueError, KeyError) as e:
      return self._bad(index, kind, f'{type(e).__name__}: {e}')
    if not packing.fits(example, self.spec):
      return self._bad(index, 'too_long',
                       f'{len(example["tokens"])} tokens and {packing.num_patches(example)} patch '
                       f'groups do not fit a row of data.seq_len={self.spec.seq_len} and '
                       f'{self.spec.max_patches} patch groups')
    return example


def make_dataset(source: Source, preprocess: Preprocessor, spec: packing.RowSpec,
                 batch_size: int, *, seed: int, shuffle: bool, num_epochs: int | None,
                 process_index: int = 0, process_count: int = 1, pack_window: int = 1,
                 policy: bad_records.Policy = bad_records.Policy(), num_threads: int = 2,
                 num_workers: int = 0, prefetch: int = 4) -> grain.IterDataset:
  """Batches of packed rows from `source`; `num_epochs=None` repeats forever.

  Training (`shuffle=True`) drops a short final batch; evaluation pads it with empty rows so every
  example is seen exactly once and every batch has the static shape.
  """
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)  # Global: the same permutation on every process.
  ds = ds.repeat(num_epochs)[process_index::process_count]
  ds = ds.map(SafeEncode(source, preprocess, spec))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(prefetch, num_threads)))
  ds = bad_records.FilterBadRecords(ds, policy)
  ds = packing.PackIterDataset(ds, spec, pack_window)
  ds = ds.batch(batch_size, drop_remainder=shuffle)
  if not shuffle:
    ds = ds.map(functools.partial(packing.pad_batch, batch_size=batch_size))
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return ds


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} (global) is not divisible by the {process_count} '
                     'processes')
  return batch_size // process_count


def quarantine_path(workdir: str, process_index: int = 0, process_count: int = 1) -> str:
  """`{workdir}/quarantine.jsonl`; one file per process when there are several (hosts do not share
  appends on network file systems)."""
  if not workdir:
    return ''
  name = 'quarantine.jsonl' if process_count == 1 else f'quarantine-{process_index:05d}.jsonl'
  return os.path.join(workdir, name)


def _options(data_cfg, quarantine: str) -> dict[str, Any]:
  policy = option(data_cfg, 'bad_records')
  return dict(pack_window=option(data_cfg, 'pack_window'),
              num_threads=option(data_cfg, 'num_threads'),
              num_workers=option(data_cfg, 'num_workers'), prefetch=option(data_cfg, 'prefetch'),
              policy=bad_records.Policy(policy['max_fraction'], policy['min_records'], quarantine))


def make_train_iterator(data_cfg, source: Source, preprocess: Preprocessor, batch_size: int, *,
                        process_index: int = 0, process_count: int = 1,
                        workdir: str = '') -> grain.DatasetIterator:
  """The training iterator: an endless shuffled stream of this process's share of `batch_size`
  (global) rows. Checkpoint it with `grain.checkpoint.CheckpointSave(iterator)` (or
  `get_state()`); restoring the state continues with exactly the next batch. Bad records go to
  `quarantine_path(workdir, ...)`."""
  ds = make_dataset(source, preprocess, row_spec(data_cfg, preprocess),
                    local_batch_size(batch_size, process_count), seed=data_cfg.seed, shuffle=True,
                    num_epochs=None, process_index=process_index, process_count=process_count,
                    **_options(data_cfg, quarantine_path(workdir, process_index, process_count)))
  return iter(ds)


def eval_batches(data_cfg, source: Source, preprocess: Preprocessor, batch_size: int, *,
                 process_index: int = 0, process_count: int = 1,
                 workdir: str = '') -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over a held-out source, each example exactly once (packed like training).
  With several processes each reads its slice, and all yield the same number of batches."""
  spec, local = row_spec(data_cfg, preprocess), local_batch_size(batch_size, process_count)
  ds = make_dataset(source, preprocess, spec, local, seed=0, shuffle=False, num_epochs=1,
                    process_index=process_index, process_count=process_count,
                    **_options(data_cfg, quarantine_path(workdir, process_index, process_count)))
  if process_count > 1:
    # Every process runs the same number of eval steps: the count for one example per row, the
    # most any process's share can need; the packed batches are followed by empty ones.
    most_examples = -(-len(source) // process_count)
    ds = packing.FillToCount(ds, spec, local, -(-most_examples // local))
  return _closing(iter(ds))


def _closing(iterator: grain.DatasetIterator) -> Iterator[dict[str, np.ndarray]]:
  """Yields the iterator's batches, then closes it (stopping its worker processes, if any)."""
  try:
    yield from iterator
  finally:
    iterator.close()
