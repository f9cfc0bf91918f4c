"""Next-token choice: repetition penalty, then greedy or temperature / top-k / top-p sampling.

The order and the semantics follow Hugging Face `generate` (the reference's generation code):
penalty on the raw logits, then temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. Frozen (hashable): it is a static argument of the jitted steps."""

  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy (the reference's benchmark setting).
  top_k: int = 0  # 0 = no top-k filter.
  top_p: float = 1.0  # 1 = no nucleus filter.
  repetition_penalty: float = 1.0  # 1 = off; Qwen2.5's generation_config uses 1.05.
  stop_tokens: tuple[int, ...] = ()  # A row finishes after emitting one (it is not returned).

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
    if self.repetition_penalty <= 0:
      raise ValueError(f'repetition_penalty must be > 0, got {self.repetition_penalty}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
  """CTRL-style penalty on tokens already in the sequence: positive logits / penalty, others * it.

  logits: (B, V) float32; seen: (B, V) bool.
  """
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)


def filter_logits(logits: Array, cfg: SamplingConfig) -> Array:
  """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to -inf."""
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest head of the ranking whose probability reaches top_p (always the best token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(
      jnp.where(mass_before < cfg.top_p, ordered, jnp.inf), axis=-1, keepdims=True
    )
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def next_token(logits: Array, seen: Array, key: Array, cfg: SamplingConfig) -> Array:
  """(B, V) logits -> (B,) int32 token ids."""
  logits = logits.astype(jnp.float32)
  if cfg.repetition_penalty != 1:
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
