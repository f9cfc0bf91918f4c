"""Preemption and exact resume through the CLI: SIGTERM saves the current step and exits 0; after a
SIGKILL the same command continues; the losses and final parameters equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = __file__.rsplit('/tests/', 1)[0]
TOTAL_STEPS = 12
FLAGS = [
  '--config=configs/demo.py',
  f'--config.total_steps={TOTAL_STEPS}',
  '--config.log_every=1',
  '--config.eval_every=1000',
  '--config.data.num_eval=8',
  '--config.data.num_train=400',
  '--config.model.num_layers=1',
  '--config.batch_size=4',
  '--config.checkpoint.every=3',
  '--config.checkpoint.keep_last=3',
]


def start(workdir, *extra) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'evejax.train', *FLAGS, *extra, f'--workdir={workdir}'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def logged_losses(workdir) -> dict[int, float]:
  """step -> train loss; the last line wins where a resumed run logged a step again."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith('\n')]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def wait_for_step(process, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while max(logged_losses(workdir), default=0) < step:
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f'step {step} not reached in {timeout}s'
    time.sleep(0.05)


def final_params(workdir):
  path = os.path.join(workdir, 'checkpoints', str(TOTAL_STEPS), 'params')
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path))


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  baseline_dir, workdir = tmp_path / 'baseline', tmp_path / 'interrupted'
  baseline = start(baseline_dir)  # Runs alongside the interrupted one.

  run = start(workdir)
  wait_for_step(run, workdir, 4)
  run.send_signal(signal.SIGTERM)
  _, stderr = run.communicate(timeout=120)
  assert run.returncode == 0, stderr[-3000:]
  stopped = max(logged_losses(workdir))
  assert stopped < TOTAL_STEPS and 'Preempted: saved checkpoint' in stderr
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps[-1] == stopped  # The step it was in, not the last interval's.

  run = start(workdir)
  wait_for_step(run, workdir, stopped + 3)
  run.kill()  # SIGKILL: no handler runs, an async save may be cut half-way.
  run.wait()
  killed = max(logged_losses(workdir))

  run = start(workdir)
  _, stderr = run.communicate(timeout=240)
  assert run.returncode == 0, stderr[-3000:]
  assert 'Resumed from checkpoint' in stderr
  _, stderr = baseline.communicate(timeout=240)
  assert baseline.returncode == 0, stderr[-3000:]

  expected, resumed = logged_losses(baseline_dir), logged_losses(workdir)
  assert sorted(expected) == list(range(1, TOTAL_STEPS + 1)) and killed < TOTAL_STEPS
  assert resumed == expected  # Every step, bitwise (float32 values survive JSON exactly).
  for got, want in zip(final_params(workdir), final_params(baseline_dir), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_init_from_cli_loads_weights_and_reports(tmp_path):
  """Stage 2 from stage 1 with one more layer: shared weights load, the new layer is reported."""

  def run(workdir, *flags):
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'evejax.train',
        *FLAGS,
        '--config.total_steps=1',
        *flags,
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

  run(tmp_path / 'stage1', '--config.optim.warmup_steps=0')  # Changes the weights.
  run(tmp_path / 'stage2', f'--config.init_from={tmp_path}/stage1', '--config.model.num_layers=2')
  with open(tmp_path / 'stage2' / 'init_from_report.json') as f:
    report = json.load(f)
  assert report['dropped'] == [] and report['new'] and report['loaded']
  assert all(name.startswith('layers/1/') for name in report['new'])
  assert {'embed_tokens/embedding', 'layers/0/mlp/up_proj/kernel'} <= set(report['loaded'])
  # Warm-up starts at lr 0, so stage 2's first step leaves the loaded weights as they were.
  load = lambda d: ocp.StandardCheckpointer().restore(f'{d}/checkpoints/1/params')
  stage1, stage2 = load(tmp_path / 'stage1'), load(tmp_path / 'stage2')
  for name in report['loaded']:
    keys = name.split('/')
    np.testing.assert_array_equal(_get(stage2, keys), _get(stage1, keys))


def _get(tree, keys):
  for key in keys:
    tree = tree[key]
  return np.asarray(tree)
