"""Input-pipeline throughput: the full loader vs a bare loop that only decodes the same images.

  python -m evejax.data.bench                          # the demo data (configs/demo.py)
  python -m evejax.data.bench --dataset=photos         # synthetic 640x480-class JPEG photos
  python -m evejax.data.bench --dataset=records --records_dir=data/llava --split=train

Prints one table: images/s and non-pad tokens/s for the bare PIL decode loop and for the loader
(read, decode, any-res resize, patchify, tokenise, pack, batch) with 0/1/2 worker processes, the
loader/bare ratio, and the packing efficiency (non-pad fraction of the rows).
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from evejax import cli
from evejax.config import TrainConfig
from evejax.config_utils import load_config_file
from evejax.data import pipeline, records

DEFAULT_CONFIG = 'configs/demo.py'
_CONFIG = cli.define_config_flag(
  f'Training config (data, model patch geometry), as path[:arg] (default: {DEFAULT_CONFIG}).',
  required=False,
)
_DATASET = flags.DEFINE_enum('dataset', 'demo', ['demo', 'photos', 'records'], 'Which images.')
_RECORDS_DIR = flags.DEFINE_string('records_dir', '', '--dataset=records: a converted dataset.')
_SPLIT = flags.DEFINE_string('split', 'train', '--dataset=records: the split.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'Images per measurement (at most).')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker-process counts to measure.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'Rows per batch; 0: the config batch_size.')


def photo_record(i: int) -> dict:
  """A smooth random 'photo' of a camera-like size, JPEG-encoded (decode cost like real data)."""
  rng = np.random.default_rng(i)
  width, height = [(640, 480), (480, 640), (800, 600), (512, 512)][i % 4]
  small = rng.integers(0, 256, (height // 16, width // 16, 3), np.uint8)
  image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  return {
    'id': f'photo{i}',
    'image': buffer.getvalue(),
    'conversations': [
      {'from': 'human', 'value': '<image>\ndescribe the image.'},
      {'from': 'gpt', 'value': 'a photo of random colours.'},
    ],
  }


class Subset:
  """The first `n` records of a source (the benchmark's fixed workload)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.info = getattr(source, 'info', {})

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    return self.source[index]

  def location(self, index: int):
    return self.source.location(index)


def make_source(config, workdir: str):
  if _DATASET.value == 'demo':
    return pipeline.make_sources(config.data)[0]
  if _DATASET.value == 'records':
    return records.RecordSource(_RECORDS_DIR.value, _SPLIT.value)
  directory = os.path.join(workdir, 'photos')
  records.write_dataset(
    list(range(_NUM_IMAGES.value)),
    photo_record,
    directory,
    'train',
    records_per_shard=500,
    num_workers=os.cpu_count() or 1,
    describe=str,
    info={'corpus': [photo_record(0)['conversations'][1]['value']]},
  )
  return records.RecordSource(directory, 'train')


def bare_decode(source) -> float:
  """Images/s of a loop that reads each record and decodes its image with PIL, nothing else."""
  start = time.perf_counter()
  for i in range(len(source)):
    data = source[i]['image']
    Image.open(io.BytesIO(data)).convert('RGB')
  return len(source) / (time.perf_counter() - start)


def loader(source, config, preprocess, batch_size: int, workers: int) -> dict[str, float]:
  """One ordered pass; the clock starts once every worker has delivered a batch (start-up and
  imports excluded)."""
  data = config.data
  ds = pipeline.make_dataset(
    source,
    preprocess,
    batch_size,
    seed=0,
    shuffle=False,
    num_epochs=1,
    pack_window=data.pack_window,
    num_threads=data.num_threads,
    num_workers=workers,
    prefetch=data.prefetch,
  )
  counts = np.zeros(3)  # images, non-pad tokens, positions

  def add(batch):
    seg = batch['segment_ids']
    counts[:] += [sum(len(np.unique(r[r > 0])) for r in seg), (seg > 0).sum(), seg.size]

  it = iter(ds)
  for _ in range(max(1, workers)):  # Workers deliver batches round-robin.
    add(next(it))
  after_warmup = counts.copy()
  start = time.perf_counter()
  for batch in it:
    add(batch)
  seconds = time.perf_counter() - start
  images, tokens, _ = counts - after_warmup
  return {
    'images_per_s': images / seconds,
    'tokens_per_s': tokens / seconds,
    'efficiency': counts[1] / counts[2],
  }


def main(argv):
  del argv
  config = TrainConfig.parse(_CONFIG.value or load_config_file(DEFAULT_CONFIG))
  batch_size = _BATCH_SIZE.value or config.batch_size
  with tempfile.TemporaryDirectory() as workdir:
    source = Subset(make_source(config, workdir), _NUM_IMAGES.value)
    tokenizer = pipeline.load_tokenizer(config.data, source)
    preprocess = pipeline.make_preprocessor(config.data, tokenizer, config.batch_spec())
    bare_decode(Subset(source, 50))  # Warm the page cache.
    bare = bare_decode(source)
    sizes = [Image.open(io.BytesIO(source[i]['image'])).size for i in range(min(50, len(source)))]
    print(
      f'\n{_DATASET.value}: {len(source)} images (e.g. {sizes[0][0]}x{sizes[0][1]} px), '
      f'data.max_size={config.data.max_size} ({config.data.resize}), seq_len='
      f'{config.data.seq_len}, pack_window={config.data.pack_window}, '
      f'batch {batch_size}, {os.cpu_count()} CPU cores'
    )
    print(
      f'| {"pipeline":<28} | {"images/s":>9} | {"tokens/s":>9} | {"vs bare":>7} | {"non-pad":>7} |'
    )
    print(f'|{"-" * 30}|{"-" * 11}|{"-" * 11}|{"-" * 9}|{"-" * 9}|')
    print(f'| {"bare PIL decode loop":<28} | {bare:9.0f} | {"":>9} | {1:7.2f} | {"":>7} |')
    for workers in map(int, _WORKERS.value):
      m = loader(source, config, preprocess, batch_size, workers)
      name = f'loader, {workers} workers'
      print(
        f'| {name:<28} | {m["images_per_s"]:9.0f} | {m["tokens_per_s"]:9.0f} | '
        f'{m["images_per_s"] / bare:7.2f} | {m["efficiency"]:7.1%} |'
      )


if __name__ == '__main__':
  cli.run(main)
