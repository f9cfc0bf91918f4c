"""What kind of checkpoint a path is: the one place that tells them apart.

- RUN: an evejax training run (a workdir, its checkpoints/ folder or one step folder); its saved
  config is the whole TrainConfig (model, data, template, ...).
- IMPORT: the output of `python -m evejax.convert import`: parameters and the model config only;
  the HF files of its source are in `store.source_dir`.
- OFFICIAL: a HF / official EVE folder (config.json with a `model_type`, safetensors or
  pytorch_model.bin weights, tokenizer files): EVE-7B-HD-v1.0, EVE-7B-HD-v2.0, `convert export`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from evejax import storage
from evejax.checkpoint import store
from evejax.convert.files import BIN_INDEX, SAFETENSORS_INDEX

RUN, IMPORT, OFFICIAL = 'run', 'import', 'official'
HF_CONFIG = 'config.json'
WEIGHT_FILES = (SAFETENSORS_INDEX, BIN_INDEX, 'model.safetensors', 'pytorch_model.bin')
_KINDS_HINT = (
  'give an evejax training workdir (or its checkpoints/ or a step folder), a '
  '`python -m evejax.convert import` output, or an official EVE/HF folder (config.json and '
  'model*.safetensors or pytorch_model*.bin weights)'
)


@dataclasses.dataclass(frozen=True)
class Located:
  kind: str  # RUN, IMPORT or OFFICIAL
  folder: str  # the step folder, import output or HF folder holding the weights


def _is_official(folder: str) -> bool:
  """A HF model folder: a config.json naming a model_type (a workdir's config.json is the run's
  TrainConfig, which has none) beside weight files."""
  config = os.path.join(folder, HF_CONFIG)
  if not storage.isfile(config):
    return False
  if not any(storage.exists(os.path.join(folder, name)) for name in WEIGHT_FILES):
    return False
  try:
    return 'model_type' in json.loads(storage.read_text(config))
  except ValueError:
    return False


def locate(path: str) -> Located:
  """The kind of checkpoint `path` names and the folder holding its weights; CheckpointError (one
  line, naming the path and what to give instead) when it is none of them."""
  if not path:
    raise store.CheckpointError(f'no checkpoint given: {_KINDS_HINT}')
  absolute = storage.absolute(path)
  if storage.isdir(absolute) and _is_official(absolute):
    return Located(OFFICIAL, absolute)
  if not storage.isdir(absolute):
    raise store.CheckpointError(f'{absolute} does not exist: {_KINDS_HINT}')
  try:
    folder = store.resolve_checkpoint(absolute)
  except store.CheckpointError:
    raise store.CheckpointError(f'{absolute} is not a checkpoint: {_KINDS_HINT}') from None
  config = store.saved_config(folder)
  # A training run saves its whole TrainConfig; an import output only {'model': ...}.
  return Located(RUN if 'data' in config else IMPORT, folder)
