"""Orbax checkpoints of a training run: its `TrainState` (parameters, optimizer state, step, RNG),
the data-iterator state and metadata, one step directory per save in the layout of `store`.

Orbax writes each step into a temporary directory and renames it when complete (and marks it with
`commit_success.txt`), so a save killed half-way is never listed as a step. Restores read into the
shardings of the given target, so a checkpoint moves between meshes and device counts.
"""

from __future__ import annotations

import logging as std_logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from evejax import storage
from evejax.checkpoint import store
from evejax.checkpoint.store import CheckpointError

if TYPE_CHECKING:  # Only for annotations: the training step's imports are not needed here.
  from evejax.train.step import TrainState

PyTree = Any


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's per-save INFO lines (dozens per checkpoint); its warnings and errors stay."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


_ORBAX_INFO_FILTER = _OrbaxInfoFilter()


def _state_items(state: TrainState) -> dict[str, PyTree]:
  """The state's trees by their item (store.STATE_ITEMS) in a step directory."""
  return {
    store.PARAMS: state.params,
    store.OPT_STATE: state.opt_state,
    store.PROGRESS: {'step': state.step, 'rng': state.rng},
  }


def _non_empty(items: Mapping[str, PyTree]) -> list[str]:
  """Items that hold arrays: Orbax refuses empty trees (e.g. plain SGD's optimizer state)."""
  return [name for name in store.STATE_ITEMS if jax.tree.leaves(items[name])]


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
    'mismatched': [
      f'{k}: checkpoint {saved[k]} vs model {current[k]}' for k in common if saved[k] != current[k]
    ],
    'new': sorted(set(current) - set(saved)),
    'dropped': sorted(set(saved) - set(current)),
  }


class Checkpointer:
  """Orbax `CheckpointManager`: save interval, keep the last N plus every K-th, fallback restore."""

  def __init__(
    self,
    directory: str,
    *,
    every: int,
    keep_last: int,
    keep_every: int = 0,
    async_save: bool = True,
  ):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=every,
      max_to_keep=keep_last,
      keep_period=keep_every or None,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,
    )  # Leftovers of a save killed half-way.
    logging.get_absl_logger().addFilter(_ORBAX_INFO_FILTER)  # A set: adding twice is harmless.
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def describe_latest(self) -> str:
    step = self.latest_step()
    return 'none' if step is None else store.step_dir(self.directory, step)

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(
    self,
    step: int,
    state: TrainState,
    data_iterator,
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
  ) -> bool:
    """Starts an (async) save of `state` when the interval is due or `force`."""
    items = _state_items(state)
    args = {name: ocp.args.StandardSave(items[name]) for name in _non_empty(items)}
    args[store.DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    args[store.METADATA] = ocp.args.JsonSave(dict(metadata))
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, target: TrainState, data_iterator) -> tuple[int, TrainState, dict]:
    """Restores the newest readable checkpoint into `target`'s shapes and shardings.

    An unreadable checkpoint (truncated or missing files) is reported, moved aside to
    `{step}.unreadable-{time}` and the previous one is tried. The data iterator's state is then
    set in place. Returns (step, restored TrainState, metadata).
    """
    failures = []
    target_items = _state_items(target)
    for step in reversed(self.all_steps()):
      try:
        self._check_params(step, target.params)
        args = {
          name: ocp.args.StandardRestore(abstract_like(target_items[name]))
          for name in _non_empty(target_items)
        }
        args[store.METADATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      except CheckpointError:
        raise
      except Exception as error:  # Orbax/TensorStore raise many types for damaged files.
        failures.append(f'step {step}: {type(error).__name__}: {error}')
        self._move_aside(step, error)
        continue
      self._restore_data(step, data_iterator)
      items = {
        name: restored[name] if name in args else target_items[name] for name in store.STATE_ITEMS
      }
      progress = items[store.PROGRESS]
      state = target.replace(
        params=items[store.PARAMS],
        opt_state=items[store.OPT_STATE],
        step=progress['step'],
        rng=progress['rng'],
      )
      return step, state, dict(restored[store.METADATA])
    raise CheckpointError(
      f'No readable checkpoint in {self.directory}: '
      + '; '.join(failures)
      + '. Remove the directory (or use another --workdir) to start from scratch.'
    )

  def _move_aside(self, step: int, error: Exception) -> None:
    step_dir = store.step_dir(self.directory, step)
    aside = f'{step_dir}.unreadable-{int(time.time())}'
    logging.error(
      'Checkpoint %s is unreadable (%s: %s). Moved it to %s; trying the previous checkpoint.',
      step_dir,
      type(error).__name__,
      str(error)[:500],
      aside,
    )
    if jax.process_index() == 0:
      storage.rename(step_dir, aside)
    multihost_utils.sync_global_devices('evejax_checkpoint_moved_aside')
    self._manager.reload()

  def _restore_data(self, step: int, data_iterator) -> None:
    """A failure here is not a damaged model state: stop rather than fall back and lose steps."""
    step_dir = store.step_dir(self.directory, step)
    try:
      self._manager.restore(
        step,
        args=ocp.args.Composite(**{store.DATA: grain.checkpoint.CheckpointRestore(data_iterator)}),
      )
    except Exception as error:
      raise CheckpointError(
        f'The data-iterator state in {store.item_dir(step_dir, store.DATA)} cannot be restored '
        f'({type(error).__name__}: {error}). It is damaged, or the data config changed since '
        'the run started: resume with the same data settings, or start a new --workdir with '
        f'--config.init_from={step_dir}.'
      ) from error

  def _check_params(self, step: int, target_params: PyTree) -> None:
    step_dir = store.step_dir(self.directory, step)
    saved = saved_param_shapes(store.item_dir(step_dir, store.PARAMS))
    diff = compare_params(saved, param_shapes(target_params))
    saved_layout, layout = layer_layout(saved), layer_layout(param_shapes(target_params))
    if saved_layout != layout:
      raise CheckpointError(
        f'Checkpoint {step_dir} stores the layers {saved_layout}, the model {layout} '
        '(model.scan_layers): resume with the setting the run started with, or start a new '
        f'--workdir with --config.init_from={step_dir} (converts them).'
      )
    if diff['new'] or diff['dropped'] or diff['mismatched']:
      raise CheckpointError(
        f'Checkpoint {step_dir} holds parameters of another model: '
        f'missing from it {diff["new"][:10]}, not in the model {diff["dropped"][:10]}, '
        f'other shapes {diff["mismatched"][:10]}. Use a fresh --workdir, and '
        f'--config.init_from={step_dir} to start from these weights.'
      )

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
