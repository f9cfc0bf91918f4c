"""EVEv2 vision tokenizer, token layout and splicing against a NumPy convolution written here."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.data import encode, images
from evejax.models import EVE
from evejax.models.vision import CLIP_MEAN, CLIP_STD

GELU = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))


def np_conv(x, kernel, bias, stride):
  """Strided convolution, kernel (kh, kw, cin, cout), no padding, on an (H, W, cin) map."""
  kh = kernel.shape[0]
  rows, cols = x.shape[0] // stride, x.shape[1] // stride
  out = np.zeros((rows, cols, kernel.shape[-1]), np.float64)
  for r in range(rows):
    for c in range(cols):
      window = x[r * stride : r * stride + kh, c * stride : c * stride + kh]
      out[r, c] = np.tensordot(window, kernel, axes=3) + bias
  return out


def np_visual_tokens(model, pixels):
  """Reference forward of one image: conv -> GELU -> conv -> split column -> class token."""
  cfg, vt = model.cfg, model.vision_tower
  p, m, c = cfg.vision_patch_size, cfg.vision_merge, cfg.vision_hidden_size
  x = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  k1 = np.asarray(vt.patch_conv.kernel[...]).reshape(p, p, 3, c)
  k2 = np.asarray(vt.merge_conv.kernel[...]).reshape(m, m, c, cfg.hidden_size)
  x = GELU(np_conv(x, k1, np.asarray(vt.patch_conv.bias[...]), p))
  x = np_conv(x, k2, np.asarray(vt.merge_conv.bias[...]), m)
  rows, cols = x.shape[:2]
  split = np.broadcast_to(np.asarray(vt.split_embedding[...]), (rows, 1, cfg.hidden_size))
  grid = np.concatenate([x, split], axis=1).reshape(-1, cfg.hidden_size)
  return np.concatenate([np.asarray(vt.class_embedding[...])[None], grid])


@pytest.mark.parametrize('rows,cols', [(1, 1), (2, 3), (3, 1), (4, 4)])
def test_layout_count_and_order(rows, cols):
  kind, index = encode.visual_token_layout(rows, cols)
  assert len(kind) == 1 + rows * (cols + 1)
  assert kind[0] == bf.CLASS
  grid = kind[1:].reshape(rows, cols + 1)
  assert (grid[:, -1] == bf.SPLIT).all() and (grid[:, :-1] == bf.PATCH).all()
  np.testing.assert_array_equal(index[kind == bf.PATCH], np.arange(rows * cols))


def test_tokenizer_and_splice_match_numpy(tiny_cfg):
  """A text with one image placeholder: the model's input embeddings equal text embeddings around
  the NumPy visual tokens inserted at the placeholder."""
  model = EVE(tiny_cfg, rngs=nnx.Rngs(0))
  t = tiny_cfg.vision_patch_size * tiny_cfg.vision_merge  # One visual token, in pixels.
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2 * t, 3 * t, 3), dtype=np.uint8)  # 2 rows x 3 cols, non-square
  groups, grid = images.patchify(pixels, tiny_cfg.vision_patch_size, tiny_cfg.vision_merge)
  ids = [5, 6, bf.IMAGE_TOKEN_INDEX, 7, 8, 9]
  example = encode.encode_example(ids, [False] * 3 + [True] * 3, [(groups, grid)])
  row = encode.pack_row([example], BatchSpec.for_model(tiny_cfg, seq_len=24, patch_slots=8))
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  got = np.asarray(model.embed(batch))[0]

  visual = np_visual_tokens(model, pixels.astype(np.float64))
  assert len(visual) == 1 + 2 * (3 + 1)
  table = np.asarray(model.embed_tokens.embedding[...])
  want = np.concatenate([table[[5, 6]], visual, table[[7, 8, 9]]])
  n = len(want)
  np.testing.assert_allclose(got[:n], want, atol=1e-4)
  # Labels: the last visual token predicts the first supervised text token; targets are shifted.
  assert row['loss_weights'][:n].tolist() == [0] * (1 + len(visual)) + [1, 1, 1, 0]
  assert row['targets'][n - 4 : n - 1].tolist() == [7, 8, 9]
  assert (row['segment_ids'][:n] == 1).all() and (row['segment_ids'][n:] == 0).all()
