"""TPU slices by their Cloud names (`v5p-256`, `v6e-256`, `v4-128`, `v5e-16`) as compile-only
devices: libtpu describes the slice's chips without the hardware, so `jax.jit(...).lower(...)
.compile()` runs the TPU compiler on any host (evejax.plan --topology, as MaxText's
train_compile).

v4 and v5p names count TensorCores (two per chip, one megacore device), in a 3D torus; v5e and
v6e names count chips (one core each), in a 2D torus.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # libtpu's topology prefix
  hbm_gib: float  # memory per chip
  dims: int  # torus dimensions
  cores_in_name: int  # what the slice name counts per chip (TensorCores or chips)
  chip_config: str  # libtpu's chip configuration: megacore = one device per chip


CHIPS = {
  'v4': Chip('v4', 32, 3, 2, 'megacore'),
  'v5p': Chip('v5', 95, 3, 2, 'megacore'),
  'v5e': Chip('v5e', 16, 2, 1, 'default'),
  'v6e': Chip('v6e', 32, 2, 1, 'default'),
}
HOST_BOUNDS = (2, 2, 1)  # chips per host: 4, as a 2x2 board


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # e.g. v5p-256
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:  # e.g. v5:4x4x8
    return f'{self.chip.name}:{"x".join(map(str, self.shape))}'


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU gives a power-of-two chip count: from 2x2(x1), double the
  shortest axis (the last of equals) until the count is reached; v5p-256 (128 chips) -> 4x4x8."""
  shape = [min(2, chips), 1 if chips < 4 else 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    shortest = min(shape)
    i = max(j for j, n in enumerate(shape) if n == shortest)
    shape[i] *= 2
  return tuple(shape)


def parse(name: str, flag: str = '--topology') -> Topology:
  """`v5p-256` -> its chip kind and torus shape; a one-line error for anything else."""
  match = re.fullmatch(r'(v4|v5p|v5e|v6e)-(\d+)', name)
  count = int(match.group(2)) if match else 0
  if match:
    chip = CHIPS[match.group(1)]
    chips = count // chip.cores_in_name
    # Cloud's slices: a 2x2 board upwards (v5e and v6e also sell single chips).
    offered = chips >= 4 or (chips == 1 and chip.dims == 2)
    if offered and chips * chip.cores_in_name == count and chips & (chips - 1) == 0:
      return Topology(name, chip, torus_shape(chips, chip.dims))
  raise ValueError(
    f'{flag}={name!r}: expected <chip>-<size> with chip one of {sorted(CHIPS)} and a power-of-two '
    'size (v4 and v5p count TensorCores, two per chip: v5p-8 upwards; v5e and v6e count chips: '
    '1, then 4 upwards), e.g. v5p-256 or v6e-256'
  )


def devices(topology: Topology, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `topology` (needs libtpu: the `tpu`
  extra, which installs it on any x86-64 Linux host)."""
  try:
    import libtpu  # noqa: F401, PLC0415
  except ImportError as error:
    raise ValueError(
      f'--topology={topology.name} compiles with the TPU compiler from libtpu, which is not '
      "installed: pip install 'evejax[tpu]' (or plan on fake CPU devices: --devices=N)"
    ) from error
  from jax.experimental import topologies  # noqa: PLC0415

  # A compile-only client touches no chip, so it needs no exclusive hold of libtpu: without this,
  # any other JAX process on the host that loaded libtpu (e.g. a CPU run) makes it fail with
  # 'Internal error when accessing libtpu multi-process lockfile'.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  host_bounds = tuple(min(h, s) for h, s in zip(HOST_BOUNDS, (*topology.shape, 1)))
  desc = topologies.get_topology_desc(
    topology_name=topology.libtpu_name,
    platform='tpu',
    chip_config_name=topology.chip.chip_config,
    chips_per_host_bounds=host_bounds,
    num_slices=num_slices,
  )
  return list(desc.devices)


# The TPU compiler refuses a program over the chip's HBM, in one of two words: the whole program
# ("Ran out of memory in memory space hbm. Used 101.3G of 95.74G hbm.") or its temporaries ("the
# total memory required for HLO temporaries (34.36G) exceeds available HBM (15.75G)").
_OVER_HBM = (
  ('total', re.compile(r'Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm')),
  ('temporaries', re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\)')),
)
_UNITS = dict(zip(('', 'K', 'M', 'G', 'T'), (1, 2**10, 2**20, 2**30, 2**40)))


def over_hbm(error: Exception) -> dict[str, int] | None:
  """What a TPU compile refused for HBM needed, {'total' or 'temporaries': bytes}; None for any
  other error."""
  for key, pattern in _OVER_HBM:
    if match := pattern.search(str(error)):
      return {key: int(float(match.group(1)) * _UNITS[match.group(2)])}
  return None
