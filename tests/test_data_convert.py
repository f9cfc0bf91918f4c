"""Converters to ArrayRecord: round trips from JSON, tar and CSV/Parquet inputs, idempotent re-runs,
the manifest, and the TFDS builder/source over the converted format."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import captions, common, llava_json, webdataset
from evejax.data import records
from evejax.data.bad_records import TooManyBadRecords

REPO = __file__.rsplit('/tests/', 1)[0]


def write_image(path, size, fmt, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path, format=fmt)
  with open(path, 'rb') as f:
    return f.read()


@pytest.fixture
def image_dir(tmp_path):
  """Real PNG and JPEG files of different sizes; returns (folder, {name: bytes})."""
  folder = tmp_path / 'images'
  folder.mkdir()
  files = {}
  for i in range(6):
    name = f'img{i}.png' if i % 2 else f'sub/img{i}.jpg'
    os.makedirs(folder / os.path.dirname(name), exist_ok=True)
    files[name] = write_image(
      folder / name, (20 + 7 * i, 16 + 3 * i), 'PNG' if i % 2 else 'JPEG', i
    )
  return str(folder), files


def read_all(directory, split='train'):
  source = records.RecordSource(directory, split, verify_checksums=True)
  return [source[i] for i in range(len(source))]


def test_llava_json_round_trip_with_extras_and_text_only(tmp_path, image_dir):
  folder, files = image_dir
  entries = [
    {
      'id': f'e{i}',
      'image': name,
      'conversations': [
        {'from': 'human', 'value': f'<image>\nq{i}'},
        {'from': 'gpt', 'value': f'a{i}'},
      ],
    }
    for i, name in enumerate(files)
  ]
  entries.append(
    {
      'id': 'text',
      'conversations': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'hello'}],
    }
  )
  extras_dir = tmp_path / 'extras'
  extras_dir.mkdir()
  features = {
    e['id']: np.random.default_rng(i).normal(size=(3, 4)).astype(np.float16)
    for i, e in enumerate(entries)
  }
  for record_id, value in features.items():
    np.savez(extras_dir / f'{record_id}.npz', teacher=value)
  items = llava_json.items_from_entries(entries, folder, 'test.json')
  out = str(tmp_path / 'out')
  manifest = records.write_dataset(
    items,
    common.FileRecords(str(extras_dir)),
    out,
    'train',
    num_shards=3,
    num_workers=2,
    describe=common.FileItem.describe,
  )
  assert [s['num_records'] for s in manifest['shards']] == [2, 2, 3]  # Contiguous slices.
  got = read_all(out)
  for entry, record in zip(entries, got):
    assert record['id'] == entry['id'] and record['conversations'] == entry['conversations']
    assert record['image'] == (files[entry['image']] if 'image' in entry else None)
    np.testing.assert_array_equal(record['extras']['teacher'], features[entry['id']])
    assert record['extras']['teacher'].dtype == np.float16


def test_llava_cli_and_missing_image_error(tmp_path, image_dir):
  folder, files = image_dir
  name = next(iter(files))
  entries = [
    {
      'id': 'a',
      'image': name,
      'conversations': [{'from': 'human', 'value': '<image>'}, {'from': 'gpt', 'value': 'x'}],
    }
  ]
  (tmp_path / 'data.json').write_text(json.dumps(entries))
  out = tmp_path / 'out'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'data_pipelines.llava_json',
      f'--json={tmp_path / "data.json"}',
      f'--image_dir={folder}',
      f'--out_dir={out}',
      '--workers=1',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert read_all(str(out))[0]['image'] == files[name]


def test_llava_bad_entries_are_skipped_counted_and_quarantined(tmp_path, image_dir):
  """The loader's bad-record policy: one missing image or malformed conversation never aborts a
  conversion; each is listed with its entry id, and too many of them stop it."""
  folder, files = image_dir
  name = next(iter(files))
  good = [{'from': 'human', 'value': '<image>'}, {'from': 'gpt', 'value': 'x'}]
  entries = [
    {'id': 'ok', 'image': name, 'conversations': good},
    {'id': 'missing', 'image': 'nope.png', 'conversations': good},
    {'id': 'null', 'image': name, 'conversations': [good[0], {'from': 'gpt', 'value': None}]},
    {'id': 'string', 'image': name, 'conversations': [good[0], 'x']},
    ['not', 'an', 'object'],
  ]
  items = llava_json.items_from_entries(entries, folder, 'test.json')
  quarantine = str(tmp_path / 'train.quarantine.jsonl')
  kept, bad = common.keep_good(items, 'test.json', quarantine, max_fraction=0.9)
  assert [item.id for item in kept] == ['ok']
  assert bad == {'bad_image': 1, 'bad_conversation': 2, 'unreadable_record': 1}
  with open(quarantine) as f:
    listed = [json.loads(line) for line in f]
  assert [(e['id'], e['kind']) for e in listed] == [
    ('missing', 'bad_image'),
    ('null', 'bad_conversation'),
    ('string', 'bad_conversation'),
    ('4', 'unreadable_record'),
  ]
  assert (
    listed[0]['where'] == 'test.json entry 1'
    and "image 'nope.png' not found" in (listed[0]['reason'])
  )
  with pytest.raises(TooManyBadRecords, match='4 of 5 entries of test.json are bad'):
    common.keep_good(items, 'test.json', quarantine, max_fraction=0.5)
  rows = [
    {'image': name, 'caption': 'a'},
    {'image': name, 'caption': None},
    {'image': None, 'caption': 'b'},
  ]
  kinds = [getattr(i, 'kind', 'ok') for i in captions.items_from_rows(rows, folder, 'rows')]
  assert kinds == ['ok', 'bad_conversation', 'bad_image']


def test_webdataset_tar_round_trip(tmp_path, image_dir):
  folder, files = image_dir
  tar_path = str(tmp_path / 'shard-000.tar')
  want = {}
  with tarfile.open(tar_path, 'w') as tar:
    for i, (name, data) in enumerate(files.items()):
      key = f'sample{i:03d}'
      ext = name.rsplit('.', 1)[1]
      if i % 2:
        text = f'caption {i}'.encode()
        conversations = common.caption_conversation(f'caption {i}')
        members = {f'{key}.{ext}': data, f'{key}.txt': text}
      else:
        conversations = [
          {'from': 'human', 'value': '<image>\nwhat?'},
          {'from': 'gpt', 'value': f'answer {i}'},
        ]
        members = {
          f'{key}.{ext}': data,
          f'{key}.json': json.dumps({'conversations': conversations}).encode(),
        }
      for member, content in members.items():
        info = tarfile.TarInfo(member)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
      want[key] = (data, conversations)
  items = webdataset.scan_tar(tar_path)
  out = str(tmp_path / 'out')
  records.write_dataset(
    items,
    webdataset.TarRecords(),
    out,
    'train',
    num_shards=2,
    num_workers=2,
    describe=webdataset.TarItem.describe,
  )
  got = {r['id']: (r['image'], r['conversations']) for r in read_all(out)}
  assert got == want


def test_csv_and_parquet_round_trip(tmp_path, image_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq

  folder, files = image_dir
  rows = [
    {'path': name, 'text': f'a photo, number {i}', 'key': f'k{i}'} for i, name in enumerate(files)
  ]
  with open(tmp_path / 'pairs.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['path', 'text', 'key'])
    writer.writeheader()
    writer.writerows(rows)
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'pairs.parquet')
  for table in ('pairs.csv', 'pairs.parquet'):
    items = captions.items_from_rows(
      captions.read_table(str(tmp_path / table)), folder, table, 'path', 'text', 'key'
    )
    out = str(tmp_path / table.replace('.', '_'))
    records.write_dataset(
      items,
      common.FileRecords(),
      out,
      'train',
      records_per_shard=4,
      describe=common.FileItem.describe,
    )
    got = read_all(out)
    assert [r['id'] for r in got] == [r['key'] for r in rows]
    assert [r['image'] for r in got] == list(files.values())
    assert [r['conversations'] for r in got] == [
      common.caption_conversation(r['text']) for r in rows
    ]
  with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]"):
    captions.items_from_rows(rows, folder, 'pairs.csv', 'path', 'caption')


def test_rerun_is_idempotent_and_rewrites_only_changed_shards(tmp_path, image_dir):
  folder, files = image_dir
  rows = [{'image': name, 'caption': f'c{i}'} for i, name in enumerate(files)]
  out = str(tmp_path / 'out')

  def convert():
    items = captions.items_from_rows(rows, folder, 'rows')
    return records.write_dataset(
      items, common.FileRecords(), out, 'train', num_shards=3, describe=common.FileItem.describe
    )

  first = convert()
  paths = [os.path.join(out, s['file']) for s in first['shards']]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]
  assert convert() == first and [os.stat(p).st_mtime_ns for p in paths] == mtimes
  changed = list(files)[-1]  # In the last shard.
  write_image(os.path.join(folder, changed), (9, 9), 'PNG', 99)
  third = convert()
  assert [os.stat(p).st_mtime_ns for p in paths[:2]] == mtimes[:2]
  assert third['shards'][2]['sha256'] != first['shards'][2]['sha256']
  with open(os.path.join(folder, changed), 'rb') as f:
    assert read_all(out)[-1]['image'] == f.read()
  items = captions.items_from_rows(rows, folder, 'rows')
  records.write_dataset(
    items, common.FileRecords(), out, 'train', num_shards=2, describe=common.FileItem.describe
  )  # Re-sharded: old shards removed.
  assert sorted(f for f in os.listdir(out) if f.endswith('.array_record')) == [
    records.shard_name('train', k, 2) for k in range(2)
  ]
  assert len(read_all(out)) == len(rows)


def test_record_serialisation_rejects_bad_fields():
  with pytest.raises(ValueError, match='image must be encoded bytes'):
    records.serialize({'id': 'x', 'image': np.zeros((2, 2, 3), np.uint8), 'conversations': []})
  with pytest.raises(ValueError, match=r"unknown fields \['caption'\]"):
    records.serialize({'id': 'x', 'caption': 'a', 'conversations': []})
  with pytest.raises(ValueError, match='undecodable record'):
    records.deserialize(b'\x01\x02')


def test_tfds_builder_and_source_round_trip(tmp_path, image_dir):
  from evejax.data import tfds_source

  folder, files = image_dir
  rows = [{'image': name, 'caption': f'c{i}'} for i, name in enumerate(files)]
  out = str(tmp_path / 'converted')
  records.write_dataset(
    captions.items_from_rows(rows, folder, 'rows'),
    common.FileRecords(),
    out,
    'train',
    num_shards=2,
    describe=common.FileItem.describe,
  )
  data_dir = str(tmp_path / 'tfds')
  builder = tfds_source.EvejaxRecords(records_dir=out, data_dir=data_dir)
  builder.download_and_prepare()
  source = tfds_source.TfdsSource('evejax_records', data_dir, 'train')
  want = {r['id']: r for r in read_all(out)}
  got = {source[i]['id']: source[i] for i in range(len(source))}
  assert got == want
  assert source.location(2) == {'shard': 'tfds:evejax_records/train', 'index': 2}
  with pytest.raises(ValueError, match="cannot open TFDS dataset 'evejax_records' split 'test'"):
    tfds_source.TfdsSource('evejax_records', data_dir, 'test')
