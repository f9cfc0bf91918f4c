"""Flags that `python -m evejax.convert` and `python -m evejax.convert.check` share, defined once:
both name the folders and the evejax model the same way."""

from __future__ import annotations

from absl import flags

from evejax import cli
from evejax.models import ModelConfig

HF_DIR = flags.DEFINE_string(
  'hf_dir',
  None,
  'HF Llama/Qwen2 or official EVE folder: what import reads, what check runs in PyTorch.',
)
PARAMS = flags.DEFINE_string(
  'params',
  None,
  'evejax checkpoint (import output, workdir, '
  'checkpoints dir or step dir): what export writes out, what check '
  'compares (default: --hf_dir imported).',
)
CONFIG = cli.define_config_flag(
  'A get_config(arg) file whose `model` is the evejax model, as path[:arg] (--config.model.X=Y '
  'overrides a field); default: the model of config.json and the weights (export: the saved '
  'one).',
  required=False,
)


def config_from_flag() -> ModelConfig | None:
  """The model of `--config` (None without it)."""
  return ModelConfig.from_dict(CONFIG.value.model) if CONFIG.value else None
