"""Mesh construction, sharding rules and the unsharded-parameter check; a train step on 8 fake CPU
devices equals the 1-device step (run in a subprocess: XLA's device count is fixed at start-up)."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from evejax import sharding
from tests.fake_devices import run_with_devices

MESHES = {
  '8,1,1': dict(data=8),
  '2,4,1': dict(data=2, fsdp=4),
  '2,2,2': dict(data=2, fsdp=2, tensor=2),
  '1,4,2': dict(data=1, fsdp=4, tensor=2),
}
TOLERANCE = 1e-5  # fp32: losses (relative) and updated parameters (absolute)


def test_mesh_sizes_fill_and_errors():
  import jax

  assert dict(sharding.make_mesh({'data': -1}).shape) == {
    'data': jax.device_count(),
    'fsdp': 1,
    'tensor': 1,
  }
  with pytest.raises(ValueError, match=r"Unknown mesh axes \['model'\]"):
    sharding.make_mesh({'model': 2})
  with pytest.raises(ValueError, match='At most one mesh axis may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.make_mesh({'data': 4})


def test_rules_from_config_override_by_name_and_reject_typos():
  rules = dict(sharding.rules_from_config([('vocab', 'fsdp'), ('mlp', ['fsdp', 'tensor'])]))
  assert rules['vocab'] == 'fsdp' and rules['mlp'] == ('fsdp', 'tensor')
  assert rules['embed'] == 'fsdp'  # untouched defaults stay
  with pytest.raises(ValueError, match='logical name among'):
    sharding.rules_from_config([('vocabulary', 'fsdp')])
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config([('vocab', 'model')])


def run_worker(variants, timeout=600):
  stdout = run_with_devices([__file__, *variants], devices=8, timeout=timeout)
  return json.loads(stdout.strip().splitlines()[-1])


VARIANTS = [*MESHES, '2,2,2 sorted routing', '1,4,2 scan + remat full']
QUICK = ['2,2,2', '2,2,2 sorted routing', '1,4,2 scan + remat full']  # the default suite's share


def check_variant(results, variant):
  got, ref = results[variant], results['1 device']
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=TOLERANCE)
  assert got['max_param_diff'] <= TOLERANCE, variant
  assert got['params_moved'] > 100 * TOLERANCE  # the steps changed the parameters
  # Parameters are really split: with fsdp/tensor axes little is replicated (norms, biases and,
  # without a tensor axis, the vision patch projection: ~3% of this tiny model).
  if not variant.startswith('8,1,1'):
    assert got['unsharded_fraction'] < 0.04 and got['max_device_param_share'] < 0.6, got


def test_train_step_on_meshes_equals_one_device():
  results = run_worker(QUICK)
  for variant in QUICK:
    check_variant(results, variant)


@pytest.mark.slow
def test_train_step_on_all_meshes_equals_one_device():
  results = run_worker(VARIANTS)
  for variant in VARIANTS:
    check_variant(results, variant)


def test_check_sharded_names_replicated_parameters():
  import jax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  # An abstract 4-device mesh: the check needs no real devices.
  mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  spec = lambda *s: jax.ShapeDtypeStruct((64, 64), np.float32, sharding=NamedSharding(mesh, P(*s)))
  params = {'big': spec('fsdp', 'tensor'), 'norm': spec()}
  fraction, replicated = sharding.unsharded_parameters(params, mesh)
  assert fraction == 0.5 and [p for p, _ in replicated] == ['norm']
  with pytest.raises(ValueError, match='(?s)50.0% of the parameter bytes.*norm.*sharding_rules'):
    sharding.check_sharded(params, mesh)
  assert sharding.check_sharded(params, mesh, tolerance=0.6) == 0.5


def test_optimizer_state_is_sharded_like_its_parameters():
  import jax
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  params = {
    'w': jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, P('fsdp'))),
    'b': jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P('tensor'))),
  }
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  shardings = sharding.like_params(jax.eval_shape(tx.init, params), params, mesh)
  adam = shardings[1][0]
  for moment in (adam.mu, adam.nu):
    assert moment['w'].spec == P('fsdp') and moment['b'].spec == P('tensor')
  assert adam.count.spec == P()  # the step count is replicated


# ---------------------------------------------------------------------------------------------
# The subprocess side (8 fake devices).


def tiny_config(**overrides):
  from evejax.models import ModelConfig

  # Dimensions divisible by every mesh axis used here.
  return ModelConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    vision_patch_size=4,
    vision_merge=2,
    vision_hidden_size=16,
    **overrides,
  )


def train_two_steps(cfg, mesh, init_params, batches, microbatches=1):
  """Losses, final parameters (NumPy; single process only), the first device's share of them and
  the parameter arrays after two SGD steps from `init_params`."""
  import jax
  import optax
  from flax import nnx

  from evejax.models import EVE
  from evejax.train.step import TrainState, make_train_step

  graphdef, _, shardings = sharding.abstract_params(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh)
  params = jax.device_put(init_params, shardings)
  tx = optax.sgd(0.5)
  step = make_train_step(graphdef, tx, lambda s: 0.5, microbatches=microbatches)
  with jax.set_mesh(mesh):
    state = TrainState.create(params, tx.init(params))
    losses = []
    for batch in batches:
      state, (loss_metrics, _) = step(state, sharding.shard_batch(batch, mesh))
      losses.append(float(loss_metrics[0].loss.compute()))
  per_device = sum(
    s.data.size
    for p in jax.tree.leaves(state.params)
    for s in p.addressable_shards
    if s.device == mesh.devices.flat[0]
  )
  total = sum(p.size for p in jax.tree.leaves(state.params))
  host = jax.device_get(state.params) if jax.process_count() == 1 else None  # else not addressable
  return losses, host, per_device / total, state.params


def reference_setup(cfg, num_batches=2, rows=8, seq_len=32):
  import jax
  from flax import nnx

  from evejax.models import EVE
  from evejax.sharding.synthetic import random_batch

  params = nnx.to_pure_dict(nnx.state(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  from evejax.batch import BatchSpec

  spec = BatchSpec.for_model(cfg, seq_len=seq_len, patch_slots=6)
  batches = [random_batch(spec, rows, cfg.vocab_size, seed=i) for i in range(num_batches)]
  return jax.device_get(params), batches


def max_diff(a, b):
  import jax

  return max(
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def meshes_worker(variants):
  import jax

  from evejax.models import stack

  cfg = tiny_config()
  init, batches = reference_setup(cfg)
  one = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  ref_losses, ref_params, _, _ = train_two_steps(cfg, one, init, batches)
  results = {'1 device': {'losses': ref_losses}}
  stacked = jax.device_get(dict(init, layers=stack.stack_params(init['layers'])))
  setups = {name: (cfg, sizes, init) for name, sizes in MESHES.items()}
  setups['2,2,2 sorted routing'] = (
    dataclasses.replace(cfg, routing='sorted'),
    MESHES['2,2,2'],
    init,
  )
  setups['1,4,2 scan + remat full'] = (
    dataclasses.replace(cfg, scan_layers=True, remat='full'),
    MESHES['1,4,2'],
    stacked,
  )
  for name in variants:
    variant_cfg, sizes, start = setups[name]
    mesh = sharding.make_mesh(sizes)
    losses, params, share, arrays = train_two_steps(variant_cfg, mesh, start, batches)
    if variant_cfg.scan_layers:
      params = dict(params, layers=stack.unstack_params(params['layers']))
    results[name] = dict(
      losses=losses,
      max_param_diff=max_diff(params, ref_params),
      params_moved=max_diff(params, init),
      max_device_param_share=share,
      unsharded_fraction=sharding.unsharded_parameters(arrays, mesh)[0],
    )
  return results


if __name__ == '__main__':
  print(json.dumps(meshes_worker(sys.argv[1:])))
