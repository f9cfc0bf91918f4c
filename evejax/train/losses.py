"""Token-level loss and accuracy on supervised (caption / answer) positions only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_losses(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """Per-position cross-entropy (float32) and correctness, both zero where `weights` is zero."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return nll * weights, correct * weights


def weighted_mean(values: Array, weights: Array) -> Array:
  return values.sum() / jnp.maximum(weights.sum(), 1.0)
