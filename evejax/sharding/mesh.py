"""Mesh construction and the logical-axis rules placing parameters and activations (MaxText style).

The mesh uses Auto axis types (GSPMD propagation) everywhere: parameters, batches and a few
activations are placed explicitly, XLA propagates the rest. Parallelism is a config edit:

  config.mesh = dict(data=-1, fsdp=8, tensor=1)             # one slice; -1 takes the rest
  config.mesh = dict(data=1, fsdp=-1, tensor=4, dcn=dict(data=2))  # 2 slices, data across slices
  config.sharding_rules = (('vocab', 'fsdp'),)              # overrides DEFAULT_RULES by name
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# Logical axis -> mesh axis or axes (None = replicated). Parameters name `embed`, `mlp`, ...;
# activations name `activation_*` (see `constrain`).
DEFAULT_RULES = (
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv', 'tensor'),
  ('vocab', 'tensor'),
  ('norm', None),
  ('patch', None),
  ('vision_embed', 'tensor'),
  ('layers', None),  # the stacked-layer axis of scanned decoders
  ('activation_batch', BATCH_AXES),
  ('activation_length', None),
  ('activation_embed', None),
)


def _fill(sizes: Mapping[str, int], num_devices: int, what: str) -> list[int]:
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'Unknown {what} axes {sorted(unknown)}; valid: {MESH_AXES}')
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'At most one {what} axis may be -1, got {dict(sizes)}')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f'{what.capitalize()} {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} '
      f'devices, {num_devices} are available'
    )
  return shape


def device_grid(sizes: Mapping[str, Any], devices: Sequence[Any]) -> np.ndarray:
  """The devices laid out as a (data, fsdp, tensor) array that follows the interconnect.

  One slice: `mesh_utils.create_device_mesh` maps the axes onto the TPU torus (ICI), the last
  (`tensor`, the most communication) onto the best-connected physical axes, so neighbours along
  an axis are neighbours on the ring; other platforms keep JAX's device order (GPUs by id).
  `sizes['dcn']`: per-axis slice counts (multi-slice TPU, or one granule per process elsewhere);
  the other sizes then describe one slice, each axis is dcn x ici long, slices outermost
  (`create_hybrid_device_mesh`).
  """
  sizes = dict(sizes)
  dcn = dict(sizes.pop('dcn', None) or {})
  slices = {getattr(d, 'slice_index', None) for d in devices}
  if not dcn:
    # Only TPU slices need dcn axes: multi-host GPUs also get one slice_index per host (XLA groups
    # devices by boot id), and a flat mesh over them is the plain multi-node layout.
    if len(slices) > 1 and devices[0].platform == 'tpu':
      raise ValueError(
        f'The {len(devices)} devices span {len(slices)} TPU slices: set config.mesh.dcn to '
        "spread mesh axes over them, e.g. dcn=dict(data=2) (README, 'Scale')"
      )
    shape = _fill(sizes, len(devices), 'mesh')
    return _on_torus(
      lambda split: mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split),
      sizes,
    )
  dcn_shape = _fill(dcn, math.prod(int(dcn.get(a, 1)) for a in MESH_AXES), 'mesh.dcn')
  if len(devices) % math.prod(dcn_shape):
    raise ValueError(f'mesh.dcn {dcn} does not divide the {len(devices)} devices')
  ici_shape = _fill(sizes, len(devices) // math.prod(dcn_shape), 'mesh (per slice)')
  # Multi-slice TPUs number their slices; elsewhere each process (host) is one granule.
  multi_slice = len(slices) > 1
  try:
    return _on_torus(
      lambda split: mesh_utils.create_hybrid_device_mesh(
        ici_shape,
        dcn_shape,
        devices,
        process_is_granule=not multi_slice,
        allow_split_physical_axes=split,
      ),
      sizes,
    )
  except ValueError as error:
    granules = 'slices' if multi_slice else 'processes'
    raise ValueError(
      f'mesh.dcn {dcn} does not match the {granules} of this run: {error}'
    ) from error


def _on_torus(create: Callable[[bool], np.ndarray], sizes: Mapping[str, Any]) -> np.ndarray:
  """`create(allow_split_physical_axes)`: whole physical axes per mesh axis when the sizes allow
  it; else (e.g. fsdp=6 on a 4x4 torus) axes split across the torus, which works but makes some
  axes' collectives cross more links: logged."""
  try:
    return create(False)
  except NotImplementedError as error:  # mesh_utils' "split physical axes to fit" signal
    logging.warning(
      'config.mesh %s does not map onto whole axes of the TPU torus (%s): splitting physical '
      'axes; mesh axis sizes that are products of the torus sides keep collectives on rings',
      dict(sizes),
      error,
    )
    return create(True)


def make_mesh(sizes: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all) laid out by `device_grid`; one
  size may be -1 to take the remaining devices."""
  grid = device_grid(sizes, list(jax.devices() if devices is None else devices))
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(overrides: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with the (logical name, mesh axes) pairs of `config.sharding_rules` replaced."""
  rules = dict(DEFAULT_RULES)
  for entry in overrides or ():
    if len(entry) != 2 or entry[0] not in rules:
      raise ValueError(
        f'config.sharding_rules entry {tuple(entry)!r} must be (logical name, mesh '
        f'axes) with a logical name among {sorted(rules)}'
      )
    name, axes = entry
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(
          f'config.sharding_rules maps {name!r} to unknown mesh axis {axis!r}; valid: {MESH_AXES}'
        )
    rules[name] = axes
  return tuple(rules.items())


def param_shardings(
  abstract_state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> dict:
  """NamedShardings (as a pure dict) for a state of Variables carrying logical axis names."""
  with nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
  )


def abstract_params(
  create: Callable[[], nnx.Module], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> tuple[nnx.GraphDef, dict, dict]:
  """Graph definition, parameter shapes (ShapeDtypeStructs carrying their shardings) and the
  shardings themselves, without allocating anything."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(create), nnx.Param)
  shardings = param_shardings(abstract_state, mesh, rules)
  shapes = jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
    nnx.to_pure_dict(abstract_state),
    shardings,
  )
  return graphdef, shapes, shardings


def init_sharded(
  create: Callable[[], nnx.Module], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> tuple[nnx.GraphDef, dict]:
  """Builds a module's parameters directly in their sharded layout (never whole on one device).

  Returns the graph definition and the parameters as a pure dict.
  """
  graphdef, _, shardings = abstract_params(create, mesh, rules)

  @jax.jit
  def init():
    params = nnx.to_pure_dict(nnx.state(create(), nnx.Param))
    return jax.lax.with_sharding_constraint(params, shardings)

  with jax.set_mesh(mesh):
    return graphdef, init()


def like_params(tree: Any, params: Any, mesh: Mesh) -> Any:
  """Shardings for a tree holding parameter-shaped copies (optimizer state: Adam moments, ...).

  A leaf whose key path ends with a parameter's path, and whose shape is that parameter's, takes
  the parameter's sharding; the rest (step counts, scalars) is replicated. (`jax.jit(tx.init)` alone
  would replicate the whole optimizer state on every device.)
  """
  by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  longest = max((len(p) for p in by_path), default=0)
  replicated = NamedSharding(mesh, P())

  def sharding_of(path, leaf):
    for start in range(max(0, len(path) - longest), len(path)):
      param = by_path.get(tuple(path[start:]))
      if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, tree)


def activate_rules(rules: Sequence[tuple[str, Any]]) -> None:
  """Makes `rules` the ones `constrain` applies while the train and eval steps are traced."""
  spmd.set_logical_axis_rules(tuple(rules))


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
  """Sharding constraint on an activation by logical axis names, under the active rules
  (`nnx.logical_axis_rules`, else DEFAULT_RULES). A no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
    return x  # no mesh, or inside a shard_map over some axes (routing): nothing to constrain
  rules = dict(spmd.get_logical_axis_rules() or DEFAULT_RULES)
  spec = [rules.get(a) for a in logical_axes]
  for size, axes in zip(x.shape, spec):
    if size % math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())):
      return x  # e.g. a generation batch smaller than the batch shards: leave it to GSPMD
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local host batch -> global arrays split over the batch axes of the mesh.

  Every process passes its own rows (global batch / process count); the global array is their
  concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def unsharded_parameters(params: Any, mesh: Mesh) -> tuple[float, list[tuple[str, int]]]:
  """Parameters replicated over the model-parallel axes (all but `data`, which replicates them by
  design), as (fraction of the parameter bytes, [(path, bytes), ...] largest first).

  `params` is a tree of arrays or ShapeDtypeStructs with NamedShardings.
  """
  model_axes = [a for a in mesh.axis_names if a != 'data' and mesh.shape[a] > 1]
  if not model_axes:
    return 0.0, []
  total, replicated = 0, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += size
    used = {
      a
      for entry in leaf.sharding.spec
      if entry is not None
      for a in (entry if isinstance(entry, tuple) else (entry,))
    }
    if not used & set(model_axes):
      replicated.append((jax.tree_util.keystr(path, simple=True, separator='/'), size))
  replicated.sort(key=lambda item: -item[1])
  return sum(size for _, size in replicated) / max(total, 1), replicated


def check_sharded(params: Any, mesh: Mesh, tolerance: float = 0.02) -> float:
  """Raises if more than `tolerance` of the parameter bytes are left unsharded (MaxText's check);
  returns that fraction."""
  fraction, replicated = unsharded_parameters(params, mesh)
  if fraction > tolerance:
    listing = '\n'.join(f'  {path}: {size / 2**20:.1f} MiB' for path, size in replicated[:20])
    raise ValueError(
      f'{fraction:.1%} of the parameter bytes are replicated over the model-parallel mesh axes '
      f'{dict(mesh.shape)} (tolerance {tolerance:.1%}):\n{listing}\nMap their logical axes to '
      f'mesh axes in config.sharding_rules, or raise config.sharding_tolerance.'
    )
  return fraction
