"""Decoder layers with EVEv2's modality-wise decomposition ("divide and conquer").

Attribute names mirror the reference checkpoint keys (`self_attn.moe_q_proj`, `moe_mlp`, ...), so
the converters map names one to one. With `moe_part=''` the layer is a plain Llama/Qwen2 decoder
layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.models import attention, layers
from evejax.models.config import ModelConfig
from evejax.models.routing import Op, Router

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
    self.cached_key = self.cached_value = self.cached_segments = self.cache_index = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> None:
    """Allocates a static-shape KV cache of `max_len` slots. The first call (the prefill) attends
    among its own tokens; every later call (one token a row) attends over the written slots of its
    segment. Slots never written carry segment id -1, which no token has."""
    shape = (batch_size, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_segments = nnx.Cache(jnp.full((batch_size, max_len), -1, jnp.int32))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _append_to_cache(self, k: Array, v: Array, segment_ids: Array) -> None:
    start = self.cache_index[...]
    for cache, new in (
      (self.cached_key, k),
      (self.cached_value, v),
      (self.cached_segments, segment_ids),
    ):
      cache[...] = jax.lax.dynamic_update_slice_in_dim(
        cache[...], new.astype(cache.dtype), start, axis=1
      )
    self.cache_index[...] = start + k.shape[1]

  def qkv_op(self, vision: bool) -> Op | None:
    """q, k and v projections side by side, [n, D] -> [n, (N + 2K) H]; None for the vision
    branch when the projections are not decomposed."""
    projections = (
      (self.moe_q_proj, self.moe_k_proj, self.moe_v_proj)
      if vision
      else (self.q_proj, self.k_proj, self.v_proj)
    )
    if projections[0] is None:
      return None
    return lambda h: jnp.concatenate([p(h) for p in projections], axis=-1)

  def out_op(self, vision: bool) -> Op | None:
    return self.moe_o_proj if vision else self.o_proj

  def attend(self, qkv: Array, positions: Array, segment_ids: Array) -> Array:
    """qkv [B, T, (N + 2K) H] -> attention output [B, T, N H], RoPE applied to q and k."""
    cfg = self.cfg
    b, t, _ = qkv.shape
    n, k = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q = qkv[..., :n].reshape(b, t, cfg.num_heads, -1)
    key = qkv[..., n : n + k].reshape(b, t, cfg.num_kv_heads, -1)
    value = qkv[..., n + k :].reshape(b, t, cfg.num_kv_heads, -1)
    q = layers.apply_rope(q, positions, cfg.rope_theta)
    key = layers.apply_rope(key, positions, cfg.rope_theta)
    prefill = self.cached_key is None or t > 1
    if self.cached_key is not None:
      self._append_to_cache(key, value, segment_ids)
    if prefill:
      out = attention.self_attention(
        q, key, value, segment_ids, cfg.attention, max_segments=cfg.max_segments
      )
    else:
      out = attention.cache_attention(
        q, self.cached_key[...], self.cached_value[...], segment_ids, self.cached_segments[...]
      )
    return out.reshape(b, t, -1)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x += O(Attn(N1(x))); x += MLP(N2(x)). Each chain of per-token ops
  (norm -> q/k/v, o, norm -> MLP) is routed as one."""

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

  def __call__(self, x: Array, router: Router, positions: Array, segment_ids: Array) -> Array:
    """x [B, T, D] in the router's layout (routing.py); positions, segment_ids [B, T] in sequence
    order (attention leaves the layout)."""
    attn = self.self_attn
    qkv = router(
      x,
      *_chains(
        (self.input_layernorm, self.moe_input_layernorm), (attn.qkv_op(False), attn.qkv_op(True))
      ),
    )
    attended = router.enter(attn.attend(router.leave(qkv), positions, segment_ids))
    x = x + router(attended, attn.out_op(False), attn.out_op(True))
    return x + router(
      x,
      *_chains(
        (self.post_attention_layernorm, self.moe_post_attention_layernorm),
        (self.mlp, self.moe_mlp),
      ),
    )


def _chains(norms: tuple, ops: tuple) -> tuple[Op, Op | None]:
  """The (text, vision) chains norm -> op, from (text, vision) pairs of modules; a vision module
  that is None (not decomposed) is replaced by the text one, and the vision chain is None (every
  token takes the text chain) when neither is decomposed."""
  text_norm, text_op = norms[0], ops[0]
  text = lambda h: text_op(text_norm(h))
  if norms[1] is None and ops[1] is None:
    return text, None
  vision_norm, vision_op = norms[1] or text_norm, ops[1] or text_op
  return text, lambda h: vision_op(vision_norm(h))
