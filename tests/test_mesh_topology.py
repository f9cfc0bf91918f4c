"""Topology-aware meshes: the device grid follows the TPU torus (fake TPU devices with coordinates,
host-major like `jax.devices()` on a pod), slices stay outermost, and 8 CPU devices keep JAX's
order (a subprocess: XLA's device count is fixed at start-up)."""

import dataclasses
import itertools

import numpy as np
import pytest

from evejax.sharding import mesh
from tests.fake_devices import run_with_devices


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What mesh_utils reads of a TPU device."""

  id: int
  coords: tuple[int, int, int]
  process_index: int
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


def fake_pod(shape: tuple[int, int, int], slices: int = 1) -> list[FakeTpu]:
  """Chips of an x*y*z torus per slice in a pod's `jax.devices()` order: host by host, each host
  a 2x2x1 block of chips."""
  devices = []
  for slice_index in range(slices):
    for z, host_y, host_x in itertools.product(
      range(shape[2]), range(shape[1] // 2), range(shape[0] // 2)
    ):
      host = len(devices) // 4
      for dy, dx in itertools.product(range(2), range(2)):
        coords = (2 * host_x + dx, 2 * host_y + dy, z)
        devices.append(FakeTpu(len(devices), coords, host, slice_index))
  return devices


def torus_hops(a: FakeTpu, b: FakeTpu, shape: tuple[int, ...]) -> int:
  """Links between two chips of a torus (wrap-around on every side)."""
  return sum(min(abs(p - q), n - abs(p - q)) for p, q, n in zip(a.coords, b.coords, shape))


def is_ici_ring(line: np.ndarray, shape: tuple[int, ...]) -> bool:
  """Whether the devices along one mesh axis form a ring of single links (incl. the last->first)."""
  return all(torus_hops(a, b, shape) == 1 for a, b in zip(line, np.roll(line, -1)))


def test_one_slice_axes_follow_the_torus():
  shape = (4, 4, 4)
  devices = fake_pod(shape)
  grid = mesh.device_grid({'data': 1, 'fsdp': 16, 'tensor': 4}, devices)
  assert grid.shape == (1, 16, 4) and sorted(d.id for d in grid.ravel()) == list(range(64))
  # Every tensor group is a ring of single ICI links along one physical axis ...
  assert all(is_ici_ring(grid[0, f], shape) for f in range(16))
  # ... and every fsdp group (one tensor index) a 4x4 plane of the torus: two physical axes whole.
  for t in range(4):
    coords = np.array([d.coords for d in grid[0, :, t]])
    assert sorted(len(set(c)) for c in coords.T) == [1, 4, 4]
  # The plain reshape of the pod's host-major order puts one host's 2x2 block on the tensor axis,
  # which is no ring (a diagonal step), so the topology-aware grid differs from it.
  naive = np.asarray(devices).reshape(1, 16, 4)
  assert not any(is_ici_ring(naive[0, f], shape) for f in range(16))


def test_one_slice_sizes_that_split_the_torus_still_build_and_say_so(caplog):
  grid = mesh.device_grid({'fsdp': 8, 'tensor': 2}, fake_pod((4, 4, 1)))
  assert grid.shape == (1, 8, 2) and len({d.id for d in grid.ravel()}) == 16
  grid = mesh.device_grid({'fsdp': 2, 'tensor': 8}, fake_pod((4, 4, 1)))
  assert grid.shape == (1, 2, 8)
  assert 'splitting physical axes' in caplog.text


def test_multi_slice_puts_slices_outermost_on_the_dcn_axis():
  shape = (4, 4, 4)
  devices = fake_pod(shape, slices=2)
  grid = mesh.device_grid({'data': 1, 'fsdp': 16, 'tensor': 4, 'dcn': {'data': 2}}, devices)
  assert grid.shape == (2, 16, 4)
  for slice_index in range(2):
    block = grid[slice_index]
    assert {d.slice_index for d in block.ravel()} == {slice_index}
    assert all(is_ici_ring(block[f], shape) for f in range(16))
  with pytest.raises(ValueError, match=r'span 2 TPU slices: set config.mesh.dcn'):
    mesh.device_grid({'fsdp': -1}, devices)
  with pytest.raises(ValueError, match=r'mesh.dcn .* does not match the slices'):
    mesh.device_grid({'fsdp': -1, 'dcn': {'data': 4}}, devices)


@dataclasses.dataclass(frozen=True)
class FakeGpu:
  """A GPU of a multi-node run: XLA gives every host its own slice_index."""

  id: int
  process_index: int
  slice_index: int
  platform: str = 'gpu'
  device_kind: str = 'NVIDIA H100 80GB HBM3'


def test_multi_node_gpus_need_no_dcn_and_keep_device_ids_in_order():
  devices = [FakeGpu(i, i // 8, i // 8) for i in reversed(range(16))]  # 2 nodes x 8 GPUs
  grid = mesh.device_grid({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)
  assert grid.shape == (1, 16, 1) and [d.id for d in grid.ravel()] == list(range(16))


def test_cpu_devices_keep_jax_order():
  script = (
    'import jax, numpy as np\n'
    'from jax.sharding import AxisType\n'
    'from evejax.sharding import mesh\n'
    "m = mesh.make_mesh({'data': 1, 'fsdp': 4, 'tensor': -1})\n"
    "assert dict(m.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}, m.shape\n"
    'assert (m.devices == np.asarray(jax.devices()).reshape(1, 4, 2)).all()\n'
    'assert set(m.axis_types) == {AxisType.Auto}\n'
    "print('ok')\n"
  )
  assert run_with_devices(['-c', script], devices=8).strip() == 'ok'
