"""CLI: convert a benchmark's question file to the JSONL format of records.py.

  python -m evejax.evaluation.convert --format=gqa --questions=testdev_balanced_questions.json \
      --images=gqa/images --out=bench/gqa.jsonl
  python -m evejax.evaluation.convert --format=shapes --config=configs/demo.py \
      --out=bench/shapes.jsonl [--config.data.num_eval=128]

  python -m evejax.evaluation.convert --format=mmmu --questions=MMMU --out=bench/mmmu.jsonl
  python -m evejax.evaluation.convert --format=chartqa --questions="ChartQA Dataset/test" \
      --out=bench/chartqa.jsonl

--images is the image folder (for mmbench, shapes and the parquet releases mmmu, ai2d and
realworldqa: where the images are written; chartqa: default the split's `png/`; otherwise default an
`images/` folder beside --out). The shapes format writes the held-out split of the config's data.
"""

import os

from absl import app, flags

from evejax import cli, storage
from evejax.config import TrainConfig
from evejax.config_utils import load_config_file
from evejax.data import pipeline
from evejax.evaluation import converters, converters_v2
from evejax.evaluation.records import write_jsonl

_FORMAT = flags.DEFINE_enum(
  'format', None, list(converters.FORMATS + converters_v2.FORMATS), 'Benchmark layout.'
)
_QUESTIONS = flags.DEFINE_string(
  'questions',
  None,
  'Question file (mme, mmmu: the benchmark folder; chartqa: the split folder; ai2d, realworldqa: '
  'the parquet file or a folder of them).',
)
_ANNOTATIONS = flags.DEFINE_string('annotations', None, 'vqav2: the annotations file.')
_IMAGES = flags.DEFINE_string('images', None, 'Image folder.')
_SPLIT = flags.DEFINE_string('split', 'test', 'scienceqa_img: the split to keep.')
DEFAULT_CONFIG = 'configs/demo.py'
_CONFIG = cli.define_config_flag(
  f'shapes: the training config, as path[:arg] (default: {DEFAULT_CONFIG}).', required=False
)
_LIMIT = flags.DEFINE_integer(
  'limit', None, 'shapes: at most this many images (one question per turn).'
)
_HISTORY = flags.DEFINE_bool(
  'history', False, 'shapes: ask each turn after the earlier turns and their reference answers.'
)
_OUT = flags.DEFINE_string('out', None, 'Output JSONL file.')
flags.mark_flags_as_required(['format', 'out'])


def records():
  fmt, questions = _FORMAT.value, _QUESTIONS.value
  images = _IMAGES.value or os.path.join(os.path.dirname(storage.absolute(_OUT.value)), 'images')
  if fmt == 'shapes':
    config = _CONFIG.value or load_config_file(DEFAULT_CONFIG)
    held_out = pipeline.make_sources(TrainConfig.parse(config).data)[1]
    return converters.shapes(held_out, images, _LIMIT.value, history=_HISTORY.value)
  if not questions:
    raise app.UsageError(f'--format={fmt} needs --questions')
  if fmt == 'vqav2':
    return converters.vqav2(questions, images, _ANNOTATIONS.value)
  if fmt == 'scienceqa_img':
    return converters.scienceqa_img(questions, images, _SPLIT.value)
  if fmt == 'mme':
    return converters.mme(questions)
  if fmt == 'mmbench':
    return converters.mmbench(questions, images)
  if fmt == 'chartqa':
    return converters_v2.chartqa(questions, _IMAGES.value)
  if fmt in converters_v2.FORMATS:
    return getattr(converters_v2, fmt)(questions, images)
  return getattr(converters, fmt)(questions, images)


def main(argv):
  del argv
  count = write_jsonl(_OUT.value, records())
  print(f'Wrote {count} records to {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)
