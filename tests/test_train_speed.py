"""benchmarks/train_speed.py runs on CPU with shrunk presets (the CI smoke test of the GPU table):
every routing x attention variant compiles, trains and prints a full row."""

import dataclasses
import importlib.util
import pathlib

import pytest

from evejax.batch import BatchSpec
from evejax.metrics import flops
from evejax.models import ModelConfig
from evejax.models.presets import model_preset

SCRIPT = pathlib.Path(__file__).parents[1] / 'benchmarks' / 'train_speed.py'


@pytest.fixture(scope='module')
def train_speed():
  spec = importlib.util.spec_from_file_location('train_speed', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
  'attention',
  ['xla', pytest.param('fused,xla', marks=pytest.mark.slow)],  # fused: Pallas interpret mode
)
def test_table_on_cpu(train_speed, capsys, attention):
  train_speed.main(
    '--presets=eve_v2_0.5b --shrink=14 --seq_len=128 --rows=1 --examples=2 --steps=1 --warmup=0'
    f' --dtype=float32 --attention={attention}'.split()
  )
  table = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| eve_v2')]
  variants = {tuple(cell.strip() for cell in line.split('|')[2:4]) for line in table}
  implementations = [a.replace('fused', 'pallas') for a in attention.split(',')]
  assert variants == {(r, a) for r in ('sorted', 'select') for a in implementations}, table
  for line in table:
    cells = [cell.strip() for cell in line.strip('|').split('|')]
    assert len(cells) == 9, line  # no 'failed: ...' row
    tokens_s, tflops, mfu, ms = float(cells[3].replace(',', '')), float(cells[4]), *cells[5:7]
    assert mfu == '-'  # CPU: no peak FLOP/s, no MFU
    assert tokens_s == pytest.approx(128 / (float(ms) / 1e3), rel=0.02)
    assert tokens_s > 0 and tflops >= 0


def test_useful_flops_count_one_branch(train_speed):
  """MFU's numerator: sorted's analytic FLOPs with causal attention halved; select's FLOPs (both
  branches) are larger, so MFU never credits the redundant branch."""
  cfg = train_speed.shrunk(ModelConfig(**model_preset('eve_v2_0.5b')), 14)
  spec = BatchSpec.for_model(cfg, seq_len=256, patch_slots=128)
  useful = train_speed.useful_flops(cfg, spec, 2)
  select = flops.forward_flops(dataclasses.replace(cfg, routing='select'), spec, 2)
  sorted_ = flops.forward_flops(dataclasses.replace(cfg, routing='sorted'), spec, 2)
  assert useful == pytest.approx(
    3 * (sum(sorted_.values()) - sorted_['attention'] / 2) - sorted_['vision_patch']
  )
  assert useful < 3 * sum(select.values())
