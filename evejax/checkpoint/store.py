"""Where a run keeps its files and checkpoints, and how a path a user gives finds them.

This is the one module that knows the layout; everything else asks it. A training workdir:

  {workdir}/config.json             the run's full config (JSON), written when the run starts
  {workdir}/tokenizer.json          the run's tokenizer (`Tokenizer.save`, with its config;
                                    tokenizer.model for a SentencePiece one)
  {workdir}/checkpoints/{step}/     one Orbax step directory per saved step, one item per part,
                                    so each can be read on its own (`init_from` reads `params`):
      params      parameter pytree (pure dict)
      opt_state   optimizer state pytree
      progress    {'step': int32, 'rng': uint32 key data}
      data        the Grain iterator state (JSON)
      metadata    {'config': the run's config, ...} (JSON)
      checksums.json  SHA-256 of every file above, written once the save completed

An import output (`python -m evejax.convert import`, a recipe's weight copy) is a folder with only
the `params` and `metadata` ({'config': {'model': ...}, ...}) items, and for `convert import` the
`source/` folder: the config.json, generation_config.json and tokenizer files of the folder it was
imported from (what inference needs besides the weights). So whatever reads weights or their config
(init_from, inference, export) takes a workdir, its checkpoints/ folder (newest step), one step
folder or an import output alike (`resolve_checkpoint`); `evejax.checkpoint.kinds` tells them apart
from an official HF/EVE folder.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from evejax import storage
from evejax.models import ModelConfig

PARAMS, OPT_STATE, PROGRESS, DATA, METADATA = 'params', 'opt_state', 'progress', 'data', 'metadata'
STATE_ITEMS = (PARAMS, OPT_STATE, PROGRESS)
CONFIG = 'config'  # The metadata entry holding the config the weights were saved with.
CHECKSUMS = 'checksums.json'

_PATH_HINT = (
  'give a training workdir, its checkpoints/ folder (newest step), one step folder '
  '(…/checkpoints/STEP) or an import output (python -m evejax.convert import --out)'
)
_CONFIG_HINT = (
  'python -m evejax.train and evejax.convert import write it; where a command takes '
  '--config, pass the model config with it'
)


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not fit the model being trained."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint whose files differ from the checksums recorded when it was saved."""


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def _hash_files(folder: epath.Path, names) -> dict[str, str]:
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL.
    return dict(zip(names, pool.map(lambda name: _sha256(folder / name), names)))


def write_checksums(folder: str) -> None:
  """Records the SHA-256 of every file of a completed checkpoint folder (a step directory or an
  import output) in its `CHECKSUMS` file, so that `verify_checksums` finds any byte that changed
  since, which no format check does (a flipped bit in an array file restores silently)."""
  root = epath.Path(folder)
  names = [name for name in storage.files_below(folder) if name != CHECKSUMS]
  # Atomic: a reader sees all of the file or none.
  storage.write_atomic(os.fspath(root / CHECKSUMS), json.dumps(_hash_files(root, names), indent=0))


def verify_checksums(folder: str) -> bool:
  """True when the folder's files match their `CHECKSUMS`; False when it has none (a save that
  ended before they were written, or an older checkpoint); raises DamagedCheckpoint otherwise."""
  root = epath.Path(folder)
  if not (root / CHECKSUMS).exists():
    return False
  try:
    recorded = json.loads((root / CHECKSUMS).read_text())
  except ValueError as error:
    raise DamagedCheckpoint(f'{root / CHECKSUMS} is not readable JSON ({error})') from None
  missing = sorted(name for name in recorded if not (root / name).exists())
  found = _hash_files(root, sorted(set(recorded) - set(missing)))
  changed = sorted(name for name, digest in found.items() if digest != recorded[name])
  if missing or changed:
    raise DamagedCheckpoint(
      f'{root} is damaged: {len(changed)} files differ from the checksums recorded when it was '
      f'saved {changed[:3]}, {len(missing)} are missing {missing[:3]}'
    )
  return True


def checkpoints_dir(workdir: str) -> str:
  """The run's checkpoint directory: one step directory per saved step."""
  return os.path.join(workdir, 'checkpoints')


def step_dir(directory: str, step: int) -> str:
  """One step of a checkpoint directory (`checkpoints_dir`)."""
  return os.path.join(directory, str(step))


def item_dir(folder: str, item: str) -> str:
  """One item (PARAMS, METADATA, ...) of a step directory or import output."""
  return os.path.join(folder, item)


def workdir_of(step_folder: str) -> str:
  """The workdir whose run saved a step directory (`{workdir}/checkpoints/{step}`)."""
  return os.path.dirname(os.path.dirname(storage.absolute(step_folder)))


def source_dir(folder: str) -> str:
  """The HF files (config, generation config, tokenizer) an import output keeps of its source."""
  return os.path.join(folder, 'source')


def run_config_file(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def write_run_config(workdir: str, config: Mapping[str, Any]) -> str:
  """Writes the run's full config (JSON-able) to `run_config_file`; returns that path.

  Written atomically (`storage.write_atomic`), so a reader never sees half of it.
  """
  storage.makedirs(workdir)
  path = run_config_file(workdir)
  storage.write_atomic(path, json.dumps(config, indent=1))
  return path


def resolve_checkpoint(path: str) -> str:
  """The folder holding the `params` and `metadata` items that `path` names: the path itself (a
  step directory or import output), else the newest complete step of a checkpoints/ folder or of
  a workdir's."""
  path = storage.absolute(path)
  if storage.isdir(item_dir(path, PARAMS)):
    return path
  if not storage.isdir(path):
    raise CheckpointError(f'{path} does not exist: {_PATH_HINT}')
  root = checkpoints_dir(path) if storage.isdir(checkpoints_dir(path)) else path
  # Orbax lists only complete steps: a save killed half-way still has its temporary name.
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step()
  if step is None:
    raise CheckpointError(
      f'{path} is not a checkpoint: it has no {PARAMS}/ item and {root} no '
      f'complete step folder; {_PATH_HINT}'
    )
  return step_dir(root, step)


def resolve_params_dir(path: str) -> str:
  """The `params` item that `path` (any kind `resolve_checkpoint` takes) names."""
  return item_dir(resolve_checkpoint(path), PARAMS)


def write_params_folder(
  directory: str,
  params: Mapping,
  config: Mapping[str, Any],
  *,
  params_handler: ocp.PyTreeCheckpointHandler | None = None,
  **details: Any,
) -> None:
  """Writes an import output: `params` and the metadata {'config': config, **details}.

  `params_handler` (default: Orbax's) writes the parameters, e.g. one that limits the memory
  a large model's save takes (evejax.convert.checkpoints).
  """
  directory = storage.absolute(directory)
  ocp.Checkpointer(params_handler or ocp.PyTreeCheckpointHandler()).save(
    item_dir(directory, PARAMS), args=ocp.args.PyTreeSave(params)
  )
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
    item_dir(directory, METADATA), args=ocp.args.JsonSave({CONFIG: dict(config), **details})
  )
  write_checksums(directory)


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata (JSON) of the step directory or import output that `path` names."""
  folder = resolve_checkpoint(path)
  metadata_dir = item_dir(folder, METADATA)
  if not storage.isdir(metadata_dir):
    raise CheckpointError(
      f'{folder} has no {METADATA}/ item (the config its weights were saved with); {_CONFIG_HINT}'
    )
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
    metadata_dir, args=ocp.args.JsonRestore()
  )


def saved_config(path: str) -> dict[str, Any]:
  """The config stored with the weights `path` names: a training run's full config, an import
  output's {'model': ...}."""
  folder = resolve_checkpoint(path)
  config = read_metadata(folder).get(CONFIG)
  if config is None:
    raise CheckpointError(f'The {METADATA} of {folder} has no {CONFIG}; {_CONFIG_HINT}')
  return config


def saved_model_config(path: str) -> ModelConfig:
  """The model config stored with the weights `path` names (import output or training step)."""
  model = saved_config(path).get('model')
  if model is None:
    raise CheckpointError(f'The {CONFIG} saved with {path} has no model section; {_CONFIG_HINT}')
  return ModelConfig.from_dict(model)
