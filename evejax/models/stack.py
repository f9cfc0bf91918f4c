"""How the decoder layers run: unrolled (default; `layers.N` keys, as the reference checkpoints) or
scanned over one stacked layer (`model.scan_layers`; compile time flat in depth), each optionally
rematerialised under a named policy (`model.remat`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.sharding.mesh import constrain

Array = jax.Array
LayerCall = Callable[..., Array]

# What the backward pass may keep from the forward pass instead of recomputing it.
REMAT_POLICIES = {
  'none': None,  # no rematerialisation: keep every activation
  'full': jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
  'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight-only matmuls
  'save_dots': jax.checkpoint_policies.dots_saveable,  # every matmul output (projections, MLP)
}
LAYER_AXIS = 'layers'  # logical name of the stacked-layer axis (replicated by DEFAULT_RULES)


def check_remat(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown model.remat {policy!r}; available: {sorted(REMAT_POLICIES)}')


def layer_call(policy: str, *, scanned: bool) -> LayerCall:
  """`call(layer, x, *args)` applying one decoder layer, rematerialised under `policy`, with the
  residual stream constrained to batch sharding between layers."""
  check_remat(policy)

  def call(layer: nnx.Module, x: Array, *args) -> Array:
    return constrain(layer(x, *args), 'activation_batch', 'activation_length', 'activation_embed')

  if policy == 'none':
    return call
  # Inside a scan XLA cannot merge the recomputation back into the forward pass; unrolled it could.
  return nnx.remat(call, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


def stacked_layers(
  create: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
  """One layer module whose parameters carry a leading `layers` axis of length `num_layers`."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def create_all(rngs: nnx.Rngs) -> nnx.Module:
    return create(rngs)

  return create_all(rngs)


def scan_layers(
  call: LayerCall, stacked: nnx.Module, x: Array, *args, taps: tuple[int, ...] = ()
) -> tuple[Array, list[Array]]:
  """Applies the stacked layers in order: a `lax.scan` whose body is one layer. Returns the output
  and the outputs of the layers `taps` (0-based layer numbers, any order), for PAL.

  The tapped outputs ride in the carry as a [len(taps) + 1, ...x.shape] buffer that each layer
  writes its output into, at its tap's slot or else the last (scratch) slot: memory for the taps
  only (as unrolled), where emitting every layer's output as a scan output would hold L of them.
  The buffer write is linear, so the backward pass keeps no copy of it per layer."""
  graphdef, state = nnx.split(stacked)
  num_layers = jax.tree.leaves(state)[0].shape[0]
  slots = [len(taps)] * num_layers
  for slot, layer in enumerate(taps):
    slots[layer] = slot

  def body(carry, layer_inputs):
    x, tapped = carry
    layer_state, slot = layer_inputs
    x = call(nnx.merge(graphdef, layer_state), x, *args)
    return (x, jax.lax.dynamic_update_index_in_dim(tapped, x, slot, 0) if taps else tapped), None

  tapped = jnp.zeros((len(taps) + 1, *x.shape), x.dtype) if taps else None
  (x, tapped), _ = jax.lax.scan(body, (x, tapped), (state, jnp.asarray(slots, jnp.int32)))
  return x, [tapped[i] for i in range(len(taps))]


def stack_params(layer_params: dict) -> dict:
  """Per-layer params {0: tree, 1: tree, ...} (the unrolled layout) -> one tree of stacked
  arrays."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *(layer_params[i] for i in sorted(layer_params)))


def unstack_params(stacked: dict) -> dict:
  """The inverse of `stack_params`: stacked arrays -> {0: tree, 1: tree, ...}."""
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
