"""EVEv2 vision tokenizer (patch embedding layer) and the splice of visual tokens into the sequence.

The reference runs conv(16x16, stride 16) -> GELU -> conv(2x2, stride 2) on the image. A convolution
whose kernel equals its stride is a linear map of each flattened patch, so on the patch-sequence
batch format (see evejax/batch.py) the tokenizer is two matmuls over a fixed-size buffer of patch
groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from evejax import batch as batch_format
from evejax.models import layers
from evejax.models.config import ModelConfig

Array = jax.Array
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(patches: Array, dtype) -> Array:
  """uint8 (..., p*p*3) pixels in (y, x, c) order -> CLIP-normalised floats."""
  x = patches.astype(jnp.float32).reshape(*patches.shape[:-1], -1, 3) / 255.0
  x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
  return x.reshape(patches.shape).astype(dtype)


class VisionTokenizerV2(nnx.Module):
  """Patch groups (B, P, merge**2, patch**2*3) uint8 -> visual token embeddings (B, P, D)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, d, p, m = cfg.vision_hidden_size, cfg.hidden_size, cfg.vision_patch_size, cfg.vision_merge
    kw = dict(use_bias=True, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
    # Kernels are the reference conv weights flattened in (ky, kx, in_channel) order.
    self.patch_conv = layers.dense(p * p * 3, c, ('patch', 'vision_embed'), **kw)
    self.merge_conv = layers.dense(m * m * c, d, ('vision_embed', 'embed'), **kw)
    init = nnx.initializers.normal(1.0)
    self.class_embedding = nnx.Param(
      init(rngs.params(), (d,), cfg.jnp_param_dtype), **layers.logical('embed')
    )
    self.split_embedding = nnx.Param(
      init(rngs.params(), (d,), cfg.jnp_param_dtype), **layers.logical('embed')
    )

  def __call__(self, patches: Array) -> Array:
    b, p, s, _ = patches.shape
    x = jax.nn.gelu(
      self.patch_conv(normalize_pixels(patches, self.cfg.jnp_dtype)), approximate=False
    )
    return self.merge_conv(x.reshape(b, p, s * x.shape[-1]))


def splice(
  text_embeds: Array,
  visual_embeds: Array,
  token_kind: Array,
  patch_index: Array,
  class_embedding: Array,
  split_embedding: Array,
) -> Array:
  """Fills the visual positions: patch tokens by index, class and split tokens by kind."""
  patch_tokens = jnp.take_along_axis(visual_embeds, patch_index[..., None], axis=1)
  kind = token_kind[..., None]
  x = jnp.where(kind == batch_format.PATCH, patch_tokens.astype(text_embeds.dtype), text_embeds)
  x = jnp.where(kind == batch_format.CLASS, class_embedding.astype(x.dtype), x)
  return jnp.where(kind == batch_format.SPLIT, split_embedding.astype(x.dtype), x)
