"""Command-line flags shared by `python -m evejax.generate` and `python -m evejax.evaluation`."""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from evejax import cli, sharding
from evejax.checkpoint import CheckpointError
from evejax.data.images import RESIZE_POLICIES
from evejax.data.templates import TEMPLATES
from evejax.inference.assistant import Assistant
from evejax.inference.sampling import SamplingConfig

CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'Training workdir (its checkpoints/ folder, a step folder), a `python -m evejax.convert import` '
  'output, or an official EVE folder (config.json, safetensors, tokenizer files).',
)
# Generation settings: a flag given replaces the checkpoint's own (Assistant.sampling): evejax
# runs decode greedily; official and imported models as their generation_config.json says.
_FROM_CHECKPOINT = " (default: the checkpoint's; evejax runs: %s)"
MAX_NEW_TOKENS = flags.DEFINE_integer(
  'max_new_tokens', 128, 'Most tokens to generate per answer' + _FROM_CHECKPOINT % 128
)
TEMPERATURE = flags.DEFINE_float(
  'temperature', 0.0, '0 = greedy decoding' + _FROM_CHECKPOINT % 'greedy'
)
TOP_K = flags.DEFINE_integer(
  'top_k', 0, 'Sample among the k most likely tokens, 0 = off' + _FROM_CHECKPOINT % 'off'
)
TOP_P = flags.DEFINE_float(
  'top_p', 1.0, 'Nucleus sampling mass, 1 = off' + _FROM_CHECKPOINT % 'off'
)
REPETITION_PENALTY = flags.DEFINE_float(
  'repetition_penalty', 1.0, 'HF semantics, 1 = off' + _FROM_CHECKPOINT % 'off'
)
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
MAX_LENGTH = flags.DEFINE_integer(
  'max_length',
  None,
  'Context: prompt (visual tokens included) + answer tokens; default: the training data.seq_len.',
)
MESH = flags.DEFINE_string(
  'mesh',
  'data=-1',
  'Device mesh as axis=size pairs over data, fsdp, tensor (one may be -1), '
  'e.g. "data=1,tensor=8" to split the weights of a model too large for one device.',
)
RESIZE = flags.DEFINE_enum(
  'resize',
  None,
  list(RESIZE_POLICIES),
  'Image resize policy; default: the training data.resize (official models: the official '
  'inference rule, eve_v2_infer or eve_v1).',
)
MAX_SIZE = flags.DEFINE_integer(
  'max_size',
  None,
  'Image size budget in pixels; default: the training data.max_size (official models: their '
  "processor's, e.g. 1600 for EVE-7B-HD-v2.0).",
)
TEMPLATE = flags.DEFINE_enum(
  'template',
  None,
  sorted(TEMPLATES),
  'Conversation template; default: the training data.template (official models: qwen2 for '
  'EVEv2, vicuna_v1 for EVEv1).',
)


_SAMPLING_FLAGS = {
  'max_new_tokens': MAX_NEW_TOKENS,
  'temperature': TEMPERATURE,
  'top_k': TOP_K,
  'top_p': TOP_P,
  'repetition_penalty': REPETITION_PENALTY,
}


def sampling_config(defaults: SamplingConfig | None = None) -> SamplingConfig:
  """`defaults` (e.g. `Assistant.sampling`) with the sampling flags given on the command line;
  without defaults, every flag's value."""
  if defaults is None:
    return SamplingConfig(**{name: flag.value for name, flag in _SAMPLING_FLAGS.items()})
  given = {name: flag.value for name, flag in _SAMPLING_FLAGS.items() if flag.present}
  return dataclasses.replace(defaults, **given)


def load_assistant() -> Assistant:
  """The --checkpoint run, or exit with a message naming the flag that is wrong."""
  try:
    mesh = sharding.make_mesh(cli.parse_mesh(MESH.value))
  except ValueError as e:
    raise app.UsageError(f'--mesh={MESH.value}: {e}') from e
  try:
    return Assistant.from_checkpoint(
      CHECKPOINT.value,
      mesh=mesh,
      max_length=MAX_LENGTH.value,
      resize=RESIZE.value,
      max_size=MAX_SIZE.value,
      template=TEMPLATE.value,
    )
  except (CheckpointError, OSError, ValueError, ImportError) as e:  # ImportError: sentencepiece
    sys.exit(f'--checkpoint={CHECKPOINT.value}: {e}')
