"""Transformer building blocks shared by the Llama (EVEv1) and Qwen2 (EVEv2) decoders.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...); the
sharding rules in the config map them to mesh axes, so changing the parallelism never touches this
file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
INIT_STD = 0.02  # HF `initializer_range` for Llama and Qwen2.


def logical(*axes: str | None) -> dict:
  """Variable metadata naming logical axes. Placement is left to evejax.sharding (no eager
  sharding), so modules build the same way with or without a mesh."""
  return {'sharding': axes, 'eager_sharding': False}


def dense(
  in_features: int,
  out_features: int,
  axes: tuple[str | None, str | None],
  *,
  use_bias: bool,
  dtype,
  param_dtype,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """A Linear layer whose kernel and bias carry logical axis names."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nnx.initializers.normal(INIT_STD),
    kernel_metadata=logical(*axes),
    bias_metadata=logical(*axes[1:]),
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 and cast back before the scale, as in HF Llama/Qwen2."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical('norm'))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half layout. x: (B, T, N, H); positions: (B, T)."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(dim, hidden, ('embed', 'mlp'), **kw)
    self.up_proj = dense(dim, hidden, ('embed', 'mlp'), **kw)
    self.down_proj = dense(hidden, dim, ('mlp', 'embed'), **kw)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
