"""Decoder layers with EVEv2's modality-wise decomposition ("divide and conquer").

Attribute names mirror the reference checkpoint keys (`self_attn.moe_q_proj`, `moe_mlp`, ...), so
the converters map names one to one. With `moe_part=''` the layer is a plain Llama/Qwen2 decoder
layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.models import layers
from evejax.models.config import ModelConfig
from evejax.models.routing import route

Array = jax.Array


class Attention(nnx.Module):
  """Grouped-query self-attention; the q/k/v/o projections may have vision copies."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)

    def projections():
      return (
        layers.dense(d, n * h, ('embed', 'heads'), use_bias=cfg.attention_bias, **kw),
        layers.dense(d, k * h, ('embed', 'kv'), use_bias=cfg.attention_bias, **kw),
        layers.dense(d, k * h, ('embed', 'kv'), use_bias=cfg.attention_bias, **kw),
        layers.dense(n * h, d, ('heads', 'embed'), use_bias=False, **kw),
      )

    self.q_proj, self.k_proj, self.v_proj, self.o_proj = projections()
    if cfg.decomposes('self_attn'):
      self.moe_q_proj, self.moe_k_proj, self.moe_v_proj, self.moe_o_proj = projections()
    else:
      self.moe_q_proj = self.moe_k_proj = self.moe_v_proj = self.moe_o_proj = None
    # Generation's KV cache (see `init_cache`); None on the training path.
    self.cached_key = self.cached_value = self.cache_index = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> None:
    """Allocates a static-shape KV cache of `max_len` slots. Every later call writes its k/v at the
    next free slots and attends over all slots; the caller's mask (B, 1, T, max_len) hides the
    empty and padded ones."""
    shape = (batch_size, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _append_to_cache(self, k: Array, v: Array) -> tuple[Array, Array]:
    start = self.cache_index[...]
    for cache, new in ((self.cached_key, k), (self.cached_value, v)):
      cache[...] = jax.lax.dynamic_update_slice_in_dim(
        cache[...], new.astype(cache.dtype), start, axis=1
      )
    self.cache_index[...] = start + k.shape[1]
    return self.cached_key[...], self.cached_value[...]

  def project_qkv(self, x: Array, vision_mask: Array | None, positions: Array):
    """Routed q/k/v projections with RoPE applied: (B,T,N,H), (B,T,K,H), (B,T,K,H)."""
    cfg = self.cfg
    b, t, _ = x.shape
    mode = cfg.routing
    q = route(x, vision_mask, self.q_proj, self.moe_q_proj, mode).reshape(b, t, cfg.num_heads, -1)
    k = route(x, vision_mask, self.k_proj, self.moe_k_proj, mode).reshape(
      b, t, cfg.num_kv_heads, -1
    )
    v = route(x, vision_mask, self.v_proj, self.moe_v_proj, mode).reshape(
      b, t, cfg.num_kv_heads, -1
    )
    return (
      layers.apply_rope(q, positions, cfg.rope_theta),
      layers.apply_rope(k, positions, cfg.rope_theta),
      v,
    )

  def project_out(self, attn: Array, vision_mask: Array | None) -> Array:
    b, t = attn.shape[:2]
    return route(
      attn.reshape(b, t, -1), vision_mask, self.o_proj, self.moe_o_proj, self.cfg.routing
    )

  def __call__(self, x: Array, vision_mask: Array | None, positions: Array, mask: Array) -> Array:
    q, k, v = self.project_qkv(x, vision_mask, positions)
    if self.cached_key is not None:
      k, v = self._append_to_cache(k, v)
    return self.project_out(layers.dot_product_attention(q, k, v, mask), vision_mask)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x += O(Attn(N1(x))); x += MLP(N2(x)), each op routed per token."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    norm = lambda: layers.RMSNorm(
      cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_param_dtype
    )
    mlp = lambda: layers.MLP(
      cfg.hidden_size,
      cfg.intermediate_size,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      rngs=rngs,
    )
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()
    self.self_attn = Attention(cfg, rngs=rngs)
    self.mlp = mlp()
    split_norms = cfg.decomposes('layernorm')
    self.moe_input_layernorm = norm() if split_norms else None
    self.moe_post_attention_layernorm = norm() if split_norms else None
    self.moe_mlp = mlp() if cfg.decomposes('mlp') else None

  def __call__(self, x: Array, vision_mask: Array | None, positions: Array, mask: Array) -> Array:
    mode = self.cfg.routing
    h = route(x, vision_mask, self.input_layernorm, self.moe_input_layernorm, mode)
    x = x + self.self_attn(h, vision_mask, positions, mask)
    h = route(
      x, vision_mask, self.post_attention_layernorm, self.moe_post_attention_layernorm, mode
    )
    return x + route(h, vision_mask, self.mlp, self.moe_mlp, mode)
