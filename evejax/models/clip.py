"""A CLIP ViT vision encoder in Flax NNX with the HF `CLIPVisionModel` parameter layout: EVEv1's
frozen PAL teacher (openai/clip-vit-large-patch14-336 in the reference, penultimate layer).

The attribute paths are HF's, so the key map to HF files is short; it lives with the other key
maps in evejax/convert/keymap.py (`clip_tensor_specs`), and `evejax.convert.importer.load_clip`
reads a local HF safetensors file into this module.

Two entry points: `__call__` on pixel images (the HF computation), and `patch_features` on the
patch groups of the batch format (evejax/batch.py), where each 28x28 px group of the EVE image,
pooled 2x2, is one 14x14 px CLIP patch of the half-size image (the EVE-7B geometry: 672 px for
EVE, 336 px for CLIP). There each image sits centred on the CLIP canvas grid (its position
embeddings), but only its own patches enter attention: the canvas padding is left out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.models import layers
from evejax.models.vision import normalize_pixels
from evejax.models.vision_v1 import image_extent

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """HF CLIPVisionConfig fields; the defaults are openai/clip-vit-large-patch14-336."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  select_layer: int = -2  # index into the hidden-states tuple (EVEv1: the penultimate layer)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


def _norm(cfg: CLIPVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)


def _dense(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return layers.dense(
    n_in, n_out, (None, None), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
  )


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
    c = cfg.hidden_size
    self.heads = cfg.num_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_dense(c, c, rngs) for _ in range(4))

  def __call__(self, x: Array, mask: Array | None) -> Array:
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, -1)
    out = jax.nn.dot_product_attention(
      split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask=mask
    )
    return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
    self.fc1 = _dense(cfg.hidden_size, cfg.intermediate_size, rngs)
    self.fc2 = _dense(cfg.intermediate_size, cfg.hidden_size, rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
    self.layer_norm1 = _norm(cfg, rngs)
    self.self_attn = CLIPAttention(cfg, rngs)
    self.layer_norm2 = _norm(cfg, rngs)
    self.mlp = CLIPMLP(cfg, rngs)

  def __call__(self, x: Array, mask: Array | None) -> Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPVision(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, p = cfg.hidden_size, cfg.patch_size
    init = nnx.initializers.normal(layers.INIT_STD)
    self.patch_embedding = layers.dense(
      p * p * 3,
      c,
      (None, None),
      use_bias=False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    self.class_embedding = nnx.Param(init(rngs.params(), (c,)))
    self.position_embedding = nnx.Param(init(rngs.params(), (cfg.grid**2 + 1, c)))
    self.pre_layrnorm = _norm(cfg, rngs)  # (sic) the HF name
    self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.post_layernorm = _norm(cfg, rngs)  # unused by hidden states; kept for the HF layout

  def hidden_states(self, embeds: Array, mask: Array | None = None) -> list[Array]:
    """HF's `hidden_states`: the pre-layernormed embeddings, then every layer's output."""
    x = self.pre_layrnorm(embeds)
    states = [x]
    for layer in self.layers:
      x = layer(x, mask)
      states.append(x)
    return states

  def __call__(self, pixel_values: Array) -> list[Array]:
    """CLIP-normalised images (B, H, W, 3) -> hidden states, each (B, 1 + grid**2, c)."""
    b, h, w, _ = pixel_values.shape
    p = self.cfg.patch_size
    x = pixel_values.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    tokens = self.patch_embedding(x.reshape(b, -1, p * p * 3))
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, tokens.shape[-1]))
    return self.hidden_states(jnp.concatenate([cls, tokens], 1) + self.position_embedding[...])

  def patch_features(self, patches: Array, patch_image: Array, patch_coords: Array) -> Array:
    """Teacher features (B, P, c) of EVEv1 patch groups (B, P, 4, 14*14*C) uint8, C >= 3.

    Each row holds P group tokens and P class slots (slot j: image j + 1); a token attends to the
    tokens of its own image only. Empty slots attend to themselves and are never read.
    """
    b, p = patch_image.shape
    size = self.cfg.patch_size
    pixels = patches.reshape(b, p, 2, 2, size, size, -1)[..., :3].astype(jnp.float32)
    group = pixels.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, p, 2 * size, 2 * size, 3)
    pooled = group.reshape(b, p, size, 2, size, 2, 3).mean(axis=(3, 5))  # 2x2 box filter
    tokens = self.patch_embedding(normalize_pixels(pooled.reshape(b, p, -1), jnp.float32))
    tokens = (
      tokens + self.position_embedding[...][self._canvas_positions(patch_image, patch_coords)]
    )
    cls = self.class_embedding[...] + self.position_embedding[...][0]
    x = jnp.concatenate([tokens, jnp.broadcast_to(cls, tokens.shape)], axis=1)
    slots = jnp.arange(p)
    owner = jnp.concatenate(
      [jnp.where(patch_image > 0, patch_image, -1 - slots), jnp.broadcast_to(slots + 1, (b, p))],
      axis=1,
    )
    mask = (owner[:, :, None] == owner[:, None, :])[:, None]
    return self.hidden_states(x, mask)[self.cfg.select_layer][:, :p]

  def _canvas_positions(self, patch_image: Array, patch_coords: Array) -> Array:
    """Position-embedding index of every group: its cell with the image centred on the grid."""
    extent = image_extent(patch_image, patch_coords)
    cell = patch_coords + jnp.maximum(self.cfg.grid - extent, 0) // 2
    cell = jnp.clip(cell, 0, self.cfg.grid - 1)
    return 1 + cell[..., 0] * self.cfg.grid + cell[..., 1]
