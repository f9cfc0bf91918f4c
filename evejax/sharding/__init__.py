"""Device meshes, logical-axis rules and sharded placement of parameters and batches."""
from evejax.sharding.mesh import (DEFAULT_RULES, MESH_AXES, batch_sharding, init_sharded, make_mesh,
                                  param_shardings, shard_batch)

__all__ = ['DEFAULT_RULES', 'MESH_AXES', 'batch_sharding', 'init_sharded', 'make_mesh',
           'param_shardings', 'shard_batch']
