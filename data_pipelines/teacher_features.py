"""Offline PAL: a copy of a converted dataset whose image records carry the teacher's features.

  python -m data_pipelines.teacher_features \
      --config=configs/eve_v1/prealign.py:size=7b,teacher=online,clip_weights=clip.safetensors \
      --in_dir=data/eve-cap33m --out_dir=data/eve-cap33m-clip --split=train

The training config fixes the geometry (resize policy, patch size, max_size) and the online teacher
(pal.clip, pal.clip_weights); each image record gets extras['teacher_features'] of shape
(visual tokens, pal_teacher_size), row-major, exactly what the online teacher computes during
training. Train on the output with pal.teacher='offline'. Re-runs skip unchanged shards.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags

from evejax.cli import define_config_flag, parse_flags
from evejax.config import TrainConfig
from evejax.data import pipeline, records
from evejax.train import pal


@dataclasses.dataclass(frozen=True)
class WithTeacherFeatures:
  """Record index -> the input record plus extras['teacher_features'] (image records only)."""

  source: records.RecordSource
  preprocess: pipeline.Preprocessor
  teacher: Callable[[dict[str, np.ndarray]], jax.Array]
  dtype: str

  def __call__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    if record.get('image') is None:
      return record
    try:
      row = self.preprocess(record)
    except ValueError as e:
      where = self.source.location(index)
      raise ValueError(f'{where["shard"]} record {where["index"]}: {e}') from e
    visual_tokens = int((row['patch_image'] > 0).sum())
    features = np.asarray(self.teacher({k: v[None] for k, v in row.items()}))[0, :visual_tokens]
    record['extras'] = {**record.get('extras', {}), 'teacher_features': features.astype(self.dtype)}
    return record


def teacher_dataset(
  config, in_dir: str, out_dir: str, split: str, dtype: str = 'float16', progress: bool = False
) -> dict:
  """Writes `out_dir`/`split` with teacher features; returns its manifest."""
  cfg = TrainConfig.parse(config)
  model_cfg = cfg.model
  if model_cfg.vision_tokenizer != 'v1' or not model_cfg.pal:
    raise ValueError(
      'teacher features are for EVEv1 with PAL: the config needs '
      "model.vision_tokenizer='v1' and model.pal=True"
    )
  source = records.RecordSource(in_dir, split)
  tokenizer = pipeline.load_tokenizer(cfg.data, source)
  if model_cfg.pal_pool > 1:
    raise ValueError(
      'run this with the base-resolution config (model.pal_pool=1, e.g. 672 px): '
      'its features are those an HD run (pal_pool=2, 1344 px) reads'
    )
  # The training geometry; the features are computed here, not read from the records.
  preprocess = pipeline.make_preprocessor(
    cfg.data, tokenizer, cfg.batch_spec().replace(teacher_size=0)
  )
  teacher = jax.jit(pal.online_teacher(cfg.pal, model_cfg))
  # Shards are re-written when the input, the geometry or the teacher changes.
  pal_fields = dataclasses.asdict(cfg.pal)
  signature = repr(
    (
      records.read_manifest(in_dir, split)['shards'],
      dataclasses.asdict(cfg.data),
      pal_fields,
      dtype,
    )
  )
  if cfg.pal.clip_weights:
    signature += records.file_sha256(cfg.pal.clip_weights)
  key = hashlib.sha256(signature.encode()).hexdigest()
  return records.write_dataset(
    list(range(len(source))),
    WithTeacherFeatures(source, preprocess, teacher, dtype),
    out_dir,
    split,
    num_shards=len(records.read_manifest(in_dir, split)['shards']),
    num_workers=1,
    describe=lambda i: f'{key}|{i}',
    progress=progress,
    info={**source.info, 'teacher_features': pal_fields},
  )


def define_flags() -> dict[str, Any]:
  """The CLI's flags, defined only when it runs: the library functions above import without
  them (other CLIs in one process, e.g. the tests, define their own --config)."""
  return dict(
    config=define_config_flag('The EVEv1 training config, as path[:arg].'),
    in_dir=flags.DEFINE_string('in_dir', None, 'Converted dataset (data_pipelines/) to read.'),
    out_dir=flags.DEFINE_string('out_dir', None, 'Where the copy with features is written.'),
    split=flags.DEFINE_string('split', 'train', 'Split to convert.'),
    dtype=flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32'], 'Stored dtype.'),
  )


def main(argv, cli: dict[str, Any]) -> None:
  del argv
  out_dir, split = cli['out_dir'].value, cli['split'].value
  manifest = teacher_dataset(
    cli['config'].value, cli['in_dir'].value, out_dir, split, cli['dtype'].value, progress=True
  )
  print(
    f'Wrote {manifest["num_records"]} records with teacher features to '
    f'{os.path.join(out_dir, split)}*'
  )


if __name__ == '__main__':
  _CLI = define_flags()
  flags.mark_flags_as_required(['in_dir', 'out_dir'])
  app.run(functools.partial(main, cli=_CLI), flags_parser=parse_flags)
