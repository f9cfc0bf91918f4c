"""Checkpoint speed: how long a save blocks the training loop, how long until it is on disk, and
how long a restore takes, for a few model sizes (parameters + AdamW state, float32).

  python -m evejax.checkpoint.bench [--sizes=tiny,small] [--dir=/tmp/evejax_ckpt_bench]
"""

from __future__ import annotations

import os
import shutil
import time

import grain
import jax
import optax
from absl import flags
from flax import nnx

from evejax import cli, sharding
from evejax.checkpoint import Checkpointer
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from evejax.train.step import TrainState

SIZES = {
  'tiny': model_preset('eve_v2_tiny'),
  'small': dict(
    model_preset('eve_v2_tiny'),
    vocab_size=32_000,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
  ),
  'medium': dict(
    model_preset('eve_v2_tiny'),
    vocab_size=32_000,
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=12,
    num_heads=16,
    num_kv_heads=4,
    head_dim=64,
  ),
}
_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], f'Model sizes from {sorted(SIZES)}.')
_DIR = flags.DEFINE_string('dir', '/tmp/evejax_ckpt_bench', 'Scratch directory (deleted).')


def train_state(cfg: ModelConfig, mesh) -> TrainState:
  _, params = sharding.init_sharded(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(optax.adamw(1e-3).init)(params)
  return TrainState.create(params, opt_state)


def directory_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def measure(name: str, mesh) -> dict:
  state = train_state(ModelConfig(**SIZES[name]), mesh)
  directory = os.path.join(_DIR.value, name)
  shutil.rmtree(directory, ignore_errors=True)
  data = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = Checkpointer(directory, every=1, keep_last=1)
  start = time.perf_counter()
  ckpt.save(1, state, data, {})
  blocking = time.perf_counter() - start
  ckpt.wait()
  total = time.perf_counter() - start
  start = time.perf_counter()
  _, restored, _ = Checkpointer(directory, every=1, keep_last=1).restore(state, data)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  size = directory_bytes(os.path.join(directory, '1'))
  shutil.rmtree(directory)
  return dict(
    size=name,
    params=sum(x.size for x in jax.tree.leaves(state.params)),
    mb=size / 2**20,
    blocking=blocking,
    total=total,
    restore=restore,
  )


def main(argv):
  del argv
  mesh = sharding.make_mesh(dict(data=-1))
  rows = [measure(name, mesh) for name in _SIZES.value]
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; async Orbax saves, OCDBT format')
  print(
    '| size | parameters | on disk (MiB) | save blocks loop (s) | save on disk (s) | restore (s) '
    '| write MiB/s |'
  )
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for r in rows:
    print(
      f'| {r["size"]} | {r["params"]:,} | {r["mb"]:.1f} | {r["blocking"]:.3f} | '
      f'{r["total"]:.3f} | {r["restore"]:.3f} | {r["mb"] / r["total"]:.0f} |'
    )


if __name__ == '__main__':
  cli.run(main)
