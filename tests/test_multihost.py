"""Two local processes (jax.distributed on 127.0.0.1, 2 CPU devices each) train on one 4-device
global mesh, each feeding only its own rows, and match the single-process result; two processes
with one device each are preempted through the CLI and resume bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_resume import logged_losses
from test_sharding import TOLERANCE, reference_setup, tiny_config, train_two_steps

from evejax import sharding
from evejax.convert import checkpoints

REPO = __file__.rsplit('/tests/', 1)[0]
# Within a process ("slice"), fsdp over its 2 devices; data across the 2 processes (DCN).
MESH = {'fsdp': -1, 'dcn': {'data': 2}}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_incomplete_settings_are_rejected(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.distributed.initialize({})  # single process: nothing to join
  with pytest.raises(ValueError, match='Incomplete multi-process settings.*JAX_PROCESS_ID'):
    sharding.distributed.initialize({'coordinator_address': '127.0.0.1:1', 'num_processes': 2})
  with pytest.raises(ValueError, match=r"config.distributed has unknown keys \['port'\]"):
    sharding.distributed.initialize({'port': 1})


@pytest.mark.slow  # ~30 s of CPU (three compiles); run with -m slow
def test_two_processes_match_one():
  port = free_port()
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO,
    JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
    JAX_NUM_PROCESSES='2',
  )
  procs = [
    subprocess.Popen(
      [sys.executable, __file__],
      cwd=REPO,
      text=True,
      env=dict(env, JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  got = json.loads(outputs[0][0].strip().splitlines()[-1])
  assert got['process_count'] == 2 and got['device_count'] == 4 and got['local_rows'] == 4
  assert got['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1}

  cfg = tiny_config()
  init, batches = reference_setup(cfg)
  one = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  losses, params, _, _ = train_two_steps(cfg, one, init, batches)
  np.testing.assert_allclose(got['losses'], losses, rtol=TOLERANCE)
  flat = jax.tree.leaves(params)
  np.testing.assert_allclose(
    got['param_sums'], [float(np.sum(p)) for p in flat], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    got['param_abs_max'], [float(np.abs(p).max()) for p in flat], rtol=TOLERANCE
  )


CLI_STEPS = 10
CLI_FLAGS = [
  '--config=configs/demo.py',
  f'--config.total_steps={CLI_STEPS}',
  '--config.log_every=1',
  '--config.eval_every=1000',
  '--config.data.num_eval=8',
  '--config.data.num_train=400',
  '--config.model.num_layers=1',
  '--config.batch_size=4',
  '--config.checkpoint.every=4',
]


def start_pair(workdir) -> list[subprocess.Popen]:
  """The trainer CLI as 2 processes of one job, one CPU device each (as one GPU per process)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    JAX_NUM_PROCESSES='2',
    PYTHONPATH=REPO,
    JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{free_port()}',
  )
  env.pop('XLA_FLAGS', None)
  return [
    subprocess.Popen(
      [sys.executable, '-m', 'evejax.train', *CLI_FLAGS, f'--workdir={workdir}'],
      cwd=REPO,
      env=dict(env, JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


def finish(pair) -> list[str]:
  """Waits for both processes; each must exit 0. Returns their stderr."""
  errors = [p.communicate(timeout=300)[1] for p in pair]
  for p, err in zip(pair, errors):
    assert p.returncode == 0, err[-4000:]
  return errors


def saved_params(workdir, step):
  """A 2-process checkpoint's parameters, restored onto this process's one device."""
  return jax.tree.leaves(
    checkpoints.load_params(os.path.join(workdir, 'checkpoints', str(step)))[0]
  )


def test_two_processes_preempted_resume_bit_for_bit(tmp_path):
  """SIGTERM to both processes: JAX's preemption sync point makes them save the same step and exit
  0; the same command resumes. Losses and final parameters equal an uninterrupted 2-process run."""
  baseline_dir, workdir = tmp_path / 'baseline', tmp_path / 'preempted'
  finish(start_pair(baseline_dir))

  pair = start_pair(workdir)
  deadline = time.time() + 240
  while max(logged_losses(workdir), default=0) < 2:
    assert all(p.poll() is None for p in pair) and time.time() < deadline
    time.sleep(0.05)
  for p in pair:
    p.send_signal(signal.SIGTERM)
  errors = finish(pair)
  assert all('Preempted: saved checkpoint' in err for err in errors)
  stopped = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())[-1]
  assert 2 <= stopped < CLI_STEPS

  errors = finish(start_pair(workdir))
  assert all('Resumed from checkpoint' in err for err in errors)
  expected = logged_losses(baseline_dir)
  assert sorted(expected) == list(range(1, CLI_STEPS + 1))
  assert logged_losses(workdir) == expected  # Every step, bitwise.
  for got, want in zip(
    saved_params(workdir, CLI_STEPS), saved_params(baseline_dir, CLI_STEPS), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def worker():
  """One process of the pair: joins, feeds its half of every batch, reports from process 0."""
  from jax.experimental import multihost_utils

  assert sharding.distributed.initialize()
  cfg = tiny_config()
  init, batches = reference_setup(cfg)
  mesh = sharding.make_mesh(MESH)
  rows = sharding.distributed.process_rows(len(batches[0]['tokens']))
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  local = [{k: v[mine] for k, v in b.items()} for b in batches]
  losses, _, _, arrays = train_two_steps(cfg, mesh, init, local)
  params = [multihost_utils.process_allgather(p, tiled=True) for p in jax.tree.leaves(arrays)]
  if sharding.distributed.is_main():
    print(
      json.dumps(
        dict(
          losses=losses,
          process_count=jax.process_count(),
          device_count=jax.device_count(),
          local_rows=rows,
          mesh=dict(mesh.shape),
          param_sums=[float(np.sum(p)) for p in params],
          param_abs_max=[float(np.abs(p).max()) for p in params],
        )
      )
    )


if __name__ == '__main__':
  worker()
