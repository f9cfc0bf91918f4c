"""Two local processes (jax.distributed on 127.0.0.1, 2 CPU devices each) train on one 4-device
global mesh, each feeding only its own rows, and match the single-process result."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from evejax import sharding
from test_sharding import TOLERANCE, reference_setup, tiny_config, train_two_steps

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
  with pytest.raises(ValueError, match=r"Unknown config.distributed keys \['port'\]"):
    sharding.distributed.initialize({'port': 1})


@pytest.mark.slow  # ~30 s of CPU (three compiles); run with -m slow
def test_two_processes_match_one():
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2')
  procs = [subprocess.Popen([sys.executable, __file__], cwd=REPO, text=True,
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for i in range(2)]
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
  np.testing.assert_allclose(got['param_sums'], [float(np.sum(p)) for p in flat], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got['param_abs_max'], [float(np.abs(p).max()) for p in flat],
                             rtol=TOLERANCE)


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
    print(json.dumps(dict(
        losses=losses, process_count=jax.process_count(), device_count=jax.device_count(),
        local_rows=rows, mesh=dict(mesh.shape), param_sums=[float(np.sum(p)) for p in params],
        param_abs_max=[float(np.abs(p).max()) for p in params])))


if __name__ == '__main__':
  worker()
