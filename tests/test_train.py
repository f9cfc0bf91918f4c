"""End-to-end: the training CLI learns on the embedded data and writes its metrics."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

REPO = __file__.rsplit('/tests/', 1)[0]


def read_events(path):
  """Scalars from a TensorBoard event file, parsed from its record framing."""
  scalars = {}
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset : offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py',
      f'--workdir={workdir}',
      '--config.total_steps=40',
      '--config.log_every=10',
      '--config.eval_every=20',
      '--config.data.num_eval=64',
      '--config.model.num_layers=2',
      # Faster than the demo's recipe, so that 40 steps halve the loss.
      '--config.optim.lr=2e-3',
      '--config.optim.warmup_steps=10',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_cli_trains_and_reports(short_run):
  workdir, result = short_run
  assert 'Held-out caption/answer token accuracy:' in result.stdout
  assert 'steps/s' in result.stderr and 'ETA' in result.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train] == [10, 20, 30, 40]
  assert train[-1]['train/loss'] < 0.5 * train[0]['train/loss']
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [20, 40] and 0 < evals[-1]['eval/accuracy'] <= 1
  assert os.path.exists(os.path.join(workdir, 'tokenizer.json'))


def test_tensorboard_events_match_jsonl(short_run):
  workdir, _ = short_run
  (event_file,) = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  scalars = read_events(event_file)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  want = [(r['step'], r['train/loss']) for r in rows if 'train/loss' in r]
  got = scalars['train/loss']
  assert [s for s, _ in got] == [s for s, _ in want]
  assert all(abs(a - b) < 1e-5 * max(1, abs(b)) for (_, a), (_, b) in zip(got, want))
  assert {'eval/accuracy', 'train/learning_rate', 'train/grad_norm', 'compile_time_s'} <= set(
    scalars
  )


def test_a_dataset_without_a_held_out_split_trains(tmp_path, caplog):
  """Converted records with only a train split: the run trains and says it skips evaluation."""
  from configs import demo
  from evejax.data import records
  from evejax.data.shapes import ShapesDataset
  from evejax.train.trainer import train

  dataset = ShapesDataset(16, seed=2)
  records.write_dataset(
    list(range(16)),
    dataset.__getitem__,
    str(tmp_path / 'data'),
    'train',
    info={'corpus': dataset.corpus()},
  )
  config = demo.get_config()
  config.data.update(source='records', path=str(tmp_path / 'data'), pack_window=4)
  config.model.num_layers = 1
  config.update(total_steps=2, log_every=1, batch_size=2)
  final = train(config, str(tmp_path / 'run'))
  assert final['train/loss'] > 0 and not any(k.startswith('eval/') for k in final)
  assert "has no split 'eval'" in caplog.text and 'without held-out evaluation' in caplog.text
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f if 'train/loss' in line] == [1, 2]


def test_itstime_decides_every_periodic_action():
  from evejax.train.cadence import itstime

  due = lambda every, **kw: [s for s in range(1, 11) if itstime(s, every, 10, **kw)]
  assert due(4) == [4, 8, 10]  # every 4 steps, and the last
  assert due(4, first=True) == [1, 4, 8, 10]  # checkpoints: the first step too
  assert due(0) == [10] and due(0, last=False) == []  # 0 = never periodically
