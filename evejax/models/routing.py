"""Per-token choice between the text (LLM) weights and their vision copies (EVEv2).

This is the single place that decides how a decomposed op is evaluated, so a faster routing (gather by
modality, ragged matmuls) can replace the reference's dense select without touching the layers.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Op = Callable[[Array], Array]


def route(x: Array, vision_mask: Array | None, text_op: Op, vision_op: Op | None,
          mode: str = 'select') -> Array:
  """Applies `vision_op` to tokens where `vision_mask` (B, T) is set and `text_op` elsewhere.

  With no vision op (part not decomposed) or no mask (decode steps), every token takes `text_op`.
  """
  if vision_op is None or vision_mask is None:
    return text_op(x)
  if mode == 'select':
    # Reference semantics: both branches on every token, then a hard per-token select.
    return jnp.where(vision_mask[..., None], vision_op(x), text_op(x))
  raise ValueError(f"Unknown model.routing {mode!r}; available: 'select'")
