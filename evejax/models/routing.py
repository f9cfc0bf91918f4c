"""Per-token choice between the text (LLM) weights and their vision copies (EVEv2).

This is the single place that decides how a decomposed op is evaluated:

- `select` (the reference, and the test oracle): both branches on every token, then a per-token
  select; the decomposed ops cost 2x the FLOPs of a plain layer.
- `sorted` (FLOP-exact): tokens are sorted by modality (vision first), so the modality boundary is a
  single index V. Static-shape windows halve around V: at each level one half of the current
  window lies wholly on one side of V and takes exactly one branch (`lax.cond`), and the search
  continues in the other half; only the last window (max(N / 64, 32) tokens) straddling V evaluates
  both branches. Total cost: N + ~N / 32 token-ops instead of 2N. It needs no grouped-matmul
  kernel (`lax.ragged_dot` lowers to two dense matmuls on CPU), so it is FLOP-exact on every
  backend. Under a mesh the sort runs per batch shard (`shard_map` over the batch axes, the
  `tensor` axis left to GSPMD), so no token leaves its device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from evejax.sharding.mesh import BATCH_AXES

Array = jax.Array
Op = Callable[[Array], Array]

MODES = ('select', 'sorted')
# The last window, where both branches run, holds max(tokens / 64, 32) tokens: <= ~3% extra FLOPs at
# training sizes, and few (compile-time) levels for small inputs.
LAST_WINDOW_FRACTION = 64
MIN_LAST_WINDOW = 32


def route(
  x: Array, vision_mask: Array | None, text_op: Op, vision_op: Op | None, mode: str = 'select'
) -> Array:
  """Applies `vision_op` to tokens where `vision_mask` (B, T) is set and `text_op` elsewhere.

  With no vision op (part not decomposed) or no mask (decode steps), every token takes `text_op`.
  """
  if vision_op is None or vision_mask is None:
    return text_op(x)
  if mode == 'select':
    # Reference semantics: both branches on every token, then a hard per-token select.
    return jnp.where(vision_mask[..., None], vision_op(x), text_op(x))
  if mode == 'sorted':
    return _per_batch_shard(lambda x, m: _route_sorted(x, m, text_op, vision_op), x, vision_mask)
  raise ValueError(f'Unknown model.routing {mode!r}; available: {MODES}')


def _per_batch_shard(fn: Callable[[Array, Array], Array], x: Array, mask: Array) -> Array:
  """Runs `fn` on each device's rows when a mesh with batch axes is active, else on all rows."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return fn(x, mask)
  spec = P(axes)
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec, axis_names=set(axes), check_vma=False
  )(x, mask)


def _route_sorted(x: Array, vision_mask: Array, text_op: Op, vision_op: Op) -> Array:
  lead, dim = x.shape[:-1], x.shape[-1]
  flat_x, flat_mask = x.reshape(-1, dim), vision_mask.reshape(-1)
  n = flat_x.shape[0]
  order = jnp.argsort(~flat_mask, stable=True)  # vision tokens first
  num_vision = jnp.sum(flat_mask, dtype=jnp.int32)
  xs = flat_x[order]
  out_shape = jax.eval_shape(text_op, xs[:1])
  out = jnp.zeros((n, out_shape.shape[-1]), out_shape.dtype)

  start, size = jnp.zeros((), jnp.int32), n  # the window [start, start + size) holds the boundary
  last = max(n // LAST_WINDOW_FRACTION, MIN_LAST_WINDOW)
  while size > last:
    half = (size + 1) // 2  # lower [start, start+half), upper [start+size-half, start+size)
    upper = start + size - half
    upper_is_text = num_vision <= upper  # else the lower half is all vision
    pure_start = jnp.where(upper_is_text, upper, start)
    pure = jax.lax.dynamic_slice_in_dim(xs, pure_start, half)
    y = jax.lax.cond(upper_is_text, text_op, vision_op, pure)
    out = jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), pure_start, 0)
    start, size = jnp.where(upper_is_text, start, upper), half
  window = jax.lax.dynamic_slice_in_dim(xs, start, size)
  is_vision = (start + jnp.arange(size)) < num_vision
  y = jnp.where(is_vision[:, None], vision_op(window), text_op(window))
  out = jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), start, 0)
  # Unsort with a gather (row scatters are slow on CPU); inverting the permutation is a cheap
  # int scatter.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
  return out[inverse].reshape(*lead, -1)
