"""`init_from`: start a new run (the next training stage) from another run's weights only."""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from evejax.checkpoint.manager import (CheckpointError, abstract_like, compare_params, param_shapes,
                                      saved_param_shapes)

PyTree = Any


def resolve_params_dir(path: str) -> str:
  """The `params` item for a step directory, a checkpoint directory (newest step) or a workdir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'params')):
    return os.path.join(path, 'params')
  root = os.path.join(path, 'checkpoints') if os.path.isdir(os.path.join(path, 'checkpoints')) \
      else path
  if not os.path.isdir(root):
    raise CheckpointError(f'init_from={path} does not exist')
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f'init_from={path} holds no complete checkpoint: give a workdir, its '
                          f'checkpoints/ directory or one step directory (…/checkpoints/STEP)')
  return os.path.join(root, str(step), 'params')


def _nested(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def load_params(path: str, params: PyTree) -> tuple[PyTree, dict[str, list]]:
  """`params` with every entry the checkpoint has (same name and shape) replaced by its value.

  Values land in the shardings of `params`. Returns the new params and a report with the names
  that were loaded, newly created (kept from `params`) and dropped (only in the checkpoint).
  A parameter present in both with different shapes is an error, never silently re-initialised.
  """
  params_dir = resolve_params_dir(path)
  saved = saved_param_shapes(params_dir)
  current = jax.tree.leaves_with_path(params)
  report = compare_params(saved, param_shapes(params))
  if report['mismatched']:
    raise CheckpointError(f'init_from={params_dir}: parameters with other shapes than the model: '
                          f'{report["mismatched"]}')
  names = list(param_shapes(params))
  by_name = {name: leaf for name, (_, leaf) in zip(names, current)}
  target = _nested({k: abstract_like(by_name[k]) for k in report['loaded']})
  restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,  # Skips dropped ones.
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  restored = ocp.PyTreeCheckpointer().restore(params_dir, args=restore)
  restored = traverse_util.flatten_dict(restored, sep='/')
  loaded_leaves = [restored.get(name, leaf) for name, (_, leaf) in zip(names, current)]
  logging.info('init_from %s: loaded %d parameters, newly initialised %d %s, dropped %d %s',
               params_dir, len(report['loaded']), len(report['new']), report['new'],
               len(report['dropped']), report['dropped'])
  del report['mismatched']
  return jax.tree.unflatten(jax.tree.structure(params), loaded_leaves), report
