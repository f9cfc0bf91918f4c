"""TPU slice names -> libtpu topologies (evejax/sharding/topology.py), without libtpu."""

import sys

import pytest
from absl import app

from evejax.cli import parse_mesh
from evejax.sharding import topology

# Cloud TPU's slice shapes for these names (the documented v4 / v5p / v5e / v6e tables, which
# MaxText's accelerator_to_spec_map also lists), as libtpu's topology names.
CLOUD = {
  'v4-8': 'v4:2x2x1',
  'v4-16': 'v4:2x2x2',
  'v4-128': 'v4:4x4x4',
  'v4-1024': 'v4:8x8x8',
  'v5p-8': 'v5:2x2x1',
  'v5p-64': 'v5:2x4x4',
  'v5p-256': 'v5:4x4x8',
  'v5p-512': 'v5:4x8x8',
  'v5e-1': 'v5e:1x1',
  'v5e-4': 'v5e:2x2',
  'v5e-8': 'v5e:2x4',
  'v5e-16': 'v5e:4x4',
  'v5e-32': 'v5e:4x8',
  'v5e-128': 'v5e:8x16',
  'v6e-64': 'v6e:8x8',
  'v6e-256': 'v6e:16x16',
}


@pytest.mark.parametrize('name', sorted(CLOUD))
def test_slice_names_give_cloud_shapes(name):
  slice_ = topology.parse(name)
  assert slice_.libtpu_name == CLOUD[name]
  per_chip = 2 if name.startswith(('v4', 'v5p')) else 1  # v4 / v5p names count TensorCores
  assert slice_.chips * per_chip == int(name.split('-')[1])


@pytest.mark.parametrize('name', ['v5p-4', 'v5p-12', 'v5e-2', 'v7-8', 'v5p', 'v6e-0', 'tpu-8'])
def test_bad_slice_names_are_one_line_errors(name):
  with pytest.raises(ValueError, match=rf"--topology='{name}': expected <chip>-<size>"):
    topology.parse(name)


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)  # import libtpu -> ImportError
  with pytest.raises(ValueError, match=r"pip install 'evejax\[tpu\]'.*--devices=N"):
    topology.devices(topology.parse('v5e-8'))


def test_over_hbm_errors_give_the_compilers_figure():
  whole = RuntimeError(
    'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. '
    'Used 101.50G of 95.74G hbm. Exceeded hbm capacity by 5.76G.'
  )
  temporaries = RuntimeError(
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries '
    '(34.36G) exceeds available HBM (15.75G).'
  )
  assert topology.over_hbm(whole) == {'total': int(101.5 * 2**30)}
  assert topology.over_hbm(temporaries) == {'temporaries': int(34.36 * 2**30)}
  assert topology.over_hbm(RuntimeError('INTERNAL: something else')) is None


def test_multi_slice_devices_give_a_hybrid_mesh():
  pytest.importorskip('libtpu')
  from evejax.sharding import make_mesh  # noqa: PLC0415

  devices = topology.devices(topology.parse('v5e-8'), num_slices=2)
  assert len(devices) == 16 and {d.device_kind for d in devices} == {'TPU v5 lite'}
  mesh = make_mesh(dict(fsdp=-1, dcn=dict(data=2)), devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=8, tensor=1)
  # Slices outermost: each data row is one slice's 8 chips.
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]


def test_mesh_flag_takes_slices_under_dcn():
  assert parse_mesh('fsdp=-1,dcn.data=2') == dict(fsdp=-1, dcn=dict(data=2))
  assert parse_mesh('data=2, fsdp=4,tensor=1') == dict(data=2, fsdp=4, tensor=1)
  for bad in ('data2', 'data=two', 'fsdp=-1,tensor='):
    with pytest.raises(app.UsageError, match='expected axis=size pairs'):
      parse_mesh(bad)
