"""EVEv1 patch-aligning layer (PAL, the reference's `VisionCompressor`).

From the decoder's hidden states at every `pal_layer_rate`-th entry of HF's `hidden_states` tuple
(index num_layers = the final output after the norm, ..., 0 = the input embeddings), PAL predicts
the teacher's (CLIP ViT) patch feature of every visual token:

  z_j  = norm_layer[j](hidden[tap_j])             LayerNorm(D) -> Linear(D -> c), per tap
  attn = softmax_j(z_0 . z_j * c**-0.5) z_j       over taps 1.., pal_heads heads, K = V = z_j
  pred = input_layer(hidden[num_layers]) + output_layer(attn)

The training objective built on it (which tokens count, HD pooling, the cosine loss, the teacher)
is in evejax/train/pal.py; at inference the layer is unused.

Names: reference `norm_layer.{j}.0` / `.1` are `pal.norm_layer.{j}.norm` / `.proj`; `input_layer`
and `output_layer` keep their names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.models import layers
from evejax.models.config import ModelConfig
from evejax.models.vision_v1 import NormLinear

Array = jax.Array


def tap_indices(num_layers: int, rate: int) -> tuple[int, ...]:
  """[num_layers, num_layers - rate, ..., 0]: for Vicuna-7B (32, rate 4), the reference's 9 taps."""
  return tuple(range(num_layers, -1, -rate))


class PatchAligningLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, c = cfg.hidden_size, cfg.pal_teacher_size
    kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
    self.taps = tap_indices(cfg.num_layers, cfg.pal_layer_rate)
    self.heads = cfg.pal_heads
    self.scale = c**-0.5
    self.norm_layer = nnx.List(
      [NormLinear(d, c, ('embed', 'vision_embed'), **kw) for _ in self.taps]
    )
    self.input_layer = layers.dense(d, c, ('embed', 'vision_embed'), use_bias=True, **kw)
    self.output_layer = layers.dense(c, c, (None, 'vision_embed'), use_bias=True, **kw)

  def __call__(self, tapped: list[Array]) -> Array:
    """Hidden states of the taps, each (..., D), in `self.taps` order -> predictions (..., c)."""
    z = jnp.stack([norm(h) for norm, h in zip(self.norm_layer, tapped)], axis=-2)  # (..., T, c)
    z = z.reshape(*z.shape[:-1], self.heads, -1)
    logits = jnp.einsum('...nh,...tnh->...nt', z[..., 0, :, :], z[..., 1:, :, :])
    weights = jax.nn.softmax(logits.astype(jnp.float32) * self.scale, axis=-1).astype(z.dtype)
    attended = jnp.einsum('...nt,...tnh->...nh', weights, z[..., 1:, :, :])
    return self.input_layer(tapped[0]) + self.output_layer(
      attended.reshape(*attended.shape[:-2], -1)
    )
