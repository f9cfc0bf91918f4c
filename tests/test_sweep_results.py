"""Sweep results: the seed axis, mean/std over seeds in CSV and JSON, learning curves and bars."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evejax import sweep, sweep_results
from evejax.metrics.writers import MetricWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('eval/loss', 'eval/accuracy')

SWEEP_CONFIG = """
import runpy
_demo = runpy.run_path({demo!r})['get_config']


def get_config(arg=None):
  config = _demo(arg)
  config.model.num_layers = 1
  config.data.update(num_train=200, num_eval=8)
  config.total_steps = 2
  config.log_every = 1
  config.eval_every = 1
  return config


def sweep(add):
  add(**{{'optim.lr': 1e-3}})
  add(**{{'optim.lr': 3e-3}})
  add(**{{'optim.lr': 1e-2}})
"""


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'sweep_config.py'
  path.write_text(SWEEP_CONFIG.format(demo=os.path.join(REPO, 'configs', 'demo.py')))
  return str(path)


def _sweep(config_file, workdir, *flags):
  return subprocess.run(
    [sys.executable, '-m', 'evejax.sweep', f'--config={config_file}', f'--workdir={workdir}']
    + list(flags),
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
  ).stdout


def test_seeds_repeat_every_run_with_the_seed_keys(config_file, tmp_path):
  runs = sweep.expand(config_file, str(tmp_path), {'total_steps': 5}, seeds=(0, 7))
  assert [(r.index, r.variant, r.name.rsplit('/', 1)[1]) for r in runs] == [
    (i, f'{i:02d}_lr={lr}', f'seed{s}') for i, lr in enumerate((0.001, 0.003, 0.01)) for s in (0, 7)
  ]
  assert runs[3].overrides == {'total_steps': 5, 'optim.lr': 0.003, 'seed': 7, 'data.seed': 7}
  assert runs[3].workdir == str(tmp_path / '01_lr=0.003' / 'seed7')
  listed = _sweep(config_file, tmp_path, '--seeds=0,7', '--runs=2').splitlines()
  assert [line.split('\t')[0] for line in listed] == ['02_lr=0.01/seed0', '02_lr=0.01/seed7']


def test_results_mode_writes_mean_and_std_over_seeds_and_plots(config_file, tmp_path):
  """Metrics written by the trainer's writer for 2 variants x 3 seeds (the last seed of the second
  stopped half-way, the third variant never started); the files hold numpy's mean and sample std
  of each variant's last values over its finished runs."""
  rng = np.random.default_rng(0)
  runs = sweep.expand(config_file, str(tmp_path), seeds=(0, 1, 2))
  finals = {}
  for run in runs[:6]:
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
      json.dump({'total_steps': 10}, f)  # The trainer writes it first: the start of its wall time.
    writer = MetricWriter(run.workdir)
    for step in (0, 5, 10) if run is not runs[5] else (0, 5):
      values = {'eval/loss': rng.uniform(1, 2), 'eval/accuracy': rng.uniform(0, 1)}
      writer.write(step, {'train/loss': rng.uniform(1, 2)} if step else {})
      writer.write(step, values)
    writer.close()
    finals[run.name] = values
  out = tmp_path / 'report'
  stdout = _sweep(
    config_file,
    tmp_path,
    '--seeds=0,1,2',
    '--runs=0,1',
    '--mode=results',
    '--plot',
    f'--keys={",".join(KEYS)}',
    '--curves=eval/accuracy,train/loss',
    f'--out={out}',
  )
  assert f'wrote {out / "results.csv"}' in stdout and f'wrote {out / "final.png"}' in stdout

  expected = {}
  for variant, names in (('00_lr=0.001', runs[0:3]), ('01_lr=0.003', runs[3:5])):
    values = np.asarray([[finals[r.name][k] for k in KEYS] for r in names])
    expected[variant] = (len(names), values.mean(0), values.std(0, ddof=1))

  with open(out / 'results.json') as f:
    summary = json.load(f)
  assert summary['keys'] == list(KEYS)
  assert [v['variant'] for v in summary['variants']] == list(expected)
  for variant in summary['variants']:
    seeds, mean, std = expected[variant['variant']]
    assert variant['seeds'] == seeds and variant['steps'] == [10] * seeds
    assert variant['overrides'] == {'optim.lr': float(variant['variant'].split('=')[1])}
    assert variant['unfinished'] == ([runs[5].name] if variant is summary['variants'][1] else [])
    for i, key in enumerate(KEYS):
      assert variant['metrics'][key]['mean'] == pytest.approx(mean[i], rel=1e-12)
      assert variant['metrics'][key]['std'] == pytest.approx(std[i], rel=1e-12)

  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['variant'] for row in rows] == list(expected)
  for row in rows:
    seeds, mean, std = expected[row['variant']]
    assert int(row['seeds']) == seeds and int(row['step']) == 10 and float(row['wall_s']) >= 0
    for i, key in enumerate(KEYS):
      assert float(row[f'{key} mean']) == pytest.approx(mean[i], rel=1e-5)
      assert float(row[f'{key} std']) == pytest.approx(std[i], rel=1e-5)

  for name in ('curves.png', 'final.png'):
    with Image.open(out / name) as image:
      pixels = np.asarray(image.convert('RGB'))
    assert image.format == 'PNG' and min(pixels.shape[:2]) > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # Drawn, not blank.


def test_curves_average_the_steps_every_seed_logged(tmp_path):
  runs = []
  for seed, points in enumerate(({0: 1.0, 5: 3.0}, {0: 2.0, 5: 5.0, 9: 1.0})):
    run = sweep.Run(f'v/seed{seed}', {}, str(tmp_path / str(seed)), 0, 'v')
    writer = MetricWriter(run.workdir)
    for step, value in points.items():
      writer.write(step, {'eval/loss': value})
    writer.close()
    runs.append(run)
  steps, mean, std = sweep_results._curve(runs, 'eval/loss')
  np.testing.assert_array_equal(steps, [0, 5])
  np.testing.assert_allclose(mean, [1.5, 4.0])
  np.testing.assert_allclose(std, [np.std([1, 2], ddof=1), np.std([3, 5], ddof=1)])
  assert sweep_results.history(str(tmp_path / 'never')) == []


@pytest.mark.slow
def test_seeded_sweep_trains_then_reports(config_file, tmp_path):
  """The whole path on real runs: one variant, two seeds, trained, then results and plots."""
  _sweep(config_file, tmp_path, '--seeds=0,1', '--runs=0', '--mode=run')
  _sweep(config_file, tmp_path, '--seeds=0,1', '--runs=0', '--mode=results', '--plot')
  with open(tmp_path / 'results.json') as f:
    (variant,) = json.load(f)['variants']
  losses = [
    read_jsonl(str(tmp_path / '00_lr=0.001' / f'seed{s}' / 'metrics.jsonl'))[-1]['eval/loss']
    for s in (0, 1)
  ]
  assert variant['seeds'] == 2 and losses[0] != losses[1]  # The seeds differ.
  assert variant['metrics']['eval/loss']['mean'] == pytest.approx(np.mean(losses))
  assert (tmp_path / 'curves.png').stat().st_size > 0
