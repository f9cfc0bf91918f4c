"""A checkpoint written on a (2, 2, 2) mesh of 8 devices restores onto (8, 1, 1), (1, 4, 2) and one
device: the same parameter and optimizer-state values, in the target's shardings."""

import textwrap

import jax
import numpy as np

from evejax.checkpoint import Checkpointer
from evejax.models import ModelConfig
from tests.conftest import TINY
from tests.fake_devices import run_with_devices

CFG = dict(TINY, vocab_size=96)  # Divisible by the tensor axis.

# Shared by the 8-device subprocess and this process.
SETUP = textwrap.dedent('''
    import grain, jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from evejax import sharding
    from evejax.checkpoint import Checkpointer
    from evejax.models import EVE, ModelConfig
    from evejax.train.step import TrainState

    def train_state(cfg, mesh_sizes, seed):
      """Params and AdamW state with non-zero moments, placed on the given mesh."""
      mesh = sharding.make_mesh(mesh_sizes)
      _, params = sharding.init_sharded(lambda: EVE(cfg, rngs=nnx.Rngs(seed)), mesh)
      tx = optax.adamw(1e-3)
      with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(params)
        opt_state = jax.jit(lambda g, s, p: tx.update(g, s, p)[1])(params, opt_state, params)
      replicated = NamedSharding(mesh, P())
      return TrainState(step=jax.device_put(jnp.asarray(seed, jnp.int32), replicated),
                        params=params, opt_state=opt_state,
                        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated))

    def data_iterator():
      return iter(grain.MapDataset.range(64).batch(2).to_iter_dataset())
''')

WORKER = SETUP + textwrap.dedent("""
    import sys
    from tests.conftest import TINY
    directory, expected_path = sys.argv[1:]
    cfg = ModelConfig(**dict(TINY, vocab_size=96))
    state = train_state(cfg, dict(data=2, fsdp=2, tensor=2), seed=7)
    ckpt = Checkpointer(directory, every=1, keep_last=1)
    ckpt.save(7, state, data_iterator(), {'mesh': [2, 2, 2]})
    ckpt.wait()
    leaves = jax.tree.leaves(state)
    np.savez(expected_path, *[np.asarray(x) for x in leaves])
    for sizes in (dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=2)):
      target = train_state(cfg, sizes, seed=0)
      step, restored, _ = ckpt.restore(target, data_iterator())
      assert step == 7
      assert jax.tree.structure(restored) == jax.tree.structure(state)
      for got, want, tgt in zip(jax.tree.leaves(restored), leaves, jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(tgt.sharding, got.ndim), (got.sharding, tgt.sharding)
      sharded = [x for x in jax.tree.leaves(restored.params)
                 if not x.sharding.is_fully_replicated]
      print(sizes, 'restored;', len(sharded), 'sharded parameter arrays')
""")


def test_restore_onto_other_meshes_and_one_device(tmp_path):
  directory, expected = str(tmp_path / 'checkpoints'), str(tmp_path / 'expected.npz')
  stdout = run_with_devices(['-c', WORKER, directory, expected], devices=8)
  lines = [line for line in stdout.splitlines() if 'restored;' in line]
  assert len(lines) == 2 and ' 0 sharded' not in lines[1]  # (1, 4, 2) really shards.

  # This process has one device: restore the 8-device checkpoint here too.
  assert jax.device_count() == 1
  namespace = {}
  exec(SETUP, namespace)
  target = namespace['train_state'](ModelConfig(**CFG), dict(data=1), seed=0)
  step, restored, metadata = Checkpointer(directory, every=1, keep_last=1).restore(
    target, namespace['data_iterator']()
  )
  assert step == 7 and metadata == {'mesh': [2, 2, 2]}
  with np.load(expected) as saved:
    want = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  got = jax.tree.leaves(restored)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w)
    assert g.sharding.device_set == {jax.devices()[0]}
