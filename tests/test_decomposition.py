"""EVEv2 modality decomposition: vision tokens use only the vision copies, text tokens only the
LLM weights (perturb one set and see which outputs move)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax.models import ModelConfig
from evejax.models.decoder import DecoderLayer
from evejax.models.routing import Router

T = 10
VISION = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 0], bool)  # text, image, text


def run(layer, x, vision_mask=VISION):
  pos = jnp.arange(T)[None]
  router = Router.create(jnp.asarray(vision_mask)[None])
  return np.asarray(layer(x, router, pos, jnp.ones((1, T), jnp.int32)))[0]


def perturbed(layer, prefixes):
  """A copy of the layer with every parameter under one of the '.'-joined `prefixes` changed."""
  graphdef, state = nnx.split(layer)
  flat = dict(nnx.to_flat_state(state))

  def bump(path, var):
    name = '.'.join(map(str, path))
    hit = any(name.startswith(prefix + '.') for prefix in prefixes)
    return var.replace(var[...] + 0.5) if hit else var

  new = nnx.from_flat_state({p: bump(p, v) for p, v in flat.items()})
  return nnx.merge(graphdef, new)


@pytest.fixture
def layer_and_input(tiny_cfg):
  layer = DecoderLayer(tiny_cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, T, tiny_cfg.hidden_size))
  return layer, x


def moved(a, b):
  return np.abs(a - b).max(axis=-1) > 1e-6


def test_vision_mlp_and_norms_touch_only_vision_tokens(layer_and_input):
  layer, x = layer_and_input
  base = run(layer, x)
  out = run(perturbed(layer, ['moe_mlp', 'moe_post_attention_layernorm']), x)
  np.testing.assert_array_equal(moved(base, out), VISION)
  out = run(perturbed(layer, ['self_attn.moe_q_proj', 'self_attn.moe_o_proj']), x)
  np.testing.assert_array_equal(moved(base, out), VISION)


def test_text_weights_touch_only_text_tokens_except_through_attention(layer_and_input):
  layer, x = layer_and_input
  base = run(layer, x)
  out = run(
    perturbed(layer, ['mlp', 'post_attention_layernorm', 'self_attn.q_proj', 'self_attn.o_proj']), x
  )
  np.testing.assert_array_equal(moved(base, out), ~VISION)


def test_shared_attention_mixes_modalities_causally(layer_and_input):
  """Vision keys/values are seen by later text tokens (one joint attention), not by earlier ones."""
  layer, x = layer_and_input
  base = run(layer, x)
  out = run(
    perturbed(layer, ['self_attn.moe_k_proj', 'self_attn.moe_v_proj', 'moe_input_layernorm']), x
  )
  first_vision = int(np.argmax(VISION))
  np.testing.assert_array_equal(moved(base, out), np.arange(T) >= first_vision)


def test_text_only_sequence_ignores_vision_copies(layer_and_input):
  layer, x = layer_and_input
  no_vision = np.zeros(T, bool)
  base = run(layer, x, no_vision)
  moe = [name for name in vars(layer) if name.startswith('moe_')]
  moe += [f'self_attn.{name}' for name in vars(layer.self_attn) if name.startswith('moe_')]
  out = run(perturbed(layer, moe), x, no_vision)
  np.testing.assert_array_equal(out, base)


def test_moe_part_selects_decomposed_parts(tiny_cfg):
  cfg = ModelConfig(**{**tiny_cfg.__dict__, 'moe_part': 'mlp'})
  layer = DecoderLayer(cfg, rngs=nnx.Rngs(0))
  names = {'.'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert any(n.startswith('moe_mlp') for n in names)
  assert not any('moe_q_proj' in n or 'moe_input_layernorm' in n for n in names)
  with pytest.raises(ValueError, match='unknown parts'):
    ModelConfig(**{**tiny_cfg.__dict__, 'moe_part': 'mlp-attention'})
