"""EVEv1 PAL with scanned decoder layers (`model.scan_layers`, as every 7B stage): the taps come out
of the scan, and the loss (cross-entropy + PAL) and every gradient equal the unrolled model's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax.models import EVE, stack
from evejax.models import pal as pal_layer
from evejax.train import pal as pal_lib
from evejax.train.step import _loss_and_grads
from tests.test_pal import CFG, _batch, _teacher


def loss_and_grads(cfg, params, batch):
  """Loss and gradients of the training step's loss with the PAL term (fp32, 1 device)."""
  graphdef = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)[0]
  teacher_graphdef, teacher_params = nnx.split(_teacher())
  teacher = lambda b: nnx.merge(teacher_graphdef, teacher_params).patch_features(
    b['patches'], b['patch_image'], b['patch_coords']
  )
  objective = pal_lib.PalObjective(0.7, teacher)
  loss, _, grads = jax.jit(lambda p, b: _loss_and_grads(graphdef, p, b, 1, pal=objective))(
    params, batch
  )
  return float(loss), jax.device_get(grads)


# (layers, rate): taps (4, 3, 2, 1, 0), every layer's output and the input embeddings; and
# (5, 3, 1), intermediate taps not at the ends, listed top first as tap_indices gives them.
@pytest.mark.parametrize('num_layers,rate', [pytest.param(4, 1, marks=pytest.mark.slow), (5, 2)])
def test_scanned_pal_equals_unrolled(num_layers, rate):
  cfg = dataclasses.replace(CFG, num_layers=num_layers, pal_layer_rate=rate)
  assert pal_layer.tap_indices(num_layers, rate)[-1] == (0 if rate == 1 else 1)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  batch = _batch()
  ref_loss, ref_grads = loss_and_grads(cfg, params, batch)
  stacked = dict(params, layers=stack.stack_params(params['layers']))
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat='full')
  loss, grads = loss_and_grads(scanned_cfg, stacked, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  grads = dict(grads, layers=stack.unstack_params(grads['layers']))
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for (path, got), want in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    # fp32 sums in another order: differences of a few ulps of the leaf's largest entry.
    atol = 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))
  # Every tapped layer's gradient carries the PAL term: it is not the cross-entropy's alone.
  assert np.abs(ref_grads['pal']['input_layer']['kernel']).sum() > 0


def test_scan_emits_only_the_tapped_layers():
  """The scan carries one buffer slot per tap (+1 scratch), never one per layer."""
  cfg = dataclasses.replace(CFG, num_layers=6, pal_layer_rate=3, scan_layers=True)
  model = EVE(cfg, rngs=nnx.Rngs(0))
  double = lambda layer, x: 2 * x  # each "layer" doubles its input: output k is 2**(k + 1) x
  shape = (1, 3, cfg.hidden_size)
  x = jnp.ones(shape)
  jaxpr = jax.make_jaxpr(lambda x: stack.scan_layers(double, model.layers, x, taps=(4, 1)))(x)
  (scan,) = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
  assert [v.aval.shape for v in scan.outvars] == [shape, (3, *shape)]
  out, tapped = stack.scan_layers(double, model.layers, x, taps=(4, 1))
  np.testing.assert_array_equal(out, 2.0**6 * x)
  np.testing.assert_array_equal(tapped[0], 2.0**5 * x)
  np.testing.assert_array_equal(tapped[1], 2.0**2 * x)
