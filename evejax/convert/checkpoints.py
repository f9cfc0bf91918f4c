"""evejax checkpoints on the conversion side: imported parameters saved as an import output
(evejax.checkpoint.store; what `--config.init_from={dir}` and `export` read) with Orbax's host
copies batched to bound the memory, and parameters read back, whole or one tensor at a time, from
an import output or a training run alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp

# Not re-exported publicly: the transfer-priority enum and the array metadata store that a
# custom ArrayHandler needs (orbax's own default handler is built with one).
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import types as orbax_serialization

from evejax import storage
from evejax.checkpoint import store
from evejax.convert import exporter, keymap
from evejax.models import ModelConfig

# Orbax copies and writes at most this much at once (GB), or just over the largest array: saving
# adds about two of the largest arrays to the params' memory (1.1B bf16 model: 1.38x -> 1.30x).
CONCURRENT_GB = 0.05


class _BatchedHostCopies:
  """Orbax callback: copy arrays to the host in `CONCURRENT_GB` batches during the write instead of
  all of them before it (the default), which would hold a second copy of the model."""

  def key_priority(self, keypath):
    del keypath
    return orbax_serialization.TransferPriority.ASYNCHRONOUS_DEPRIORITIZED

  def on_transfer_start(self, keypath):
    del keypath

  on_transfer_end = on_write_end = on_transfer_start


@contextlib.contextmanager
def _batched_host_copies():
  """Orbax reads the jax.Array handler from its global registry; swap ours in for one save."""
  previous = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(), callback=_BatchedHostCopies()
    ),
    override=True,
  )
  try:
    yield
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, previous, override=True)


# What inference needs of the source besides its weights (evejax.inference.official reads them).
SOURCE_FILES = ('config.json', 'generation_config.json', 'preprocessor_config.json')


def copy_source_files(source: str, directory: str) -> list[str]:
  """Copies the source folder's config, generation config and tokenizer files that exist into the
  import output's `store.source_dir`; returns their names."""
  names = [
    n for n in SOURCE_FILES + exporter.TOKENIZER_FILES if storage.exists(os.path.join(source, n))
  ]
  storage.makedirs(store.source_dir(directory))
  for name in names:
    storage.copy(os.path.join(source, name), os.path.join(store.source_dir(directory), name))
  return names


def save_params(directory: str, params: Mapping, cfg: ModelConfig, source: str) -> None:
  """Writes imported parameters where `--config.init_from=directory` (and `export`) finds them,
  with the source's HF files (`copy_source_files`), so the output also answers questions."""
  copy_source_files(source, storage.absolute(directory))
  # Orbax needs the largest array to fit within the limit.
  limit_gb = max([CONCURRENT_GB] + [1.05 * x.nbytes / 1e9 for x in jax.tree.leaves(params)])
  params_handler = ocp.PyTreeCheckpointHandler(
    save_concurrent_gb=limit_gb, save_device_host_concurrent_gb=limit_gb
  )
  # import_checkpoint gives jax arrays on the CPU; numpy leaves are copied into jax arrays, because
  # Orbax buffers numpy leaves whole.
  with _batched_host_copies():
    store.write_params_folder(
      directory,
      jax.tree.map(jax.device_put, params),
      {'model': dataclasses.asdict(cfg)},
      params_handler=params_handler,
      converted_from=source,
    )


def _restore(params_dir: str, target: Mapping) -> dict:
  """The (partial) tree `target` of ShapeDtypeStructs, restored as jax arrays on the host CPU
  (what `import_checkpoint` gives and `save_params` writes without another copy)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target)
  return ocp.PyTreeCheckpointer().restore(
    params_dir,
    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
  )


def _params_dir_and_config(path: str, cfg: ModelConfig | None) -> tuple[str, ModelConfig]:
  """The `params` item that `path` names, and `cfg` or else the model config saved with it."""
  folder = store.resolve_checkpoint(path)
  return store.item_dir(folder, store.PARAMS), cfg or store.saved_model_config(folder)


def load_params(path: str, cfg: ModelConfig | None = None) -> tuple[dict, ModelConfig]:
  """All parameters (jax arrays on the host CPU) of an import output, a workdir, a checkpoints
  directory (newest step) or a step directory; `cfg` defaults to the one saved with them."""
  params_dir, cfg = _params_dir_and_config(path, cfg)
  return _restore(params_dir, keymap.abstract_params(cfg)), cfg


class LazyParams(Mapping):
  """A saved parameter tree that restores a leaf only when it is indexed, keeping just the last one:
  streaming an export through it holds one tensor, not the model (see `lazy_params`)."""

  def __init__(
    self, params_dir: str, abstract: Mapping, path: tuple = (), last: dict | None = None
  ):
    self._dir, self._abstract, self._path = params_dir, abstract, path
    self._last = {} if last is None else last

  def __getitem__(self, key):
    node, path = self._abstract[key], self._path + (key,)
    if isinstance(node, Mapping):
      return LazyParams(self._dir, node, path, self._last)
    if self._last.get('path') != path:
      self._last.clear()  # drop the previous tensor before reading the next
      target = node
      for k in reversed(path):
        target = {k: target}
      value = _restore(self._dir, target)
      for k in path:
        value = value[k]
      self._last.update(path=path, value=value)
    return self._last['value']

  def __iter__(self):
    return iter(self._abstract)

  def __len__(self):
    return len(self._abstract)


def lazy_params(path: str, cfg: ModelConfig | None = None) -> tuple[LazyParams, ModelConfig]:
  """Like `load_params`, but tensors are read on access, one at a time."""
  params_dir, cfg = _params_dir_and_config(path, cfg)
  return LazyParams(params_dir, keymap.abstract_params(cfg)), cfg
