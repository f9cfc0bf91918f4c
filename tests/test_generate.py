"""End-to-end: a checkpoint written by the training CLI answers through the generate and evaluation
CLIs, with the training run's tokenizer, template and preprocessing."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from evejax.data import pipeline
from evejax.data.shapes import ShapesDataset
from evejax.data.tokenizer import Tokenizer
from evejax.evaluation import converters
from evejax.evaluation.records import write_jsonl
from evejax.inference import SamplingConfig
from evejax.inference.assistant import Assistant, load_checkpoint
from evejax.models import EVE, ModelConfig

# A training run (data cache, compile, checkpoint) plus three CLI processes: ~1 minute.
pytestmark = pytest.mark.slow
REPO = __file__.rsplit('/tests/', 1)[0]
TRAIN_OVERRIDES = [
  '--config.total_steps=1',
  '--config.data.num_eval=8',
  '--config.eval_every=1',
  '--config.model.num_layers=1',
]


def run_cli(*args):
  result = subprocess.run(
    [sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A one-step run that also answers a small benchmark file while training."""
  workdir = tmp_path_factory.mktemp('run')
  bench = workdir / 'bench' / 'shapes.jsonl'
  write_jsonl(str(bench), converters.shapes(ShapesDataset(4, seed=7), str(bench.parent / 'images')))
  run_cli(
    'evejax.train',
    '--config=configs/demo.py',
    f'--workdir={workdir}',
    *TRAIN_OVERRIDES,
    f'--config.benchmark.file={bench}',
    '--config.benchmark.max_new_tokens=4',
  )
  return workdir


def test_training_runs_the_benchmark(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  bench = [r for r in rows if 'bench/exact/accuracy' in r]
  assert len(bench) == 1 and bench[0]['step'] == 1 and bench[0]['bench/items'] == 4


def test_checkpoint_loads_with_the_training_setup(workdir):
  config, graphdef, params, tokenizer, *_ = load_checkpoint(str(workdir))
  assert config.model.num_layers == 1 and config.data.template == 'chat'
  expected = nnx.state(
    nnx.eval_shape(lambda: EVE(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(0))), nnx.Param
  )
  assert [x.shape for x in jax.tree.leaves(params)] == [
    x.shape for x in jax.tree.leaves(nnx.to_pure_dict(expected))
  ]
  assert tokenizer.backend.to_str() == Tokenizer.load(str(workdir)).backend.to_str()
  # The same answer through the Assistant built from the checkpoint and from these params.
  assistant = Assistant.from_checkpoint(str(workdir))
  again = Assistant.from_params(config, graphdef, params, tokenizer)
  _, held_out = pipeline.make_sources(config.data)
  record = held_out[0]
  question = record['conversations'][0]['value']
  sampling = SamplingConfig(max_new_tokens=4)
  answer = assistant.answer([assistant.encode(question, record['image'])], sampling)
  assert answer == again.answer([again.encode(question, record['image'])], sampling)
  assert assistant.max_length == config.data.seq_len


def test_generate_and_evaluation_clis(workdir, tmp_path):
  bench = tmp_path / 'shapes.jsonl'
  run_cli(
    'evejax.evaluation.convert',
    '--format=shapes',
    '--config=configs/demo.py',
    '--limit=6',
    f'--out={bench}',
  )
  with open(bench) as f:
    items = [json.loads(line) for line in f]
  first = items[0]
  result = run_cli(
    'evejax.generate',
    f'--checkpoint={workdir}',
    f'--image={first["image"]}',
    f'--prompt={first["question"]}',
    '--max_new_tokens=5',
  )
  assert result.stdout.endswith('\n') and len(result.stdout.strip()) > 0

  bad = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.generate',
      f'--checkpoint={workdir}',
      f'--image={tmp_path / "nope.png"}',
      '--prompt=what?',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode != 0 and 'nope.png' in bad.stderr

  out = tmp_path / 'eval'
  result = run_cli(
    'evejax.evaluation',
    f'--checkpoint={workdir}',
    f'--benchmark={bench}',
    f'--output={out}',
    '--max_new_tokens=6',
    '--batch_size=4',
  )
  assert '| exact/accuracy |' in result.stdout
  assert re.search(r'evaluation: item \d+/\d+ \| .* items/s \| ETA', result.stderr)
  assert '| eval | exact/accuracy |' in (out / 'results.md').read_text()
  assert (out / 'categories.png').read_bytes()[:4] == b'\x89PNG'  # Per question kind.
  with open(out / 'metrics.json') as f:
    metrics = json.load(f)
  with open(out / 'predictions.jsonl') as f:
    predictions = [json.loads(line) for line in f]
  assert metrics['items'] == len(items) >= 6 and len(predictions) == len(items)
  assert 0 <= metrics['exact/accuracy'] <= 1
  assert metrics['exact/accuracy'] == pytest.approx(
    np.mean(
      [
        p['prediction'].strip().lower().rstrip('.') == p['answers'][0].lower().rstrip('.')
        for p in predictions
      ]
    )
  )


def test_generate_cli_converses_over_stdin(workdir, tmp_path):
  """Questions from stdin: each answer sees the earlier turns, /reset forgets them."""
  config, *_ = load_checkpoint(str(workdir))
  _, held_out = pipeline.make_sources(config.data)
  record = held_out[0]
  image = tmp_path / 'image.png'
  image.write_bytes(record['image'])
  first, second = (
    turn['value'].replace('<image>', '').strip() for turn in record['conversations'][0:3:2]
  )
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.generate',
      f'--checkpoint={workdir}',
      f'--image={image}',
      '--max_new_tokens=5',
    ],
    input=f'{first}\n{second}\n/reset\n{second}\n',
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]

  assistant = Assistant.from_checkpoint(str(workdir))
  sampling = SamplingConfig(max_new_tokens=5)

  def answer(question, history=()):
    return assistant.answer(
      [assistant.encode(question, record['image'], history=history)], sampling
    )[0]

  answer_1 = answer(first)
  expected = [answer_1, answer(second, [(first, answer_1)]), answer(second)]
  assert result.stdout == ''.join(f'{a}\n' for a in expected)
  assert result.stderr.count('USER: ') == 5 and result.stderr.count('ASSISTANT: ') == 3
