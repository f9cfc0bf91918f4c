"""The Grain loader over ArrayRecord shards: sharding, packing, exact resume, bad records, eval."""

import dataclasses
import io
import json
import os

import grain
import numpy as np
import pytest
from absl import flags
from array_record.python import array_record_module
from PIL import Image

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.config import DataConfig, ShapesConfig, TrainConfig
from evejax.data import bad_records, packing, pipeline, records, templates
from evejax.data.tokenizer import train_bpe
from evejax.models import ModelConfig, attention

NUM_RECORDS = 48
PATCH, MERGE = 4, 2  # 8 px visual tokens.


def image_bytes(width, height, fmt='PNG', seed=0):
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(buffer, format=fmt)
  return buffer.getvalue()


def make_record(i):
  """Record i: an image of varied size and aspect, and an answer that names i."""
  return {
    'id': f'r{i}',
    'image': image_bytes(8 + 8 * (i % 3), 8 + 8 * (i % 4), seed=i),
    'conversations': [
      {'from': 'human', 'value': '<image>\nwhich one?'},
      {'from': 'gpt', 'value': f'number {i}.'},
    ],
  }


@pytest.fixture(scope='module')
def tokenizer():
  return train_bpe(
    [f'USER: <image>\nwhich one? ASSISTANT: number {i}.<|im_end|>' for i in range(100)], 300
  )


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('records'))
  records.write_dataset(list(range(NUM_RECORDS)), make_record, directory, 'train', num_shards=3)
  return records.RecordSource(directory, 'train')


@pytest.fixture(scope='module')
def pre(tokenizer):
  return pipeline.Preprocessor(
    tokenizer,
    templates.get_template('chat'),
    BatchSpec(seq_len=64, patch_slots=24, patch_size=PATCH, merge=MERGE, max_size=24),
  )


def answer_ids(batch, tokenizer):
  """The record number of every example in a batch, read from its supervised (answer) tokens."""
  found = []
  for row in range(len(batch['tokens'])):
    for segment in np.unique(batch['segment_ids'][row]):
      if segment == 0:
        continue
      mask = (batch['segment_ids'][row] == segment) & (batch['loss_weights'][row] > 0)
      if not mask.any():  # A sample cut to the row before its answer.
        continue
      text = tokenizer.decode(batch['targets'][row][mask].tolist())
      found.append(int(text.split()[-1].split('.')[0]))
  return found


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_disjoint_slices_that_cover_the_dataset(
  source, pre, tokenizer, process_count
):
  seen = []
  for process_index in range(process_count):
    ds = pipeline.make_dataset(
      source,
      pre,
      1,
      seed=7,
      shuffle=True,
      num_epochs=1,
      process_index=process_index,
      process_count=process_count,
      pack_window=8,
      num_threads=1,
    )
    mine = [i for batch in ds for i in answer_ids(batch, tokenizer)]
    assert len(mine) == NUM_RECORDS // process_count
    seen += mine
  assert sorted(seen) == list(range(NUM_RECORDS))


def test_shuffle_is_global_seeded_and_differs_per_epoch(source, pre, tokenizer):
  def order(seed, epochs):
    ds = pipeline.make_dataset(
      source, pre, 1, seed=seed, shuffle=True, num_epochs=epochs, pack_window=1, num_threads=1
    )
    return [i for batch in ds for i in answer_ids(batch, tokenizer)]

  two_epochs = order(0, 2)
  assert two_epochs[:NUM_RECORDS] == order(0, 1) and order(1, 1) != order(0, 1)
  assert sorted(two_epochs[NUM_RECORDS:]) == list(range(NUM_RECORDS))
  assert two_epochs[NUM_RECORDS:] != two_epochs[:NUM_RECORDS]


def expected_mask(lengths, seq_len):
  """Causal attention inside each example, from the example lengths alone (pad attends to pad)."""
  owner = np.zeros(seq_len, int)
  start = 0
  for n, length in enumerate(lengths, start=1):
    owner[start : start + length] = n
    start += length
  same = owner[:, None] == owner[None, :]
  return same & np.tril(np.ones((seq_len, seq_len), bool))


def test_packed_rows_keep_examples_apart(source, pre, tokenizer):
  examples = [pre.encode(source[i]) for i in range(12)]
  spec = pre.spec
  rows = packing.first_fit_decreasing(examples, spec)
  assert sum(map(len, rows)) == 12 and len(rows) < 12  # Several examples share a row.
  for group in rows:
    row = pipeline.encode.pack_row(group, spec)
    lengths = [len(ex['tokens']) for ex in group]
    mask = np.asarray(attention.segment_mask(row['segment_ids'][None]))[0, 0]
    np.testing.assert_array_equal(mask, expected_mask(lengths, spec.seq_len))
    start, patch_start = 0, 0
    for ex, n in zip(group, lengths):
      span = slice(start, start + n)
      np.testing.assert_array_equal(row['positions'][span], np.arange(n))
      np.testing.assert_array_equal(row['loss_weights'][span], ex['loss_weights'])
      # Loss only on the answer: the weighted targets decode to exactly " number i.<|im_end|>".
      answer = tokenizer.decode(row['targets'][span][ex['loss_weights'] > 0].tolist())
      assert answer.startswith(' number ') and answer.endswith('.<|im_end|>')
      assert row['loss_weights'][start + n - 1] == 0  # Never predicts the next example's token.
      patch_ids = row['patch_index'][span][row['token_kind'][span] == bf.PATCH]
      np.testing.assert_array_equal(row['patches'][patch_ids], ex['patches'])
      start, patch_start = start + n, patch_start + len(ex['patches'])
    assert not row['loss_weights'][start:].any() and not row['segment_ids'][start:].any()


def test_first_fit_respects_both_budgets(pre, source):
  examples = [pre.encode(source[i]) for i in range(NUM_RECORDS)]
  spec = pre.spec.replace(patch_slots=10)
  for group in packing.first_fit_decreasing(examples, spec):
    assert sum(len(ex['tokens']) for ex in group) <= spec.seq_len
    assert sum(len(ex['patches']) for ex in group) <= spec.patch_slots


@pytest.mark.parametrize('num_workers', [0, 2])
def test_restored_iterator_continues_with_the_identical_batches(source, pre, num_workers):
  if num_workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.
  ds = pipeline.make_dataset(
    source,
    pre,
    2,
    seed=3,
    shuffle=True,
    num_epochs=None,
    pack_window=8,
    num_threads=2,
    num_workers=num_workers,
  )
  uninterrupted = iter(ds)
  for _ in range(5):  # Stop mid-window: the packer must replay its window exactly.
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # Small and JSON-serialisable.
  reference = [next(uninterrupted) for _ in range(4)]
  restored = iter(ds)
  restored.set_state(state)
  for want in reference:
    got = next(restored)
    for key in bf.KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def write_bad_dataset(directory):
  """Good records plus one of each kind of bad record, at known (shard, index) places."""
  good = [make_record(i) for i in range(16)]
  jpeg = image_bytes(16, 16, 'JPEG')
  bad = {
    'truncated': dict(make_record(0), id='truncated', image=jpeg[: len(jpeg) // 2]),
    'empty': dict(make_record(0), id='empty', image=b''),
    'placeholders': dict(
      make_record(0),
      id='placeholders',
      conversations=[
        {'from': 'human', 'value': '<image>\n<image>\nwhich one?'},
        {'from': 'gpt', 'value': 'number 0.'},
      ],
    ),
    'long': dict(
      make_record(0),
      id='long',
      conversations=[
        {'from': 'human', 'value': '<image>\n' + 'which one? ' * 20},
        {'from': 'gpt', 'value': 'number 0.'},
      ],
    ),
  }
  # Shard 0: 8 good; shard 1: bad at indices 1, 3, 5, 7 between good ones; plus an unreadable one.
  shard1 = [
    good[8],
    bad['truncated'],
    good[9],
    bad['empty'],
    good[10],
    bad['placeholders'],
    good[11],
    bad['long'],
  ] + good[12:]
  payloads = [
    [records.serialize(r) for r in good[:8]],
    [records.serialize(r) for r in shard1] + [b'\x93not a record'],
  ]
  manifest = {'format': records.FORMAT, 'split': 'train', 'info': {}, 'shards': []}
  for k, data in enumerate(payloads):
    name = records.shard_name('train', k, 2)
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name), 'group_size:1')
    for payload in data:
      writer.write(payload)
    writer.close()
    manifest['shards'].append(
      {
        'file': name,
        'num_records': len(data),
        'sha256': records.file_sha256(os.path.join(directory, name)),
      }
    )
  with open(records.manifest_path(directory, 'train'), 'w') as f:
    json.dump(manifest, f)
  return records.RecordSource(directory, 'train')


def test_bad_records_are_skipped_counted_and_quarantined(tmp_path, pre, tokenizer):
  source = write_bad_dataset(str(tmp_path))
  quarantine = str(tmp_path / 'quarantine.jsonl')
  ds = pipeline.make_dataset(
    source,
    pre,
    1,
    seed=0,
    shuffle=False,
    num_epochs=1,
    pack_window=4,
    num_threads=2,
    policy=bad_records.Policy(0.5, 10, quarantine),
  )
  seen = sorted(i for batch in ds for i in answer_ids(batch, tokenizer))
  assert seen == list(range(16))  # Every good record, once.
  encoded = grain.MapDataset.range(len(source)).map(pipeline.ReadAndEncode(source, pre))
  it = iter(bad_records.FilterBadRecords(encoded.to_iter_dataset(), bad_records.Policy(0.5, 10)))
  assert len(list(it)) == 17  # The 16 good ones and the long one, cut to a row.
  assert it.by_kind == {
    'unreadable_record': 1,
    'bad_image': 2,
    'bad_conversation': 1,
    'bad_teacher_features': 0,
  }
  # The long record is cut to the row and trained on: truncated, not bad (and not quarantined).
  assert (it.seen, it.bad, it.truncated) == (21, 4, 1) and it.get_state()['bad'] == 4
  shard1 = records.shard_name('train', 1, 2)
  entries = {(e['shard'], e['index'], e['kind']) for e in bad_records.read_quarantine(quarantine)}
  assert entries == {
    (shard1, 1, 'bad_image'),
    (shard1, 3, 'bad_image'),
    (shard1, 5, 'bad_conversation'),
    (shard1, 12, 'unreadable_record'),
  }


def test_too_many_bad_records_stop_the_run(tmp_path, pre):
  source = write_bad_dataset(str(tmp_path))
  ds = pipeline.make_dataset(
    source,
    pre,
    1,
    seed=0,
    shuffle=False,
    num_epochs=1,
    pack_window=1,
    num_threads=1,
    policy=bad_records.Policy(0.1, 10),
  )
  with pytest.raises(
    bad_records.TooManyBadRecords,
    match=r'of 1[0-9] records .* over data.bad_records.max_fraction=0.1',
  ):
    list(ds)


def test_missing_shard_is_a_start_up_error(tmp_path):
  directory = str(tmp_path)
  records.write_dataset(list(range(6)), make_record, directory, 'train', num_shards=2)
  os.remove(os.path.join(directory, records.shard_name('train', 1, 2)))
  with pytest.raises(FileNotFoundError, match='train-00001-of-00002.array_record .* missing'):
    records.RecordSource(directory, 'train')
  with pytest.raises(FileNotFoundError, match='no manifest'):
    records.RecordSource(directory, 'validation')


def test_eval_counts_every_supervised_token_once(source, pre):
  data_cfg = DataConfig(pack_window=8, row_patches=24, num_threads=2)
  batches = list(pipeline.eval_batches(data_cfg, source, pre, 4))
  assert all(b['tokens'].shape == (4, pre.spec.seq_len) for b in batches)  # The last one is padded.
  want = sum(pre.encode(source[i])['loss_weights'].sum() for i in range(len(source)))
  assert sum(b['loss_weights'].sum() for b in batches) == want
  segments = sum(len(np.unique(r[r > 0])) for b in batches for r in b['segment_ids'])
  assert segments == len(source)


def test_row_patches_below_one_image_is_a_config_error(pre):
  config = TrainConfig(
    model=ModelConfig(vision_patch_size=PATCH, vision_merge=MERGE),
    data=DataConfig(max_size=24, row_patches=3),
  )
  with pytest.raises(ValueError, match='data.row_patches=3 is below'):
    config.batch_spec()


@pytest.mark.slow  # ~40 s: a trainer start-up.
def test_training_cli_stops_on_bad_data_with_the_quarantine_list(tmp_path, tokenizer):
  import subprocess
  import sys

  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  write_bad_dataset(str(data_dir))
  tokenizer.save(str(tmp_path / 'tok'))
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py',
      f'--workdir={workdir}',
      '--config.data.source=records',
      f'--config.data.path={data_dir}',
      '--config.data.eval_split=train',
      f'--config.data.tokenizer={tmp_path / "tok"}',
      '--config.data.bad_records.min_records=10',
      '--config.data.bad_records.max_fraction=0.1',
      '--config.model.num_layers=1',
    ],
    cwd=__file__.rsplit('/tests/', 1)[0],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert 'TooManyBadRecords: ' in result.stderr and 'Traceback' not in result.stderr
  assert 'over data.bad_records.max_fraction=0.1' in result.stderr
  entries = bad_records.read_quarantine(str(workdir / 'quarantine.jsonl'))
  assert entries and all(e['shard'] == records.shard_name('train', 1, 2) for e in entries)


def test_demo_data_is_written_to_array_record_once_and_reads_back_identical(tmp_path):
  from evejax.data.shapes import ShapesDataset

  shapes = ShapesConfig(max_shapes=2, question_kinds='caption,count')
  data_cfg = DataConfig(
    num_train=12, num_eval=5, seed=4, shapes=shapes, cache_dir=str(tmp_path), source='shapes'
  )
  train, held_out = pipeline.make_sources(data_cfg)
  kw = dict(shapes.dataset_kwargs())
  assert kw['question_kinds'] == ('caption', 'count')
  assert [train[i] for i in range(12)] == [ShapesDataset(12, 4, **kw)[i] for i in range(12)]
  assert held_out[3] == ShapesDataset(5, 4 + 1_000_003, **kw)[3]  # Another seed: unseen images.
  manifest = records.manifest_path(train.directory, 'train')
  written = os.stat(manifest).st_mtime_ns
  assert pipeline.make_sources(data_cfg)[0].directory == train.directory
  assert os.stat(manifest).st_mtime_ns == written  # Read back, not rewritten.
  assert (
    pipeline.make_sources(dataclasses.replace(data_cfg, num_train=13))[0].directory
    != train.directory
  )


def test_multi_process_eval_has_equal_batch_counts_and_every_example_once(source, pre):
  data_cfg = DataConfig(pack_window=8, row_patches=24, num_threads=1)
  per_process = [
    list(pipeline.eval_batches(data_cfg, source, pre, 4, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == -(-NUM_RECORDS // 2 // 2)
  batches = per_process[0] + per_process[1]
  assert all(b['tokens'].shape == (2, pre.spec.seq_len) for b in batches)
  want = sum(pre.encode(source[i])['loss_weights'].sum() for i in range(len(source)))
  assert sum(b['loss_weights'].sum() for b in batches) == want
  assert sum(len(np.unique(r[r > 0])) for b in batches for r in b['segment_ids']) == NUM_RECORDS
