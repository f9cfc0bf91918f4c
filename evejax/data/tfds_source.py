"""TFDS: a builder for the converted format, and a source that reads TFDS array_record datasets
without TensorFlow (`tfds.data_source` needs no TF; `tfds.load` does).

  builder = EvejaxRecords(records_dir='data/llava665k', data_dir='~/tensorflow_datasets')
  builder.download_and_prepare(file_format='array_record')   # once
  source = TfdsSource('evejax_records', '~/tensorflow_datasets', 'train')   # data.source='tfds'

The dataset's features: `id` (text), `image` (encoded bytes, empty for text-only), `conversations`
(LLaVA-layout JSON text), `extras` (packed numpy arrays, see records.pack_extras).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from evejax.data import records


class EvejaxRecords(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over the splits of a dataset converted by data_pipelines/ (its manifests)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'evejax-records-v1 records.'}

  def __init__(
    self, *, records_dir: str | None = None, splits: tuple[str, ...] = ('train',), **kwargs
  ):
    self._records_dir, self._splits = records_dir, splits  # Only needed to prepare.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'id': tfds.features.Text(),
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'conversations': tfds.features.Text(),
          'extras': tfds.features.Tensor(shape=(), dtype=np.object_),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._records_dir:
      raise ValueError('EvejaxRecords needs records_dir= (a converted dataset) to prepare')
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str):
    source = records.RecordSource(self._records_dir, split)
    for i in range(len(source)):
      record = source[i]
      yield (
        i,
        {
          'id': record['id'],
          'image': record['image'] or b'',
          'conversations': json.dumps(record['conversations']),
          'extras': records.pack_extras(record.get('extras', {})),
        },
      )


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class TfdsSource:
  """One split of a prepared TFDS dataset, as record dicts (same layout as RecordSource)."""

  def __init__(self, name: str, data_dir: str, split: str):
    if not name:
      raise ValueError("data.source='tfds' needs data.tfds.name (and data.tfds.data_dir)")
    self.name, self.split = name, split
    try:
      self._source = tfds.data_source(
        name, data_dir=data_dir or None, split=split, builder_kwargs={'file_format': 'array_record'}
      )
    except Exception as e:  # TFDS raises several types for a missing/unprepared dataset.
      raise ValueError(
        f'cannot open TFDS dataset {name!r} split {split!r} in data_dir '
        f'{data_dir!r}: {e}. Prepare it first (file_format=array_record).'
      ) from e
    self.info: dict[str, Any] = {}

  def __len__(self) -> int:
    return len(self._source)

  def location(self, index: int) -> dict[str, Any]:
    return {'shard': f'tfds:{self.name}/{self.split}', 'index': index}

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    try:
      record = {
        'id': _text(example['id']),
        'image': example['image'] or None,
        'conversations': json.loads(_text(example['conversations'])),
      }
      extras = records.unpack_extras(example.get('extras', b''))
    except (KeyError, ValueError) as e:
      raise ValueError(f'undecodable TFDS example: {type(e).__name__}: {e}') from e
    if extras:
      record['extras'] = extras
    return record

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r}, {len(self)} examples)'
