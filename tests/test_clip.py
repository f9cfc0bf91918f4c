"""The Flax CLIP ViT teacher against a NumPy ViT and transformers' CLIPVisionModel (loaded from
safetensors through the one CLIP key map, evejax/convert/keymap.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax.batch import BatchSpec
from evejax.convert import importer, keymap
from evejax.data import encode, images
from evejax.models import clip
from evejax.models.vision import CLIP_MEAN, CLIP_STD

CFG = clip.CLIPVisionConfig(
  hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=42, patch_size=14
)


def _hf_model_file(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from safetensors.torch import save_file

  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(
    transformers.CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      image_size=42,
      patch_size=14,
      hidden_act='quick_gelu',
    )
  ).eval()
  path = str(tmp_path / 'model.safetensors')
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
  return hf, path


def test_matches_transformers_clip_vision_model(tmp_path):
  import torch

  hf, path = _hf_model_file(tmp_path)
  model = clip.CLIPVision(CFG, rngs=nnx.Rngs(1))
  importer.load_clip(model, path)
  pixels = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  with torch.no_grad():
    expected = hf(
      torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True
    ).hidden_states
  got = model(jnp.asarray(pixels))
  assert len(got) == len(expected) == CFG.num_layers + 1
  for ours, theirs in zip(got, expected):
    assert np.abs(np.asarray(ours) - theirs.numpy()).max() <= 1e-5


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_hf_state_dict_to_evejax_and_back_through_the_key_map(tmp_path):
  """HF tensors -> evejax (load_clip) -> HF layout (the specs' keys and `to_torch_layout`) gives
  back transformers' CLIPVisionModel state dict: the same keys, shapes and bits."""
  hf, path = _hf_model_file(tmp_path)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  expected = {key: state[name] for key, name in keymap.clip_official_keys(state, 'hf').items()}
  model = clip.CLIPVision(CFG, rngs=nnx.Rngs(1))
  importer.load_clip(model, path)
  params = _params(model)
  back = {
    s.key: keymap.to_torch_layout(s, np.asarray(keymap.get_param(params, s)))
    for s in keymap.clip_tensor_specs(CFG)
  }
  assert back.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_clip_model_file_loads_its_vision_tower(tmp_path):
  """CLIPModel files hold the tower under `vision_model.`, beside the text tower's tensors."""
  hf, path = _hf_model_file(tmp_path)  # skips the test without torch / transformers
  import torch
  from safetensors.torch import save_file

  state = hf.state_dict()
  tower = {
    key: state[name].contiguous() for key, name in keymap.clip_official_keys(state, 'hf').items()
  }
  text = {
    'text_model.encoder.layers.0.mlp.fc1.weight': torch.zeros(4, 2),
    'logit_scale': torch.zeros(()),
  }
  save_file({**tower, **text}, str(tmp_path / 'clip_model.safetensors'))
  vision_only, clip_model = (clip.CLIPVision(CFG, rngs=nnx.Rngs(i)) for i in (1, 2))
  importer.load_clip(vision_only, path)
  importer.load_clip(clip_model, str(tmp_path / 'clip_model.safetensors'))
  jax.tree.map(np.testing.assert_array_equal, _params(vision_only), _params(clip_model))


def _np_layer_norm(x, norm, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def _np_linear(x, dense):
  return x @ np.asarray(dense.kernel[...]) + np.asarray(dense.bias[...])


def test_matches_a_numpy_vit(tmp_path):
  """HF CLIP ViT written out in NumPy: patch conv + class token + positions, pre-norm, encoder
  layers (pre-LN attention with biases, quick-GELU MLP); hidden states after every layer."""
  model = clip.CLIPVision(CFG, rngs=nnx.Rngs(2))
  pixels = np.random.default_rng(3).normal(size=(42, 42, 3)).astype(np.float64)
  p, c, eps = CFG.patch_size, CFG.hidden_size, CFG.layer_norm_eps
  kernel = np.asarray(model.patch_embedding.kernel[...]).reshape(p, p, 3, c)
  tokens = [
    np.einsum('yxk,yxkc->c', pixels[r * p : (r + 1) * p, q * p : (q + 1) * p], kernel)
    for r in range(3)
    for q in range(3)
  ]
  x = np.stack([np.asarray(model.class_embedding[...])] + tokens)
  x = _np_layer_norm(x + np.asarray(model.position_embedding[...]), model.pre_layrnorm, eps)
  expected = [x]
  for layer in model.layers:
    h = _np_layer_norm(x, layer.layer_norm1, eps)
    heads = lambda y: y.reshape(len(y), CFG.num_heads, -1).transpose(1, 0, 2)
    attn = layer.self_attn
    q, k, v = (heads(_np_linear(h, d)) for d in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c // CFG.num_heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    x = x + _np_linear(out.transpose(1, 0, 2).reshape(len(x), c), attn.out_proj)
    h = _np_linear(_np_layer_norm(x, layer.layer_norm2, eps), layer.mlp.fc1)
    x = x + _np_linear(h / (1 + np.exp(-1.702 * h)), layer.mlp.fc2)
    expected.append(x)
  got = model(jnp.asarray(pixels, jnp.float32)[None])
  for ours, want in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(ours)[0], want, atol=2e-5, rtol=1e-4)


def test_patch_features_of_a_full_canvas_image_equal_the_image_path(tmp_path):
  model = clip.CLIPVision(CFG, rngs=nnx.Rngs(1))
  # An 84 px EVE image = 3x3 visual tokens of 28 px = the 3x3 CLIP grid of the 42 px image.
  pixels = np.random.default_rng(1).integers(0, 256, (84, 84, 3), dtype=np.uint8)
  groups, _ = images.patchify(images.with_valid_channel(pixels, 28), 14, 2)
  ex = encode.encode_example([-200], [False], [(groups, (3, 3))])
  row = encode.pack_row(
    [ex], BatchSpec(seq_len=16, patch_slots=12, patch_size=14, merge=2, channels=4, image_keys=True)
  )
  got = model.patch_features(
    *(jnp.asarray(row[k])[None] for k in ('patches', 'patch_image', 'patch_coords'))
  )
  half = pixels.reshape(42, 2, 42, 2, 3).mean(axis=(1, 3)) / 255.0  # the 2x2 box-filtered image
  normalised = (half - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  expected = model(jnp.asarray(normalised, jnp.float32)[None])[CFG.select_layer][:, 1:]
  np.testing.assert_allclose(np.asarray(got)[:, :9], np.asarray(expected), atol=1e-4, rtol=1e-4)


def test_loading_a_file_of_another_size_names_the_key(tmp_path):
  _, path = _hf_model_file(tmp_path)
  wrong = clip.CLIPVision(
    clip.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, image_size=42, patch_size=14
    ),
    rngs=nnx.Rngs(0),
  )
  with pytest.raises(ValueError, match='encoder.layers.3'):
    importer.load_clip(wrong, path)
