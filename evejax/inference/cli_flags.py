"""Command-line flags shared by `python -m evejax.generate` and `python -m evejax.evaluation`."""

from __future__ import annotations

import sys

from absl import app, flags

from evejax import sharding
from evejax.checkpoint import CheckpointError
from evejax.inference.assistant import Assistant
from evejax.inference.sampling import SamplingConfig

CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'Training workdir, its checkpoints/ folder (newest step) or a step folder.'
)
MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens to generate per answer.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy decoding.')
TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = off).')
TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).')
REPETITION_PENALTY = flags.DEFINE_float('repetition_penalty', 1.0, '1 = off (HF semantics).')
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
  ['eve_v2_train', 'eve_v2_infer', 'none'],
  'Image resize policy; default: the training data.resize.',
)


def sampling_config() -> SamplingConfig:
  return SamplingConfig(
    max_new_tokens=MAX_NEW_TOKENS.value,
    temperature=TEMPERATURE.value,
    top_k=TOP_K.value,
    top_p=TOP_P.value,
    repetition_penalty=REPETITION_PENALTY.value,
  )


def parse_mesh(text: str) -> dict[str, int]:
  sizes = {}
  for item in filter(None, text.split(',')):
    axis, sep, size = item.partition('=')
    if not sep or not size.lstrip('-').isdigit():
      raise app.UsageError(f'--mesh={text!r}: expected axis=size pairs, e.g. "data=-1"')
    sizes[axis.strip()] = int(size)
  return sizes


def load_assistant() -> Assistant:
  """The --checkpoint run, or exit with a message naming the flag that is wrong."""
  try:
    mesh = sharding.make_mesh(parse_mesh(MESH.value))
  except ValueError as e:
    raise app.UsageError(f'--mesh={MESH.value}: {e}') from e
  try:
    return Assistant.from_checkpoint(
      CHECKPOINT.value, mesh=mesh, max_length=MAX_LENGTH.value, resize=RESIZE.value
    )
  except (CheckpointError, OSError, ValueError) as e:
    sys.exit(f'--checkpoint={CHECKPOINT.value}: {e}')
