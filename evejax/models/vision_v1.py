"""EVEv1 patch embedding layer (the reference's `VisionTokenizer`) and its `mlp2x_gelu` projector.

One EVEv1 visual token covers 2x2 patches of 14 px, exactly one patch group of the batch format
(merge=2), so on patch groups (B, P, 4, 14*14*4) the reference's per-image loops become:

  conv 14x14 (no bias)      -> a matmul per sub-patch: F (B, P, 4, C)
  local attention           -> query = mean of the group's 4 patches, keys/values = the 4 patches
  global attention          -> query = class embedding, keys/values = the local tokens of one image
                               (groups with the same `patch_image`), softmax per image
  layout                    -> [CLASS] + rows x (cols PATCH + SPLIT), spliced by `vision.splice`
  mm_projector              -> Linear -> GELU (erf) -> Linear on every visual token, CLASS and SPLIT

Attention logits are scaled by C**-0.5 (the full width, as the reference does, not the head width).
The 4th pixel channel is the valid-pixel mask (255 valid, 0 padding); the tokenizer itself ignores
it (the reference crops to the valid box before the conv); PAL uses it to skip padded groups.

Parameter names follow the reference; PyTorch `nn.Sequential` indices become names:

| reference key | here |
| --- | --- |
| `patch_embedding.weight` (C, 3, 14, 14) | `patch_embedding.kernel` (14*14*3, C), (y, x, c) |
| `class_embedding`, `split_embedding` (C,) | same |
| `{local,global}_attention.q.0.{weight,bias}` | `{local,global}_attention.q.norm.{scale,bias}` |
| `{local,global}_attention.q.1.weight` | `{local,global}_attention.q.proj.kernel` |
| `{local,global}_attention.kv.{0,1}.*` | `{local,global}_attention.kv.{norm,proj}.*` |
| `{local,global}_attention.proj.{weight,bias}` | `{local,global}_attention.proj.{kernel,bias}` |
| `model.mm_projector.0.*`, `model.mm_projector.2.*` | `vision_tower.mm_projector.{fc1,fc2}.*` |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from evejax import batch as batch_format
from evejax.models import layers
from evejax.models.config import ModelConfig
from evejax.models.vision import normalize_pixels

Array = jax.Array
LAYER_NORM_EPS = 1e-5  # PyTorch default, used by every LayerNorm of the reference PEL and PAL.


def layer_norm(dim: int, axis: str, *, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim,
    epsilon=LAYER_NORM_EPS,
    param_dtype=param_dtype,
    scale_metadata=layers.logical(axis),
    bias_metadata=layers.logical(axis),
    rngs=rngs,
  )


class NormLinear(nnx.Module):
  """LayerNorm -> Linear without bias (the reference's `Sequential(LayerNorm, Linear)`)."""

  def __init__(
    self, dim: int, out: int, axes: tuple[str, str], *, dtype, param_dtype, rngs: nnx.Rngs
  ):
    self.norm = layer_norm(dim, axes[0], param_dtype=param_dtype, rngs=rngs)
    self.proj = layers.dense(
      dim, out, axes, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: Array) -> Array:
    return self.proj(self.norm(x))


class PooledAttention(nnx.Module):
  """The reference's LocalAttention / GlobalAttention parameters: q, kv (K then V) and proj."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    c = cfg.vision_hidden_size
    self.heads = cfg.vision_heads
    self.scale = c**-0.5
    kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
    self.q = NormLinear(c, c, ('vision_embed', None), **kw)
    self.kv = NormLinear(c, 2 * c, ('vision_embed', None), **kw)
    self.proj = layers.dense(c, c, (None, 'vision_embed'), use_bias=True, **kw)

  def split_heads(self, x: Array) -> Array:
    return x.reshape(*x.shape[:-1], self.heads, -1)

  def keys_values(self, x: Array) -> tuple[Array, Array]:
    k, v = jnp.split(self.kv(x), 2, axis=-1)
    return self.split_heads(k), self.split_heads(v)


def local_attention(attn: PooledAttention, features: Array) -> Array:
  """features (B, P, S, C) -> local tokens (B, P, C): the pooled group attends to its S patches."""
  pooled = features.mean(axis=2)
  q = attn.split_heads(attn.q(pooled))  # (B, P, H, h)
  k, v = attn.keys_values(features)  # (B, P, S, H, h)
  logits = jnp.einsum('bpnh,bpsnh->bpns', q, k).astype(jnp.float32) * attn.scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bpns,bpsnh->bpnh', weights, v)
  return pooled + attn.proj(out.reshape(pooled.shape))


def global_attention(
  attn: PooledAttention, class_embedding: Array, tokens: Array, patch_image: Array
) -> Array:
  """Class token of every image: (B, P + 1, C), row b, entry i = image i of the row (i >= 1).

  The class embedding attends to the local tokens (B, P, C) of its image only, a softmax per
  (row, image) segment. Entry 0 collects the empty slots (`patch_image` 0) and is never read.
  """
  b, p, c = tokens.shape
  q = attn.split_heads(attn.q(class_embedding))  # (H, h)
  k, v = attn.keys_values(tokens)  # (B, P, H, h)
  logits = jnp.einsum('nh,bpnh->bpn', q, k).astype(jnp.float32) * attn.scale
  # One segment per (row, image number); empty slots (image 0) go to a segment never read.
  segments = (patch_image + jnp.arange(b)[:, None] * (p + 1)).reshape(-1)
  logits = logits.reshape(b * p, -1)
  peak = jax.ops.segment_max(logits, segments, num_segments=b * (p + 1))
  weights = jnp.exp(logits - peak[segments])
  denom = jax.ops.segment_sum(weights, segments, num_segments=b * (p + 1))
  weighted = weights[..., None].astype(v.dtype) * v.reshape(b * p, *v.shape[2:])
  out = jax.ops.segment_sum(weighted, segments, num_segments=b * (p + 1))
  # Empty segments divide by 1, not by a tiny number whose gradient overflows.
  out = out / jnp.where(denom > 0, denom, 1.0)[..., None].astype(out.dtype)
  present = (denom > 0).any(-1).reshape(b, p + 1, 1)
  update = attn.proj(out.reshape(b, p + 1, c))
  return class_embedding + jnp.where(present, update, 0).astype(tokens.dtype)


class Projector(nnx.Module):
  """`mlp2x_gelu`: Linear(C -> D) -> exact GELU -> Linear(D -> D)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
    self.fc1 = layers.dense(
      cfg.vision_hidden_size, cfg.hidden_size, ('vision_embed', 'embed'), **kw
    )
    self.fc2 = layers.dense(cfg.hidden_size, cfg.hidden_size, (None, 'embed'), **kw)

  def __call__(self, x: Array) -> Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def split_channels(patches: Array, channels: int = 4) -> tuple[Array, Array]:
  """uint8 (..., p*p*4) -> RGB (..., p*p*3) uint8 and the valid-pixel mask (..., p*p) bool."""
  x = patches.reshape(*patches.shape[:-1], -1, channels)
  rgb = x[..., :3].reshape(*patches.shape[:-1], -1)
  return rgb, x[..., 3] > 0


def image_extent(patch_image: Array, patch_coords: Array) -> Array:
  """(B, P, 2): the (rows, cols) of the grid of each group's image (V1_KEYS of evejax/batch.py)."""
  b, p = patch_image.shape
  segments = (patch_image + jnp.arange(b)[:, None] * (p + 1)).reshape(-1)
  extent = jax.ops.segment_max(patch_coords.reshape(-1, 2), segments, num_segments=b * (p + 1))
  return (extent[segments] + 1).reshape(b, p, 2)


def image_numbers(token_kind: Array) -> Array:
  """Per position, the row-local number (1, 2, ...) of the latest image whose CLASS token began;
  images are numbered in order of appearance, the order `patch_image` uses."""
  return jnp.cumsum(token_kind == batch_format.CLASS, axis=-1)


class VisionTokenizerV1(nnx.Module):
  """Patch groups (B, P, 4, 14*14*4) uint8 -> group tokens (B, P, D), per-image class tokens
  (B, P + 1, D) indexed by image number, and the split token (D,), projected to the LLM width."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vision_tokenizer != 'v1' or cfg.vision_merge != 2:
      raise ValueError(
        'VisionTokenizerV1 needs model.vision_tokenizer="v1" and model.vision_merge=2 '
        f'(2x2 local windows), got {cfg.vision_tokenizer!r}, {cfg.vision_merge}'
      )
    self.cfg = cfg
    c, p = cfg.vision_hidden_size, cfg.vision_patch_size
    self.patch_embedding = layers.dense(
      p * p * 3,
      c,
      ('patch', 'vision_embed'),
      use_bias=False,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      rngs=rngs,
    )
    init = nnx.initializers.normal(1.0)
    self.class_embedding = nnx.Param(
      init(rngs.params(), (c,), cfg.jnp_param_dtype), **layers.logical('vision_embed')
    )
    self.split_embedding = nnx.Param(
      init(rngs.params(), (c,), cfg.jnp_param_dtype), **layers.logical('vision_embed')
    )
    self.local_attention = PooledAttention(cfg, rngs=rngs)
    self.global_attention = PooledAttention(cfg, rngs=rngs)
    self.mm_projector = Projector(cfg, rngs=rngs)

  def __call__(self, patches: Array, patch_image: Array) -> tuple[Array, Array, Array]:
    rgb, _ = split_channels(patches)
    features = self.patch_embedding(normalize_pixels(rgb, self.cfg.jnp_dtype))
    local = local_attention(self.local_attention, features)
    dtype = self.cfg.jnp_dtype
    classes = global_attention(
      self.global_attention, self.class_embedding[...].astype(dtype), local, patch_image
    )
    return (
      self.mm_projector(local),
      self.mm_projector(classes),
      self.mm_projector(self.split_embedding[...].astype(dtype)),
    )
