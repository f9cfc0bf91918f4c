"""FLOP-exact modality routing ('sorted') against the reference select (the oracle)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sharding import tiny_config

from evejax.batch import BatchSpec
from evejax.models import EVE
from evejax.models.decoder import DecoderLayer
from evejax.models.routing import Router
from evejax.sharding.synthetic import random_batch


def routed(router, x, text_op, vision_op):
  """One routed op on x in sequence order: into the router's layout and back."""
  return router.leave(router(router.enter(x), text_op, vision_op))


@pytest.mark.parametrize('vision_fraction', [0.0, 0.3, 0.97, 1.0])
def test_sorted_matches_select_on_linear_ops(vision_fraction):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 40, 16)).astype(np.float32)
  mask = rng.random((6, 40)) < vision_fraction
  mask[0] = False  # a row with no image
  mask[1] = vision_fraction > 0  # a row that is all image (when any)
  w_text, w_vision = rng.normal(size=(2, 16, 24)).astype(np.float32)
  expected = np.where(mask[..., None], x @ w_vision, x @ w_text)  # independent NumPy oracle
  got = jax.jit(
    lambda x, m: routed(Router.create(m, 'sorted'), x, lambda z: z @ w_text, lambda z: z @ w_vision)
  )(x, mask)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_mode_names_the_choices():
  with pytest.raises(ValueError, match="model.routing 'ragged'.*select.*sorted"):
    Router.create(jnp.ones((1, 2), bool), 'ragged')


def test_decomposed_model_forward_and_grads_agree():
  tiny_cfg = tiny_config()
  select = EVE(tiny_cfg, rngs=nnx.Rngs(0))
  routed = EVE(dataclasses.replace(tiny_cfg, routing='sorted'), rngs=nnx.Rngs(0))
  batch = {
    k: jnp.asarray(v)
    for k, v in random_batch(
      BatchSpec.for_model(tiny_cfg, seq_len=24, patch_slots=6), 4, tiny_cfg.vocab_size, seed=1
    ).items()
  }

  def loss(model):
    logits = model(batch)
    return jnp.sum(logits**2) / 1e3, logits

  grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  ((l_sel, logits_sel), g_sel), ((l_rt, logits_rt), g_rt) = grad_fn(select), grad_fn(routed)
  np.testing.assert_allclose(l_rt, l_sel, rtol=1e-5)
  np.testing.assert_allclose(logits_rt, logits_sel, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_sel), jax.tree.leaves(g_rt)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def layer_flops(cfg, moe_part, routing, tokens=(16, 128)):
  # Wide enough that the projections and MLP, not attention, dominate (as in real models).
  cfg = dataclasses.replace(
    cfg,
    moe_part=moe_part,
    routing=routing,
    hidden_size=128,
    intermediate_size=384,
    num_heads=4,
    head_dim=32,
  )
  graphdef, state = nnx.split(DecoderLayer(cfg, rngs=nnx.Rngs(0)))
  x = jnp.ones((*tokens, cfg.hidden_size))
  vision = jnp.arange(tokens[1])[None].repeat(tokens[0], 0) % 3 == 0
  segment_ids = jnp.ones(tokens, jnp.int32)
  positions = jnp.arange(tokens[1])[None].repeat(tokens[0], 0)

  def apply(state, x, vision):
    router = Router.create(vision, routing)
    layer = nnx.merge(graphdef, state)
    return router.leave(layer(router.enter(x), router, positions, segment_ids))

  cost = jax.jit(apply).lower(state, x, vision).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def test_compiled_flops_of_routed_layer_match_a_plain_layer():
  tiny_cfg = tiny_config()
  plain = layer_flops(tiny_cfg, '', 'select')
  assert layer_flops(tiny_cfg, 'layernorm-self_attn-mlp', 'sorted') <= 1.05 * plain
  assert layer_flops(tiny_cfg, 'layernorm-self_attn-mlp', 'select') > 1.5 * plain
