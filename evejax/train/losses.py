"""Token-level loss and accuracy on supervised (caption / answer) positions only."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def token_losses(
  logits: Array,  # [B, T, vocab]
  targets: Array,  # [B, T] int32
  weights: Array,  # [B, T] float32
) -> tuple[Array, Array]:
  """Per-position cross-entropy (float32) and correctness, both zero where `weights` is zero."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return nll * weights, correct * weights


def chunked_token_losses(
  hidden: Array,  # [B, T, D] decoder outputs
  head: Callable[[Array], Array],  # [B, C, D] -> [B, C, vocab]
  targets: Array,  # [B, T] int32
  weights: Array,  # [B, T] float32
  chunk: int,
) -> tuple[Array, Array]:
  """`token_losses(head(hidden), ...)` without the whole [B, T, vocab] logits: a `lax.scan` over
  `chunk` positions at a time, each chunk's logits recomputed in the backward pass (so at most one
  chunk of logits is alive; compile time does not grow with T). `chunk` <= 0 or >= T: one piece."""
  b, t = targets.shape
  if chunk <= 0 or chunk >= t:
    return token_losses(head(hidden), targets, weights)
  pieces = -(-t // chunk)
  pad = pieces * chunk - t  # padded positions carry weight 0

  def split(x: Array) -> Array:  # [B, T, ...] -> [pieces, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, pieces, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def piece(h: Array, y: Array, w: Array) -> tuple[Array, Array]:
    return token_losses(head(h), y, w)

  _, (nll, correct) = jax.lax.scan(
    lambda carry, xs: (carry, piece(*xs)), None, (split(hidden), split(targets), split(weights))
  )
  merge = lambda x: x.swapaxes(0, 1).reshape(b, pieces * chunk)[:, :t]
  return merge(nll), merge(correct)


def weighted_mean(values: Array, weights: Array) -> Array:
  return values.sum() / jnp.maximum(weights.sum(), 1.0)
