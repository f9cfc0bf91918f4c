"""`init_from`: start a new run (the next training stage) from another run's weights only."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from evejax.checkpoint.manager import (
  PER_LAYER,
  abstract_like,
  compare_params,
  layer_layout,
  param_shapes,
  saved_param_shapes,
)
from evejax.checkpoint.store import CheckpointError, resolve_params_dir, verify_checksums

PyTree = Any


def _nested(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _relayout(flat: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
  """Host arrays named per layer <-> stacked over a leading layer axis."""
  if layout == 'stacked':
    groups = {}
    for name, value in flat.items():
      match = PER_LAYER.match(name)
      key = f'layers/{match[2]}' if match else name
      groups.setdefault(key, {})[int(match[1]) if match else 0] = value
    return {
      k: np.stack([v[i] for i in sorted(v)]) if k.startswith('layers/') else v[0]
      for k, v in groups.items()
    }
  out = {}
  for name, value in flat.items():
    if name.startswith('layers/'):
      rest = name[len('layers/') :]
      out.update({f'layers/{i}/{rest}': layer for i, layer in enumerate(value)})
    else:
      out[name] = value
  return out


def _read_on_host(params_dir: str) -> dict[str, np.ndarray]:
  metadata = ocp.PyTreeCheckpointer().metadata(params_dir).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  restored = ocp.PyTreeCheckpointer().restore(
    params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
  )
  return traverse_util.flatten_dict(restored, sep='/')


def check_new(new: Sequence[str], allowed: Sequence[str], source: str) -> None:
  """Raises unless every parameter missing from the checkpoint matches a regex of `allowed`
  (`config.init_new`): a model part the source lacks is never silently random."""
  unexpected = [name for name in new if not any(re.search(p, name) for p in allowed)]
  if not unexpected:
    return
  shown = ', '.join(unexpected[:12]) + (
    f' ... ({len(unexpected)} in all)' if len(unexpected) > 12 else ''
  )
  copies = any('/moe_' in name for name in unexpected)
  hint = (
    'The vision copies (moe_*) come from the LLM weights: run the EVEv2 copy step '
    '(python -m evejax.recipe --config=configs/eve_v2:ARGS --workdir=ROOT --stages=copy) or import '
    'with python -m evejax.convert import --moe_part=...; '
    if copies
    else ''
  )
  raise CheckpointError(
    f'init_from={source} lacks {len(unexpected)} parameters of the model: {shown}. {hint}'
    'To start them freshly initialised, list them in config.init_new (regexes over the '
    f"'/'-joined paths, now {tuple(allowed)}), e.g. --config.init_new=\"('^vision_tower/',)\""
  )


def load_params(
  path: str, params: PyTree, new: Sequence[str] = ()
) -> tuple[PyTree, dict[str, list]]:
  """`params` with every entry the checkpoint has (same name and shape) replaced by its value.

  Values land in the shardings of `params`. Returns the new params and a report with the names
  that were loaded, newly created (kept from `params`) and dropped (only in the checkpoint).
  A parameter of the model that the checkpoint lacks is an error unless it matches a regex of
  `new` (`config.init_new`); one present in both with different shapes is always an error, never
  silently re-initialised.
  A checkpoint with the other layer layout (per-layer vs stacked, `model.scan_layers`) is
  converted on the host, then placed.
  """
  try:
    params_dir = resolve_params_dir(path)
    if not verify_checksums(os.path.dirname(params_dir)):
      logging.warning('init_from %s: no checksums recorded, its files are not verified', path)
  except CheckpointError as error:  # Name the setting that gave the path.
    raise type(error)(f'init_from={path}: {error}') from None
  saved = saved_param_shapes(params_dir)
  names, leaves = list(param_shapes(params)), jax.tree.leaves(params)
  by_name = dict(zip(names, leaves))
  layout, saved_layout = layer_layout(names), layer_layout(saved)
  host = None
  if 'none' not in (layout, saved_layout) and layout != saved_layout:
    logging.info('init_from: converting %s layers to %s', saved_layout, layout)
    host = _relayout(_read_on_host(params_dir), layout)
    saved = {k: v.shape for k, v in host.items()}
  report = compare_params(saved, param_shapes(params))
  if report['mismatched']:
    raise CheckpointError(
      f'init_from={params_dir}: parameters with other shapes than the model: {report["mismatched"]}'
    )
  check_new(report['new'], new, params_dir)
  if host is None:  # Read straight into the target shardings: no full copy on any host.
    target = _nested({k: abstract_like(by_name[k]) for k in report['loaded']})
    restore = ocp.args.PyTreeRestore(
      item=target,
      partial_restore=True,  # Skips the dropped ones.
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    )
    loaded = traverse_util.flatten_dict(
      ocp.PyTreeCheckpointer().restore(params_dir, args=restore), sep='/'
    )
  else:
    loaded = {
      k: jax.make_array_from_callback(
        host[k].shape, by_name[k].sharding, lambda index, k=k: host[k][index]
      )
      for k in report['loaded']
    }
  logging.info(
    'init_from %s: loaded %d parameters, newly initialised %d %s, dropped %d %s',
    params_dir,
    len(report['loaded']),
    len(report['new']),
    report['new'],
    len(report['dropped']),
    report['dropped'],
  )
  del report['mismatched']
  new_leaves = [loaded.get(name, leaf) for name, leaf in zip(names, leaves)]
  return jax.tree.unflatten(jax.tree.structure(params), new_leaves), report
