"""EVEv1 vision tokenizer, resize policy and token layout against NumPy written from the
reference."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.data import encode, images
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from evejax.models.vision import CLIP_MEAN, CLIP_STD

TINY = ModelConfig(
  family='llama',
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=4,
  head_dim=8,
  rope_theta=1e4,
  attention_bias=False,
  moe_part='',
  vision_tokenizer='v1',
  vision_patch_size=14,
  vision_merge=2,
  vision_hidden_size=16,
  vision_heads=2,
)


def np_layer_norm(x, norm):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def np_attend(q, k, v, heads, width):
  """One query (C,) over keys/values (n, C): per head softmax(q.k * width**-0.5) v."""
  out = []
  for qh, kh, vh in zip(np.split(q, heads), np.split(k, heads, -1), np.split(v, heads, -1)):
    logits = kh @ qh * width**-0.5
    w = np.exp(logits - logits.max())
    out.append((w / w.sum()) @ vh)
  return np.concatenate(out)


def np_block(attn, query, keys, heads):
  """The reference Local/GlobalAttention for one query vector and its key/value vectors."""
  c = query.shape[-1]
  q = np_layer_norm(query, attn.q.norm) @ np.asarray(attn.q.proj.kernel[...])
  kv = np_layer_norm(keys, attn.kv.norm) @ np.asarray(attn.kv.proj.kernel[...])
  out = np_attend(q, kv[:, :c], kv[:, c:], heads, c)
  return out @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])


def np_visual_tokens(model, pixels):
  """Reference PEL + projector on one (H, W, 3) uint8 image: the 1 + h*(w+1) visual tokens."""
  vt, heads = model.vision_tower, model.cfg.vision_heads
  x = (pixels / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  h, w = pixels.shape[0] // 14, pixels.shape[1] // 14
  # Conv 14x14 stride 14, no bias: kernel (14*14*3, C) in (y, x, c) order.
  fmap = x.reshape(h, 14, w, 14, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, -1)
  fmap = fmap @ np.asarray(vt.patch_embedding.kernel[...])
  local = []
  for i in range(0, h, 2):
    for j in range(0, w, 2):
      window = fmap[i : i + 2, j : j + 2].reshape(4, -1)
      pooled = window.mean(0)
      local.append(pooled + np_block(vt.local_attention, pooled, window, heads))
  local = np.stack(local)
  cls_emb = np.asarray(vt.class_embedding[...])
  cls = cls_emb + np_block(vt.global_attention, cls_emb, local, heads)
  split = np.asarray(vt.split_embedding[...])
  grid = local.reshape(h // 2, w // 2, -1)
  rows = np.concatenate([grid, np.broadcast_to(split, (h // 2, 1, split.shape[0]))], axis=1)
  tokens = np.concatenate([cls[None], rows.reshape(-1, split.shape[0])])
  proj = vt.mm_projector
  hidden = tokens @ np.asarray(proj.fc1.kernel[...]) + np.asarray(proj.fc1.bias[...])
  hidden = 0.5 * hidden * (1 + np.vectorize(__import__('math').erf)(hidden / np.sqrt(2)))
  return hidden @ np.asarray(proj.fc2.kernel[...]) + np.asarray(proj.fc2.bias[...])


def test_eve_v1_resize_matches_reference_table():
  # EVE_REFERENCE.md §2.2: long side 672, short side a multiple of 28.
  for raw, expected in [
    ((1024, 1024), (672, 672)),
    ((640, 480), (672, 504)),
    ((300, 200), (672, 448)),
    ((200, 300), (448, 672)),
  ]:
    assert images.target_size(*raw, 672, 28, 'eve_v1') == expected
  n_vis = lambda w, h: 1 + (h // 28) * (w // 28 + 1)
  assert [n_vis(672, 672), n_vis(672, 504), n_vis(672, 448)] == [601, 451, 401]
  with pytest.raises(ValueError, match='multiple of 28'):
    images.target_size(640, 480, 160, 28, 'eve_v1')


def test_valid_channel_and_patch_layout_of_padded_non_square_image():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
  padded = images.with_valid_channel(pixels, 28)
  assert padded.shape == (56, 84, 4)
  groups, grid = images.patchify(padded, 14, 2)
  assert grid == (2, 3) and groups.shape == (6, 4, 14 * 14 * 4)
  # NumPy: group (r, c) sub-patch (my, mx) pixel (y, x) is canvas pixel (28r+14my+y, 28c+14mx+x).
  canvas = np.zeros((56, 84, 4), np.uint8)
  canvas[..., :3] = images.V1_BACKGROUND
  canvas[:40, :70, :3], canvas[:40, :70, 3] = pixels, 255
  for g in range(6):
    r, c = divmod(g, 3)
    for s in range(4):
      my, mx = divmod(s, 2)
      y0, x0 = 28 * r + 14 * my, 28 * c + 14 * mx
      np.testing.assert_array_equal(
        groups[g, s].reshape(14, 14, 4), canvas[y0 : y0 + 14, x0 : x0 + 14]
      )
  valid = groups.reshape(6, 4, 196, 4)[..., 3].min(axis=(1, 2)) > 0
  np.testing.assert_array_equal(valid, [True, True, False, False, False, False])


def test_pack_row_numbers_images_and_cells_across_examples():
  rng = np.random.default_rng(1)
  patch = lambda h, w: images.patchify(
    images.with_valid_channel(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 28), 14, 2
  )
  one = encode.encode_example([1, bf.IMAGE_TOKEN_INDEX, 5], [False, False, True], [patch(28, 56)])
  two = encode.encode_example(
    [bf.IMAGE_TOKEN_INDEX, 2, bf.IMAGE_TOKEN_INDEX],
    [False, True, False],
    [patch(56, 28), patch(28, 28)],
  )
  spec = BatchSpec.for_model(TINY, seq_len=32, patch_slots=8)
  row = encode.pack_row([one, two], spec)
  np.testing.assert_array_equal(row['patch_image'], [1, 1, 2, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(
    row['patch_coords'], [[0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]]
  )
  plain = encode.pack_row([one, two], spec.replace(image_keys=False))
  assert 'patch_image' not in plain and 'patch_coords' not in plain


def test_visual_tokens_match_numpy_reference_for_two_images_in_a_row():
  model = EVE(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  raw = [
    rng.integers(0, 256, (56, 84, 3), dtype=np.uint8),
    rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
  ]  # the second one padded to 56x56
  padded = [images.with_valid_channel(p, 28) for p in raw]
  example = encode.encode_example(
    [1, bf.IMAGE_TOKEN_INDEX, 3, bf.IMAGE_TOKEN_INDEX, 4],
    [False] * 5,
    [images.patchify(p, 14, 2) for p in padded],
  )
  row = encode.pack_row([example], BatchSpec.for_model(TINY, seq_len=40, patch_slots=12))
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  embeds = np.asarray(model.embed(batch))[0]
  first = np_visual_tokens(model, padded[0][..., :3])  # 1 + 2 * 4 tokens at positions 1..9
  second = np_visual_tokens(model, padded[1][..., :3])  # 1 + 2 * 3 tokens at positions 11..17
  np.testing.assert_allclose(embeds[1:10], first, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(embeds[11:18], second, atol=2e-5, rtol=1e-4)
  text = np.asarray(model.embed_tokens.embedding[...])
  np.testing.assert_allclose(embeds[[0, 10, 18]], text[[1, 3, 4]])


def test_eve_v1_presets_build_the_llama_family():
  big = ModelConfig.from_dict(model_preset('eve_v1_7b'))
  assert (big.family, big.hidden_size, big.num_layers, big.num_kv_heads, big.vocab_size) == (
    'llama',
    4096,
    32,
    32,
    32000,
  )
  assert (
    big.vision_tokenizer,
    big.vision_patch_size,
    big.vision_hidden_size,
    big.moe_part,
    big.attention_bias,
    big.rope_theta,
    big.rms_norm_eps,
  ) == ('v1', 14, 1024, '', False, 1e4, 1e-5)
  tiny = ModelConfig.from_dict(model_preset('eve_v1_tiny'))
  model = EVE(tiny, rngs=nnx.Rngs(0))
  assert model.pal is not None and len(model.pal.norm_layer) == len(model.pal.taps)
  assert model.layers[0].self_attn.q_proj.bias is None and model.layers[0].moe_mlp is None
  with pytest.raises(ValueError, match='vision_merge=2'):
    EVE(dataclasses.replace(tiny, vision_merge=1), rngs=nnx.Rngs(0))
