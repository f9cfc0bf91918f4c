"""Decoder building blocks against NumPy implementations written here."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from evejax.models import attention, layers
from evejax.models.decoder import Attention


def np_rmsnorm(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, positions, theta):
  """Rotate-half RoPE written per pair of dimensions (i, i + H/2)."""
  h = x.shape[-1]
  out = np.empty_like(x)
  for i in range(h // 2):
    freq = theta ** (-2 * i / h)
    ang = positions[..., None] * freq  # (B, T, 1) broadcast over heads
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., i], x[..., i + h // 2]
    out[..., i] = a * cos - b * sin
    out[..., i + h // 2] = b * cos + a * sin
  return out


def np_attention(q, k, v, segment_ids):
  """Causal GQA with segment masking, one query at a time."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for head in range(n):
      kv = head // group
      for i in range(t):
        allowed = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
        logits = np.array([q[bi, i, head] @ k[bi, j, kv] for j in allowed]) / np.sqrt(h)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, i, head] = sum(pj * v[bi, j, kv] for pj, j in zip(p, allowed))
  return out


def test_rmsnorm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  norm = layers.RMSNorm(16, eps=1e-6)
  scale = rng.normal(size=16).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  np.testing.assert_allclose(norm(jnp.asarray(x)), np_rmsnorm(x, scale, 1e-6), rtol=1e-5, atol=1e-6)


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  pos = np.tile(np.arange(6), (2, 1)) + np.array([[0], [5]])
  got = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 1e6))
  np.testing.assert_allclose(got, np_rope(x, pos.astype(np.float32), 1e6), atol=1e-5)
  # Dot products depend only on the position difference.
  q = layers.apply_rope(jnp.asarray(x[:1, :1]), jnp.asarray([[3]]), 100.0)
  k = layers.apply_rope(jnp.asarray(x[:1, 1:2]), jnp.asarray([[1]]), 100.0)
  q2 = layers.apply_rope(jnp.asarray(x[:1, :1]), jnp.asarray([[12]]), 100.0)
  k2 = layers.apply_rope(jnp.asarray(x[:1, 1:2]), jnp.asarray([[10]]), 100.0)
  np.testing.assert_allclose(jnp.sum(q * k), jnp.sum(q2 * k2), rtol=1e-4)


def test_gqa_attention_with_causal_and_segment_mask(tiny_cfg):
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  got = attention.self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg))
  np.testing.assert_allclose(got, np_attention(q, k, v, seg), atol=1e-5)


def test_attention_module_projections_and_rope(tiny_cfg):
  """Full attention block (biases, GQA, RoPE, output projection) against NumPy."""
  cfg = tiny_cfg
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
    proj.bias[...] = jnp.asarray(rng.normal(size=proj.bias.shape).astype(np.float32))
  x = rng.normal(size=(1, 5, cfg.hidden_size)).astype(np.float32)
  pos = np.arange(5)[None]
  seg = np.ones((1, 5), np.int32)
  got = attn.o_proj(
    attn.attend(attn.qkv_op(False)(jnp.asarray(x)), jnp.asarray(pos), jnp.asarray(seg))
  )

  def lin(p, inp):
    w = np.asarray(p.kernel[...])
    return inp @ w + (np.asarray(p.bias[...]) if p.bias is not None else 0)

  q = lin(attn.q_proj, x).reshape(1, 5, cfg.num_heads, cfg.head_dim)
  k = lin(attn.k_proj, x).reshape(1, 5, cfg.num_kv_heads, cfg.head_dim)
  v = lin(attn.v_proj, x).reshape(1, 5, cfg.num_kv_heads, cfg.head_dim)
  q, k = (
    np_rope(q, pos.astype(np.float32), cfg.rope_theta),
    np_rope(k, pos.astype(np.float32), cfg.rope_theta),
  )
  want = lin(attn.o_proj, np_attention(q, k, v, seg).reshape(1, 5, -1))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_swiglu_matches_numpy():
  mlp = layers.MLP(16, 24, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(4).normal(size=(3, 16)).astype(np.float32)
  g = x @ np.asarray(mlp.gate_proj.kernel[...])
  u = x @ np.asarray(mlp.up_proj.kernel[...])
  want = (g / (1 + np.exp(-g)) * u) @ np.asarray(mlp.down_proj.kernel[...])
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, atol=1e-5)
