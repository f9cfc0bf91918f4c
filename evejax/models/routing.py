"""Per-token choice between the text (LLM) weights and their vision copies (EVEv2).

A `Router` is built once per forward pass from the vision mask and decides how every decomposed op
of every layer is evaluated:

- `select` (the reference, and the test oracle): both branches on every token, then a per-token
  select; the decomposed ops cost 2x the FLOPs of a plain layer.
- `sorted` (FLOP-exact): the tokens are sorted by modality (vision first) once per forward pass,
  and the residual stream stays in that order through every layer (the router's *layout*); only
  attention, which needs the sequence order, gathers q/k/v out of it and its output back in: two
  gathers a layer. In the layout the modality boundary is a single index V. Static-shape windows
  halve around V: at each level one half of the current window lies wholly on one side of V and
  takes exactly one branch (`lax.cond`), and the search continues in the other half; only the last
  window (max(N / 64, 32) tokens) straddling V evaluates both branches. Total cost: N + ~N / 32
  token-ops instead of 2N. It needs no grouped-matmul kernel (`lax.ragged_dot` lowers to two dense
  matmuls on CPU), so it is FLOP-exact on every backend. Under a mesh the order is per batch shard
  (`shard_map` over the batch axes, the `tensor` axis left to GSPMD), so no token leaves its device.

Decoder layers route whole chains of per-token ops at once (norm -> q/k/v projections, o_proj,
norm -> MLP): three window searches a layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from evejax.sharding.mesh import BATCH_AXES

Array = jax.Array
Op = Callable[[Array], Array]  # [n, D] -> [n, F], token by token

MODES = ('select', 'sorted')
# The last window, where both branches run, holds max(tokens / 64, 32) tokens: <= ~3% extra FLOPs at
# training sizes, and few (compile-time) levels for small inputs.
LAST_WINDOW_FRACTION = 64
MIN_LAST_WINDOW = 32


@flax.struct.dataclass
class Router:
  """The routing of one forward pass. `vision_mask` None (decode steps): every token is text.

  Arrays [B, T, ...] between `enter` and `leave` are in the router's layout: the sequence order
  for `select`, modality order (per batch shard) for `sorted`."""

  mode: str = flax.struct.field(pytree_node=False)
  vision_mask: Array | None  # [B, T] bool
  order: Array | None = None  # [B, T] int32: per batch shard, flat token indices, vision first
  inverse: Array | None = None  # [B, T] int32: the position of each token in `order`
  num_vision: Array | None = None  # [shards] int32: visual tokens per batch shard

  @classmethod
  def create(cls, vision_mask: Array | None, mode: str = 'select') -> Router:
    if mode not in MODES:
      raise ValueError(f'Unknown model.routing {mode!r}; available: {MODES}')
    if mode == 'select' or vision_mask is None:
      return cls(mode, vision_mask)
    order, inverse, num_vision = _per_batch_shard(_sort_order, vision_mask)
    return cls(mode, vision_mask, order, inverse, num_vision)

  @property
  def sorts(self) -> bool:
    return self.order is not None

  def enter(self, x: Array) -> Array:
    """[B, T, ...] in sequence order -> the router's layout."""
    return _per_batch_shard(_gather, x, self.order) if self.sorts else x

  def leave(self, x: Array) -> Array:
    """The router's layout -> sequence order."""
    return _per_batch_shard(_gather, x, self.inverse) if self.sorts else x

  def __call__(self, x: Array, text_op: Op, vision_op: Op | None) -> Array:
    """`vision_op` on the visual tokens of x [B, T, D] (in the router's layout), `text_op` on the
    others. With no vision op (part not decomposed) or no mask, every token takes `text_op`."""
    if vision_op is None or self.vision_mask is None:
      return text_op(x)
    if not self.sorts:
      # Reference semantics: both branches on every token, then a hard per-token select.
      return jnp.where(self.vision_mask[..., None], vision_op(x), text_op(x))
    return _per_batch_shard(
      lambda x, num_vision: _route_sorted(x, num_vision[0], text_op, vision_op),
      x,
      self.num_vision,
    )


def _per_batch_shard(fn: Callable, *arrays: Array):
  """Runs `fn` on each device's rows when a mesh with batch axes is active, else on all rows; every
  argument and output has the batch (or shard) axis first."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or arrays[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
    return fn(*arrays)
  spec = P(axes)
  return jax.shard_map(
    fn, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(axes), check_vma=False
  )(*arrays)


def _sort_order(vision_mask: Array) -> tuple[Array, Array, Array]:
  flat = vision_mask.reshape(-1)
  order = jnp.argsort(~flat, stable=True).astype(jnp.int32)  # vision tokens first
  # Inverting the permutation is a cheap int scatter; leaving the layout is then a gather (row
  # scatters are slow on CPU).
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  num_vision = jnp.sum(flat, dtype=jnp.int32)[None]
  return order.reshape(vision_mask.shape), inverse.reshape(vision_mask.shape), num_vision


def _gather(x: Array, indices: Array) -> Array:
  """Rows of x [B, T, ...] flattened over B x T, taken at `indices` [B, T]."""
  flat = x.reshape(-1, *x.shape[2:])
  return flat[indices.reshape(-1)].reshape(x.shape)


def _route_sorted(x: Array, num_vision: Array, text_op: Op, vision_op: Op) -> Array:
  lead, dim = x.shape[:-1], x.shape[-1]
  xs = x.reshape(-1, dim)
  n = xs.shape[0]
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
  return out.reshape(*lead, -1)
