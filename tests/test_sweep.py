"""Sweeps: expansion of sweep(add), launch commands, local runs and the results table."""

import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from evejax import sweep
from evejax.metrics.writers import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_CONFIG = """
import runpy
_demo = runpy.run_path({demo!r})['get_config']


def get_config(arg=None):
  config = _demo(arg)
  config.model.num_layers = 1
  config.data.update(num_train=300, num_eval=16)
  config.total_steps = 2
  config.log_every = 1
  config.eval_every = 2
  return config


def sweep(add):
  for lr in (1e-3, 3e-3):
    for blank in (False, True):
      add(**{{'optim.lr': lr, 'config.data.blank_images': blank}})
  add(**{{'optim.trainable': '^vision_tower/|/moe_ x'}})
"""


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'sweep_config.py'
  path.write_text(SWEEP_CONFIG.format(demo=os.path.join(REPO, 'configs', 'demo.py')))
  return str(path)


def test_expansion_counts_overrides_and_unique_workdirs(config_file, tmp_path):
  runs = sweep.expand(config_file, str(tmp_path / 'root'))
  assert len(runs) == 5
  assert [r.overrides for r in runs[:4]] == [
    {'optim.lr': lr, 'data.blank_images': blank} for lr in (1e-3, 3e-3) for blank in (False, True)
  ]
  assert len({r.workdir for r in runs}) == 5
  assert all(os.path.dirname(r.workdir) == str(tmp_path / 'root') for r in runs)
  assert runs[1].name == '01_lr=0.001-blank_images=True'


def test_unknown_override_names_the_run_and_key(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text(
    textwrap.dedent(f"""
      import runpy
      get_config = runpy.run_path({os.path.join(REPO, 'configs', 'demo.py')!r})['get_config']
      def sweep(add):
        add(**{{'optim.lr': 1e-3}})
        add(**{{'optim.lrr': 1e-3}})
      """)
  )
  with pytest.raises(ValueError, match=r"run 1: --config.optim.lrr: config.optim has no key 'lrr'"):
    sweep.expand(str(path), str(tmp_path))


@pytest.mark.parametrize('launcher', sorted(sweep.LAUNCHERS))
def test_commands_quote_overrides_for_each_launcher(config_file, tmp_path, launcher):
  run = sweep.expand(config_file, str(tmp_path / 'root dir'))[4]
  words = shlex.split(sweep.launch_command(run, config_file + ':blank=False', launcher))
  spec = config_file + ':blank=False'
  assert {spec, f'--config={spec}'} & set(words)
  assert {run.workdir, f'--workdir={run.workdir}'} & set(words)
  assert words[-1] == '--config.optim.trainable=^vision_tower/|/moe_ x'


def test_cli_lists_runs(config_file, tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.sweep',
      f'--config={config_file}',
      f'--workdir={tmp_path}',
      '--runs=0,3',
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
  ).stdout.splitlines()
  assert [line.split('\t')[0] for line in out] == [
    '00_lr=0.001-blank_images=False',
    '03_lr=0.003-blank_images=True',
  ]
  assert out[1].split('\t')[2] == '--config.optim.lr=0.003 --config.data.blank_images=True'


def test_cli_overrides_apply_to_every_run_and_unknown_ones_are_rejected(config_file, tmp_path):
  command = [
    sys.executable,
    '-m',
    'evejax.sweep',
    f'--config={config_file}:blank=True',
    f'--workdir={tmp_path}',
    '--mode=commands',
    '--config.total_steps=7',
  ]
  out = subprocess.run(
    command, capture_output=True, text=True, check=True, cwd=REPO
  ).stdout.splitlines()
  assert len(out) == 5
  for line, run in zip(out, sweep.expand(config_file, str(tmp_path))):
    words = shlex.split(line)
    assert words[:4] == ['python', '-m', 'evejax.train', f'--config={config_file}:blank=True']
    assert words[5:] == ['--config.total_steps=7', *run.flags()]  # The run's own come last.
    assert words[4] == f'--workdir={run.workdir}'  # Named by its own overrides only.
  bad = subprocess.run(
    [*command[:-1], '--config.optim.lrr=1'], capture_output=True, text=True, cwd=REPO
  )
  assert bad.returncode != 0
  assert "Invalid command line: --config.optim.lrr: config.optim has no key 'lrr'" in bad.stderr


def test_local_runs_and_results_table_from_their_metrics(config_file, tmp_path):
  runs = sweep.expand(config_file, str(tmp_path))[2:4]  # The second is never run.
  finals = sweep.run_locally(runs[:1], config_file)
  table = sweep.results_table(runs).splitlines()
  assert table[0].split() == ['run', 'step', *sweep.RESULT_KEYS]
  records = read_jsonl(os.path.join(runs[0].workdir, 'metrics.jsonl'))
  last = {k: r[k] for r in records for k in r}
  assert table[1].split() == [runs[0].name, '2', *(f'{last[k]:.4f}' for k in sweep.RESULT_KEYS)]
  assert last['eval/loss'] == pytest.approx(finals[runs[0].name]['eval/loss'])
  assert table[2].split() == [runs[1].name, 'not', 'started', '-', '-', '-']
