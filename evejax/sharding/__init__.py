"""Device meshes, logical-axis rules and sharded placement of parameters, batches and activations;
multi-process setup (`evejax.sharding.distributed`)."""

from evejax.sharding import distributed
from evejax.sharding.mesh import (
  BATCH_AXES,
  DEFAULT_RULES,
  MESH_AXES,
  abstract_params,
  activate_rules,
  batch_sharding,
  check_sharded,
  constrain,
  init_sharded,
  like_params,
  make_mesh,
  param_shardings,
  rules_from_config,
  shard_batch,
  unsharded_parameters,
)

__all__ = [
  'BATCH_AXES',
  'DEFAULT_RULES',
  'MESH_AXES',
  'abstract_params',
  'activate_rules',
  'batch_sharding',
  'check_sharded',
  'constrain',
  'distributed',
  'init_sharded',
  'like_params',
  'make_mesh',
  'param_shardings',
  'rules_from_config',
  'shard_batch',
  'unsharded_parameters',
]
