"""Mesh construction and the logical-axis rules that place parameters (MaxText style).

The mesh uses Auto axis types (GSPMD propagation); parameters and batches are placed explicitly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# Logical parameter axis -> mesh axis (None = replicated).
DEFAULT_RULES = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('vocab', 'tensor'),
    ('norm', None),
    ('patch', None),
    ('vision_embed', 'tensor'),
)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'Unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}')
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {dict(sizes)}')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'Mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, '
                     f'{len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(abstract_state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict:
  """NamedShardings (as a pure dict) for a state of Variables carrying logical axis names."""
  with nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def init_sharded(create: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[nnx.GraphDef, dict]:
  """Builds a module's parameters directly in their sharded layout (never whole on one device).

  Returns the graph definition and the parameters as a pure dict.
  """
  abstract = nnx.eval_shape(create)
  graphdef, abstract_state = nnx.split(abstract, nnx.Param)
  shardings = param_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    params = nnx.to_pure_dict(nnx.state(create(), nnx.Param))
    return jax.lax.with_sharding_constraint(params, shardings)

  with jax.set_mesh(mesh):
    return graphdef, init()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local host batch -> global arrays split over the batch axes of the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
