"""Scanned vs unrolled decoder layers, the remat policies, and gradient accumulation: each gives the
plain path's loss and updated parameters (fp32, 1 device)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sharding import TOLERANCE, max_diff, reference_setup, tiny_config, train_two_steps

from evejax import sharding
from evejax.models import EVE, stack
from evejax.train.step import _loss_and_grads


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config()
  init, batches = reference_setup(cfg)
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  losses, params, _, _ = train_two_steps(cfg, mesh, init, batches)
  return cfg, init, batches, mesh, losses, params


def assert_same(losses, params, ref_losses, ref_params):
  np.testing.assert_allclose(losses, ref_losses, rtol=TOLERANCE)
  assert max_diff(params, ref_params) <= TOLERANCE


def test_scanned_layers_equal_unrolled(setup):
  cfg, init, batches, mesh, ref_losses, ref_params = setup
  scanned = dataclasses.replace(cfg, scan_layers=True)
  stacked = jax.device_get(dict(init, layers=stack.stack_params(init['layers'])))
  losses, params, _, _ = train_two_steps(scanned, mesh, stacked, batches)
  assert jax.tree.leaves(params['layers'])[0].shape[0] == cfg.num_layers
  assert_same(
    losses, dict(params, layers=stack.unstack_params(params['layers'])), ref_losses, ref_params
  )


def test_stacked_parameters_get_the_layers_axis_name(setup):
  cfg = dataclasses.replace(setup[0], scan_layers=True)
  _, shapes, _ = sharding.abstract_params(lambda: EVE(cfg, rngs=nnx.Rngs(0)), setup[3])
  kernel = shapes['layers']['mlp']['up_proj']['kernel']
  assert kernel.shape == (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
  # DEFAULT_RULES: layers replicated, embed -> fsdp, mlp -> tensor.
  assert tuple(kernel.sharding.spec) == (None, 'fsdp', 'tensor')


def grads_and_flops(cfg, params, batch):
  """Gradients of the loss and the compiled FLOPs of computing them."""
  graphdef = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)[0]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  compiled = (
    jax.jit(lambda p, b: _loss_and_grads(graphdef, p, b, 1)[2]).lower(params, batch).compile()
  )
  cost = compiled.cost_analysis()
  return compiled(params, batch), (cost[0] if isinstance(cost, list) else cost)['flops']


def test_full_remat_equals_plain_and_recomputes(setup):
  cfg, init, batches = setup[:3]
  stacked = jax.device_get(dict(init, layers=stack.stack_params(init['layers'])))
  (plain, plain_flops), (remat, remat_flops) = (
    grads_and_flops(dataclasses.replace(cfg, remat=p, scan_layers=True), stacked, batches[0])
    for p in ('none', 'full')
  )
  assert max_diff(remat, plain) <= TOLERANCE
  assert remat_flops > 1.1 * plain_flops


@pytest.mark.slow
def test_remat_policies_equal_plain_and_recompute(setup):
  cfg, init, batches = setup[:3]
  stacked = jax.device_get(dict(init, layers=stack.stack_params(init['layers'])))
  grads, flops = {}, {}
  for policy in stack.REMAT_POLICIES:
    variant = dataclasses.replace(cfg, remat=policy, scan_layers=True)
    grads[policy], flops[policy] = grads_and_flops(variant, stacked, batches[0])
    assert max_diff(grads[policy], grads['none']) <= TOLERANCE, policy
  # Recomputation shows in the compiled backward pass: 'full' recomputes every matmul,
  # 'save_dots' none of them.
  assert flops['full'] > 1.1 * flops['none']
  assert flops['save_dots'] < flops['full'] and flops['minimal'] < flops['full']
  # Unrolled layers take the same policies.
  unrolled, unrolled_flops = grads_and_flops(
    dataclasses.replace(cfg, remat='full'), init, batches[0]
  )
  assert (
    max_diff(unrolled['layers'][1], stack.unstack_params(grads['none']['layers'])[1]) <= TOLERANCE
  )
  assert unrolled_flops > 1.1 * grads_and_flops(cfg, init, batches[0])[1]


def test_unknown_remat_policy_is_rejected():
  with pytest.raises(ValueError, match="model.remat='some'"):
    tiny_config(remat='some')


def test_accumulating_four_microbatches_equals_one_batch(setup):
  cfg, init, batches, mesh, ref_losses, ref_params = setup
  losses, params, _, _ = train_two_steps(cfg, mesh, init, batches, microbatches=4)
  assert_same(losses, params, ref_losses, ref_params)


def test_microbatches_must_divide_the_batch(setup):
  cfg, init, batches, mesh = setup[:4]
  with pytest.raises(ValueError, match='batch_size 8 is not a multiple of microbatches=3'):
    train_two_steps(cfg, mesh, init, batches, microbatches=3)
