"""An official EVE / HF folder (or the `source/` files an import output keeps) as evejax inference
needs it: its model config, weights, tokenizer, and the official inference protocol
(EVE_REFERENCE.md §3.2, §3.5, §6.2):

- conversation template: EVEv2 (Qwen2) `qwen2`, EVEv1 (Llama / Vicuna) `vicuna_v1`, the templates
  of the papers' benchmark scripts: `{system} USER: <image>\\n{question} ASSISTANT:`;
- images: EVEv2 scales every image to the processor's area budget, small ones up
  (`eve_v2_infer`, ~2.5k visual tokens at 1600); EVEv1 makes the long side the processor's size
  (`eve_v1`);
- generation settings: `generation_config.json` as HF `generate` reads it (sampling only with
  `do_sample`, its repetition penalty, its eos ids as stop tokens); EVEv2's penalty also counts id 0
  in a prompt with an image, where the reference puts it in place of the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from evejax import storage
from evejax.config import TrainConfig
from evejax.convert import exporter, importer
from evejax.convert.files import CheckpointReader
from evejax.data.tokenizer import Tokenizer
from evejax.inference.sampling import SamplingConfig
from evejax.models import ModelConfig

TEMPLATES = {'qwen2': 'qwen2', 'llama': 'vicuna_v1'}  # per LLM family
RESIZE = {'v2': 'eve_v2_infer', 'v1': 'eve_v1'}  # per vision tokenizer
# EVEv2 replaces its image placeholder by id 0 in the ids the repetition penalty sees (Generator).
IMAGE_SEEN_ID = {'v2': 0}
GENERATION_CONFIG, PROCESSOR_CONFIG = 'generation_config.json', 'preprocessor_config.json'
# HF GenerationConfig defaults for what generation_config.json leaves out.
HF_SAMPLING_DEFAULTS = {'temperature': 1.0, 'top_k': 50, 'top_p': 1.0, 'repetition_penalty': 1.0}
# The image size in the releases' processor folder names: res1600 (v2), anypixel-672 (v1).
_SIZE_IN_NAME = re.compile(r'(?:res|anypixel-)(\d+)')
# The released EVEv1 at 1344 px (HD) pools 2x2 tokens per CLIP patch in PAL: image_size / 672.
V1_BASE_SIZE = 672


def _read_json(path: str) -> dict | None:
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore the file of the release') from None


def processor_max_size(folder: str, hf: Mapping[str, Any], vision_tokenizer: str) -> int:
  """The image size of the processor that config.json's `mm_vision_tower` names (EVEv2 area budget
  `max_size`, EVEv1 long side `image_size`): its preprocessor_config.json in `folder`, in
  `folder/{mm_vision_tower}` or in `./{mm_vision_tower}` (where the official code looks), else the
  size in the release's folder name (…-res1600-…, …-anypixel-672)."""
  tower = hf.get('mm_vision_tower') or exporter.EVE_PROCESSORS[vision_tokenizer]
  for candidate in (folder, os.path.join(folder, tower), tower):
    processor = _read_json(os.path.join(candidate, PROCESSOR_CONFIG))
    size = processor and (processor.get('max_size') or processor.get('image_size'))
    if isinstance(size, int):
      return size
  match = _SIZE_IN_NAME.search(tower)
  if not match:
    raise ValueError(
      f'{folder}/config.json: the processor mm_vision_tower={tower!r} has no '
      f'{PROCESSOR_CONFIG} here and no size in its name; pass --max_size'
    )
  return int(match[1])


def sampling(folder: str, tokenizer: Tokenizer) -> SamplingConfig:
  """The folder's generation_config.json as HF `generate` applies it: greedy unless `do_sample`,
  its repetition penalty either way; stops at its eos ids (the Assistant adds the template's)."""
  gen = _read_json(os.path.join(folder, GENERATION_CONFIG)) or {}
  settings = {k: gen.get(k, v) for k, v in HF_SAMPLING_DEFAULTS.items()}
  if not gen.get('do_sample', False):
    settings.update(temperature=0.0, top_k=0, top_p=1.0)
  eos = gen.get('eos_token_id', tokenizer.eos_id)
  stops = {tokenizer.eos_id, *(eos if isinstance(eos, list) else [eos])}
  return SamplingConfig(
    max_new_tokens=gen.get('max_new_tokens') or SamplingConfig.max_new_tokens,
    temperature=float(settings['temperature']),
    top_k=int(settings['top_k'] or 0),
    top_p=float(settings['top_p']),
    repetition_penalty=float(settings['repetition_penalty']),
    stop_tokens=tuple(sorted(stops)),
  )


def _dtype_name(dtype: np.dtype) -> str:
  """The evejax dtype of stored weights: bf16 and f32 as stored; f16 (no evejax kernels) as bf16."""
  if dtype == np.dtype(ml_dtypes.bfloat16) or dtype == np.float16:
    return 'bfloat16'
  return 'float32'


def model_config(folder: str, hf: Mapping[str, Any], max_size: int | None = None) -> ModelConfig:
  """The evejax model of an official folder, computing in the dtype its weights are stored in
  (the release: bfloat16). EVEv1 HD (1344 px) gets PAL's 2x2 pooling, as the release trained."""
  llm = importer.model_config_from_hf(hf)  # a config evejax cannot run fails before any read
  reader = CheckpointReader(folder)
  fields = importer.vision_fields(reader)
  embedding = next(k for k in reader.keys() if k.endswith('embed_tokens.weight'))
  dtype = _dtype_name(reader.dtype(embedding))
  fields.update(param_dtype=dtype, dtype=dtype)
  if fields.get('pal'):
    fields['pal_pool'] = pal_pool(folder, hf, max_size)
  return dataclasses.replace(llm, **fields)


def pal_pool(folder: str, hf: Mapping[str, Any], max_size: int | None = None) -> int:
  """EVEv1's PAL pooling, which also makes image sides whole 2x2 token blocks at 1344 px (HD):
  the processor's image size / 672."""
  return max(1, (max_size or processor_max_size(folder, hf, 'v1')) // V1_BASE_SIZE)


def train_config(
  files: str, model: ModelConfig, *, max_size: int | None = None, template: str | None = None
) -> TrainConfig:
  """A TrainConfig whose data section is the official inference protocol of the HF files in
  `files` (config.json, tokenizer) for `model`; `max_size` and `template` override it."""
  hf = importer.read_hf_config(files)
  return TrainConfig.parse(
    {
      'model': dataclasses.asdict(model),
      'data': {
        'tokenizer': files,
        'template': template or TEMPLATES[model.family],
        'resize': RESIZE[model.vision_tokenizer],
        'max_size': max_size or processor_max_size(files, hf, model.vision_tokenizer),
        # The context: the reference's generate truncates nothing (its tokenizer_model_max_length
        # cuts training rows only), so the model's positions bound it.
        'seq_len': hf.get('max_position_embeddings')
        or exporter.DEFAULT_MAX_POSITIONS[model.family],
      },
    }
  )
