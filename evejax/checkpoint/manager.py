"""Orbax checkpoints of a training run: its `TrainState` (parameters, optimizer state, step, RNG),
the data-iterator state and metadata, one step directory per save in the layout of `store`.

Orbax writes each step into a temporary directory and renames it when complete (and marks it with
`commit_success.txt`), so a save killed half-way is never listed as a step. Once a save completed,
the SHA-256 of its files is recorded (`store.write_checksums`, in a background thread) and a restore
verifies it, so a damaged file is found even where it still parses. Restores read into the
shardings of the given target, so a checkpoint moves between meshes and device counts.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging as std_logging
import os
import re
import shutil
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
from evejax.checkpoint.store import CheckpointError, DamagedCheckpoint

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


def _out_of_space(error: BaseException | None) -> bool:
  """Whether `error` (or one it was raised from) is a full disk, as Python or TensorStore say it."""
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
      'No space left on device' in str(error)
    ):
      return True
    error = error.__cause__ or error.__context__
  return False


def _write_checksums(folder: str) -> None:
  try:
    store.write_checksums(folder)
  except FileNotFoundError:  # Deleted by the keep policy meanwhile: nothing left to protect.
    logging.info('Checkpoint %s was removed before its checksums were written', folder)


def _folder_bytes(folder: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(folder)
    for name in names
  )


class DataStateError(CheckpointError):
  """A step's data-iterator state that cannot be set."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


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
    self._unsummed: list[int] = []  # Saved steps whose checksums are not written yet.
    self._verified: set[int] = set()  # Steps this run wrote or verified by checksum.
    self._summing = concurrent.futures.ThreadPoolExecutor(1)
    self._pending_sums: list[concurrent.futures.Future] = []
    self._failed_save: CheckpointError | None = None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def describe_latest(self) -> str:
    """The newest checkpoint, called good only when this run wrote it or verified its checksums."""
    step = self.latest_step()
    if step is None:
      return 'No checkpoint yet'
    if step in self._verified:
      return f'Last good checkpoint: {store.step_dir(self.directory, step)}'
    return f'Newest checkpoint (not verified by checksum): {store.step_dir(self.directory, step)}'

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
    if not (force or self._manager.should_save(step)):
      return False
    items = _state_items(state)
    args = {name: ocp.args.StandardSave(items[name]) for name in _non_empty(items)}
    args[store.DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    args[store.METADATA] = ocp.args.JsonSave(dict(metadata))
    try:
      self._manager.wait_until_finished()  # Orbax would wait too: one save at a time.
    except Exception as error:
      raise self._save_failed(self._unsummed[-1] if self._unsummed else step, error) from None
    self._sum_completed()
    self._check_space(step, items)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as error:
      raise self._save_failed(step, error) from None
    if saved:
      self._unsummed.append(step)
    return saved

  def _sum_completed(self) -> None:
    """Records the checksums of the completed saves, in the background (process 0 writes)."""
    steps, self._unsummed = self._unsummed, []
    self._verified.update(steps)
    if jax.process_index() == 0:
      for step in steps:
        folder = store.step_dir(self.directory, step)
        self._pending_sums.append(self._summing.submit(_write_checksums, folder))

  def _needed_bytes(self, items: Mapping[str, PyTree]) -> int:
    """What a save takes: the newest checkpoint's size, else the state's arrays."""
    latest = self.latest_step()
    if latest is not None:
      return _folder_bytes(store.step_dir(self.directory, latest))
    return sum(x.nbytes for x in jax.tree.leaves(items))

  def _check_space(self, step: int, items: Mapping[str, PyTree]) -> None:
    """Refuses a save the disk cannot hold before Orbax writes part of it (whose failure
    surfaces in its background threads as dozens of tracebacks)."""
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:  # Not a local file system (e.g. gs://): a failed write reports it.
      return
    needed = self._needed_bytes(items)
    if free < needed:
      raise self._no_space(step, free, needed)

  def _save_failed(self, step: int, error: Exception) -> Exception:
    """A full disk (filled during the save) becomes the `_no_space` line; other errors stay."""
    if not _out_of_space(error):
      return error
    return self._no_space(step, shutil.disk_usage(self.directory).free, self._needed_bytes({}))

  def _no_space(self, step: int, free: int, needed: int) -> CheckpointError:
    """One line naming the path, the space free and needed, and where the run resumes; the
    pending saves of the run are not waited for again."""
    self._failed_save = CheckpointError(
      f'No space left on the device of {self.directory} for the checkpoint of step {step}: '
      f'{free / 2**20:.0f} MiB free, it needs {needed / 2**20:.0f} MiB. Free space there (or '
      'lower checkpoint.keep_last) and run the same command: it resumes from '
      f'{self.describe_latest().split(": ", 1)[-1]}.'
    )
    return self._failed_save

  def restore(self, target: TrainState, data_iterator) -> tuple[int, TrainState, dict]:
    """Restores the newest readable checkpoint into `target`'s shapes and shardings.

    An unreadable checkpoint (truncated or missing files, or files that differ from the checksums
    recorded at its save) is reported, moved aside to `{step}.unreadable-{time}` and the previous
    one is tried. A data-iterator state that cannot be set counts as damaged once an older
    checkpoint's can be; when none can, the data config changed: an error, nothing moved.
    Returns (step, restored TrainState, metadata).
    """
    failures, data_failures = [], []
    target_items = _state_items(target)
    for step in reversed(self.all_steps()):
      try:
        if store.verify_checksums(store.step_dir(self.directory, step)):
          self._verified.add(step)
        self._check_params(step, target.params)
        args = {
          name: ocp.args.StandardRestore(abstract_like(target_items[name]))
          for name in _non_empty(target_items)
        }
        args[store.METADATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      except DamagedCheckpoint as error:
        failures.append(f'step {step}: {error}')
        self._move_aside(step, error)
        continue
      except CheckpointError:
        raise
      except Exception as error:  # Orbax/TensorStore raise many types for damaged files.
        failures.append(f'step {step}: {type(error).__name__}: {str(error)[:200]}')
        self._move_aside(step, error)
        continue
      data_error = self._restore_data(step, data_iterator)
      if data_error is not None:
        data_failures.append(data_error)
        continue
      for damaged in data_failures:  # An older state restores: theirs are damaged.
        self._move_aside(damaged.step, damaged)
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
    if data_failures:
      raise data_failures[0]
    raise CheckpointError(
      f'No readable checkpoint in {self.directory} ({"; ".join(failures)}). Remove the '
      'directory (or use another --workdir) to start from scratch.'
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

  def _restore_data(self, step: int, data_iterator) -> DataStateError | None:
    """Sets the step's data-iterator state; the error, if it cannot be set."""
    step_dir = store.step_dir(self.directory, step)
    try:
      self._manager.restore(
        step,
        args=ocp.args.Composite(**{store.DATA: grain.checkpoint.CheckpointRestore(data_iterator)}),
      )
    except Exception as error:
      return DataStateError(
        step,
        f'The data-iterator state in {store.item_dir(step_dir, store.DATA)} cannot be restored '
        f'({type(error).__name__}: {str(error)[:200]}), nor that of any older checkpoint: the '
        'data config changed since the run started. Resume with the same data settings, or '
        f'start a new --workdir with --config.init_from={step_dir}.',
      )
    return None

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
    """Blocks until the pending async save is on disk and its checksums are written."""
    if self._failed_save is not None:  # Reported once; the resumed run saves again.
      return
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      raise self._save_failed(self._unsummed[-1] if self._unsummed else -1, error) from None
    self._sum_completed()
    for future in self._pending_sums:
      future.result()
    self._pending_sums = []

  def close(self) -> None:
    if self._failed_save is None:
      self.wait()
    self._summing.shutdown()
    try:
      self._manager.close()
    except Exception:
      if self._failed_save is None:
        raise
