"""Multi-process runs: joining the JAX distributed system; which process does host-side work.

A run with N processes (hosts) calls `initialize` once, before any other JAX call. Settings come
from `config.distributed` or, where empty, the environment:

| config.distributed      | environment             | meaning                                     |
| ----------------------- | ----------------------- | ------------------------------------------- |
| `coordinator_address`   | JAX_COORDINATOR_ADDRESS | host:port of process 0's coordinator        |
| `num_processes`         | JAX_NUM_PROCESSES       | number of processes                         |
| `process_id`            | JAX_PROCESS_ID          | this process's index, 0 ... N-1             |
| `auto=True`             |                         | let JAX detect the cluster (TPU pod, SLURM, |
|                         |                         | Open MPI, Kubernetes) and set all three     |

Each process then feeds only its own rows (`sharding.shard_batch` assembles the global batch);
process 0 alone writes metrics and logs (`is_main`); every process takes part in checkpoint writes,
which Orbax coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
from absl import logging

from evejax.config_utils import from_mapping

if TYPE_CHECKING:
  from evejax.config import DistributedConfig


def _setting(value, env: str, empty):
  if value == empty:
    value = os.environ.get(env, empty)
  return type(empty)(value) if value != empty else empty


def initialize(cfg: DistributedConfig | Mapping[str, Any] | None = None) -> bool:
  """Joins the distributed system when configured (the `distributed` section, or a mapping of its
  fields); returns whether this run is multi-process."""
  # Imported here: evejax.config imports the models, which import this package.
  from evejax.config import DistributedConfig  # pylint: disable=import-outside-toplevel

  cfg = from_mapping(DistributedConfig, cfg or {}, 'config.distributed')
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if cfg.auto:
    jax.distributed.initialize()
    return jax.process_count() > 1
  address = _setting(cfg.coordinator_address, 'JAX_COORDINATOR_ADDRESS', '')
  num_processes = _setting(cfg.num_processes, 'JAX_NUM_PROCESSES', 0)
  process_id = _setting(cfg.process_id, 'JAX_PROCESS_ID', -1)
  if not address and num_processes <= 1:
    return False  # a single process: nothing to join
  if not address or num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f'Incomplete multi-process settings: coordinator_address={address!r}, num_processes='
      f'{num_processes}, process_id={process_id}. Set all three in config.distributed or as '
      'JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or config.distributed.auto'
    )
  jax.distributed.initialize(
    coordinator_address=address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    'Process %d of %d joined via %s; %d local and %d global devices',
    process_id,
    num_processes,
    address,
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_main() -> bool:
  """Whether this process writes metrics, logs and other host-side outputs."""
  return jax.process_index() == 0


def process_rows(global_batch_size: int) -> int:
  """Rows each process feeds per step (the global batch split evenly over processes)."""
  if global_batch_size % jax.process_count():
    raise ValueError(
      f'batch_size {global_batch_size} does not split over '
      f'{jax.process_count()} processes; use a multiple of it'
    )
  return global_batch_size // jax.process_count()
