"""`python -m evejax.plan`: AOT compile on fake devices, per-device memory table, FLOPs, HBM fit."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = __file__.rsplit('/tests/', 1)[0]
MiB = 2**20


def plan_command(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.plan',
      '--config=configs/demo.py',
      '--devices=8',
      '--config.batch_size=8',
      '--config.model.num_layers=2',
      *args,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def run_plan(*args):
  result = plan_command(*args)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def row(text, label):
  return (
    float(re.search(rf'\| {re.escape(label)}\s+\|\s+[\d.]+ \|\s+([\d.]+) \|', text).group(1)) * MiB
  )


@pytest.fixture(scope='module')
def fsdp_plan():
  # param_dtype: a model field that configs/demo.py leaves at its default (float32).
  return run_plan('--mesh=fsdp=8', '--hbm_gib=0.001', '--config.model.param_dtype=float32')


def expected_param_bytes_per_device(devices=8):
  """Independent count: a parameter whose logical axes include `embed` (-> fsdp) is split
  `devices` ways, any other one (norms, the vision tower's patch axes) is whole on every device."""
  import dataclasses
  import runpy

  from flax import nnx

  from evejax.models import EVE, ModelConfig

  config = runpy.run_path(os.path.join(REPO, 'configs/demo.py'))['get_config']()
  cfg = dataclasses.replace(ModelConfig.from_dict(config.model), num_layers=2)
  state = nnx.state(nnx.eval_shape(lambda: EVE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  total = 0
  for _, var in nnx.to_flat_state(state):
    size = var.size * var.dtype.itemsize
    axes = var.get_metadata().get('out_sharding') or ()  # the logical axis names
    total += size // devices if 'embed' in axes else size
  return total


def test_plan_reports_sharded_memory_and_fit(fsdp_plan):
  assert "Mesh {'data': 1, 'fsdp': 8, 'tensor': 1} = 8 devices" in fsdp_plan
  params = row(fsdp_plan, 'parameters')
  assert params == pytest.approx(expected_param_bytes_per_device(), rel=0.01)
  assert row(fsdp_plan, 'optimizer state') == pytest.approx(2 * params, rel=0.02)  # Adam mu, nu
  assert row(fsdp_plan, 'total (peak estimate)') > 3 * params
  assert 'DOES NOT FIT' in fsdp_plan  # 0.001 GiB per chip is too small


def test_plan_rejects_an_unknown_model_field_naming_the_valid_ones():
  result = plan_command('--config.model.routin=sorted')
  assert result.returncode != 0
  assert "--config.model.routin: config.model has no key 'routin'" in result.stderr
  assert "'routing'" in result.stderr and "'param_dtype'" in result.stderr  # Defaults included.


def test_plan_flops_match_the_analytic_count(fsdp_plan):
  xla, analytic = map(
    float, re.search(r'XLA cost analysis ([\d.e+]+) .* analytic ([\d.e+]+)', fsdp_plan).groups()
  )
  assert 0.9 <= xla / analytic <= 1.3  # matmuls dominate; XLA also counts elementwise ops


@pytest.mark.slow  # three compiles
def test_plan_scanned_flops_count_every_layer():
  text = run_plan(
    '--mesh=data=2,fsdp=4',
    '--config.model.scan_layers=True',
    '--config.model.remat=full',
    '--hbm_gib=95',
  )
  assert 'FITS: ' in text
  xla, analytic = map(
    float, re.search(r'XLA cost analysis ([\d.e+]+) .* analytic ([\d.e+]+)', text).groups()
  )
  assert 0.9 <= xla / analytic <= 1.6  # full remat recomputes the forward pass


@pytest.mark.slow  # the TPU compiler (libtpu, the `tpu` extra) on this host: ~1 min
def test_plan_compiles_with_the_tpu_compiler(tmp_path):
  pytest.importorskip('libtpu')
  out = tmp_path / 'plan.json'
  text = run_plan(
    '--topology=v5e-8', '--mesh=fsdp=8', '--config.model.param_dtype=float32', f'--json={out}'
  )
  assert '8 devices (TPU v5 lite)' in text and 'attention pallas' in text  # splash, per device
  assert 'FITS: ' in text and 'of 16 GiB per chip' in text  # v5e's HBM
  result = json.loads(out.read_text())
  assert result['params'] == pytest.approx(expected_param_bytes_per_device(), rel=0.01)
  # The compiler's arguments: the same buffers, at most padded to the TPU's tiled layouts.
  assert result['params'] + result['opt_state'] + result['batch'] <= result['arguments']
  assert result['arguments'] < 1.5 * (result['params'] + result['opt_state'] + result['batch'])
  assert result['generated_code'] > 0 and result['temporaries'] > 0


@pytest.mark.slow  # the TPU compiler on this host: ~1 min
def test_plan_reports_a_program_the_tpu_compiler_refuses_for_hbm():
  pytest.importorskip('libtpu')
  # An 8M-token vocabulary replicated on every chip: ~23 GiB of parameters and Adam state alone.
  text = run_plan('--topology=v5e-8', '--mesh=data=8', '--config.model.vocab_size=8000000')
  assert 'DOES NOT FIT: ' in text
  assert 'The TPU compiler refused the program: RESOURCE_EXHAUSTED' in text
  assert float(re.search(r'DOES NOT FIT: ([\d.]+) GiB of 16 GiB', text).group(1)) > 23
