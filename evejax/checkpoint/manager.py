"""Orbax checkpoints of a training run: parameters, optimizer state, step, RNG, data-iterator state.

One checkpoint is a step directory with one Orbax item per part, so each can be read on its own
(`init_from` reads only `params`):

  {directory}/{step}/params      parameter pytree (pure dict)
  {directory}/{step}/opt_state   optimizer state pytree
  {directory}/{step}/progress    {'step': int32, 'rng': uint32 key data}
  {directory}/{step}/data        the Grain iterator state (JSON)
  {directory}/{step}/metadata    config and layer layout (JSON)

Orbax writes each step into a temporary directory and renames it when complete (and marks it with
`commit_success.txt`), so a save killed half-way is never listed as a step. Restores read into the
shardings of the given target, so a checkpoint moves between meshes and device counts.
"""
from __future__ import annotations

import logging as std_logging
import os
import re
import time
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

PyTree = Any
STATE_ITEMS = ('params', 'opt_state', 'progress')


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's per-save INFO lines (dozens per checkpoint); its warnings and errors stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


_ORBAX_INFO_FILTER = _OrbaxInfoFilter()


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not fit the model being trained."""


def _non_empty(state: Mapping[str, PyTree]) -> list[str]:
  """STATE_ITEMS that hold arrays: Orbax refuses empty trees (e.g. plain SGD's optimizer state)."""
  return [name for name in STATE_ITEMS if jax.tree.leaves(state[name])]


def _items(state) -> dict[str, PyTree]:
  """A TrainState as the checkpoint's items (STATE_ITEMS)."""
  return {'params': state.params, 'opt_state': state.opt_state,
          'progress': {'step': state.step, 'rng': state.rng}}


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying each array's sharding: a restore target that allocates nothing."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def param_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """'a/b/0/kernel' -> shape, for arrays, abstract arrays and Orbax array metadata alike."""
  def name(path) -> str:
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree.leaves_with_path(tree)}


def saved_param_shapes(params_dir: str) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of a saved `params` item, read from its metadata (no array data)."""
  return param_shapes(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)


PER_LAYER = re.compile(r'^layers/(\d+)/(.+)$')


def layer_layout(names) -> str:
  """'per_layer' (`layers/N/...`, unrolled), 'stacked' (`layers/...` with a leading layer axis,
  `model.scan_layers`) or 'none', from parameter names."""
  if any(PER_LAYER.match(n) for n in names):
    return 'per_layer'
  return 'stacked' if any(n.startswith('layers/') for n in names) else 'none'


def compare_params(saved: Mapping[str, tuple], current: Mapping[str, tuple]) -> dict[str, list]:
  """Which parameters a checkpoint can fill: loaded, new (model only), dropped (checkpoint only)."""
  common = sorted(set(saved) & set(current))
  return {
      'loaded': [k for k in common if saved[k] == current[k]],
      'mismatched': [f'{k}: checkpoint {saved[k]} vs model {current[k]}'
                     for k in common if saved[k] != current[k]],
      'new': sorted(set(current) - set(saved)),
      'dropped': sorted(set(saved) - set(current)),
  }


class Checkpointer:
  """Orbax `CheckpointManager`: save interval, keep the last N plus every K-th, fallback restore."""

  def __init__(self, directory: str, *, every: int, keep_last: int, keep_every: int = 0,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep_last, keep_period=keep_every or None,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)  # Leftovers of a save killed half-way.
    logging.get_absl_logger().addFilter(_ORBAX_INFO_FILTER)  # A set: adding twice is harmless.
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def describe_latest(self) -> str:
    step = self.latest_step()
    return 'none' if step is None else f'{self.directory}/{step}'

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, data_iterator, metadata: Mapping[str, Any],
           *, force: bool = False) -> bool:
    """Starts an (async) save of the TrainState `state` when the interval is due or `force`."""
    items = _items(state)
    args = {name: ocp.args.StandardSave(items[name]) for name in _non_empty(items)}
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    args['metadata'] = ocp.args.JsonSave(dict(metadata))
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, state, data_iterator) -> tuple[int, Any, dict]:
    """Restores the newest readable checkpoint into the TrainState `state`'s shapes and shardings.

    An unreadable checkpoint (truncated or missing files) is reported, moved aside to
    `{step}.unreadable-{time}` and the previous one is tried. The data iterator's state is then
    set in place. Returns (step, restored TrainState, metadata).
    """
    target = _items(state)
    failures = []
    for step in reversed(self.all_steps()):
      try:
        self._check_params(step, target['params'])
        args = {name: ocp.args.StandardRestore(abstract_like(target[name]))
                for name in _non_empty(target)}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore(), **args))
      except CheckpointError:
        raise
      except Exception as error:  # Orbax/TensorStore raise many types for damaged files.
        failures.append(f'step {step}: {type(error).__name__}: {error}')
        self._move_aside(step, error)
        continue
      self._restore_data(step, data_iterator)
      items = {name: restored[name] if name in args else target[name] for name in STATE_ITEMS}
      progress = items['progress']
      return step, state.replace(step=progress['step'], rng=progress['rng'],
                                 params=items['params'], opt_state=items['opt_state']), dict(
                                     restored['metadata'])
    raise CheckpointError(
        f'No readable checkpoint in {self.directory}: ' + '; '.join(failures) +
        '. Remove the directory (or use another --workdir) to start from scratch.')

  def _move_aside(self, step: int, error: Exception) -> None:
    aside = f'{self.directory}/{step}.unreadable-{int(time.time())}'
    logging.error('Checkpoint %s/%d is unreadable (%s: %s). Moved it to %s; trying the previous '
                  'checkpoint.', self.directory, step, type(error).__name__, str(error)[:500],
                  aside)
    if jax.process_index() == 0:
      os.rename(f'{self.directory}/{step}', aside)
    multihost_utils.sync_global_devices('evejax_checkpoint_moved_aside')
    self._manager.reload()

  def _restore_data(self, step: int, data_iterator) -> None:
    """A failure here is not a damaged model state: stop rather than fall back and lose steps."""
    try:
      self._manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as error:
      raise CheckpointError(
          f'The data-iterator state in {self.directory}/{step}/data cannot be restored '
          f'({type(error).__name__}: {error}). It is damaged, or the data config changed since '
          'the run started: resume with the same data settings, or start a new --workdir with '
          f'--config.init_from={self.directory}/{step}.') from error

  def _check_params(self, step: int, target_params: PyTree) -> None:
    saved = saved_param_shapes(os.path.join(self.directory, str(step), 'params'))
    diff = compare_params(saved, param_shapes(target_params))
    saved_layout, layout = layer_layout(saved), layer_layout(param_shapes(target_params))
    if saved_layout != layout:
      raise CheckpointError(
          f'Checkpoint {self.directory}/{step} stores the layers {saved_layout}, the model '
          f'{layout} (model.scan_layers): resume with the setting the run started with, or start '
          f'a new --workdir with --config.init_from={self.directory}/{step} (converts them).')
    if diff['new'] or diff['dropped'] or diff['mismatched']:
      raise CheckpointError(
          f'Checkpoint {self.directory}/{step} holds parameters of another model: '
          f'missing from it {diff["new"][:10]}, not in the model {diff["dropped"][:10]}, '
          f'other shapes {diff["mismatched"][:10]}. Use a fresh --workdir, and '
          f'--config.init_from={self.directory}/{step} to start from these weights.')

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
