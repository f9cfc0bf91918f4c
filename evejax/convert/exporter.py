"""Export evejax parameters to the official EVE (v1) / EVEv2 format or a plain HF Llama/Qwen2 LLM.

A folder the official code (and `transformers`, for the LLM) loads: safetensors shards + index,
`config.json`, `generation_config.json` and the tokenizer files. Parameters may be numpy arrays or
(sharded, multi-host) jax arrays: each tensor is gathered to the host on its own (on every process,
as the collective requires), converted to the PyTorch layout and streamed into its shard by
process 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from evejax import storage
from evejax.convert import keymap
from evejax.convert.files import (
  DEFAULT_SHARD_BYTES,
  DTYPES,
  PlannedTensor,
  SafetensorsFile,
  ShardedSafetensorsWriter,
)
from evejax.models import ModelConfig

TOKENIZER_FILES = (
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'tokenizer.model',
  'chat_template.jinja',
)
HF_CLASSES = {'qwen2': ('Qwen2ForCausalLM', 'qwen2'), 'llama': ('LlamaForCausalLM', 'llama')}
# Per vision tokenizer: the LLM family, architecture and model_type of the official code.
EVE_CLASSES = {
  'v2': ('qwen2', 'EVEQwen2ForCausalLM', 'eve-qwen2'),
  'v1': ('llama', 'EVELlamaForCausalLM', 'eve'),
}
DEFAULT_MAX_POSITIONS = {'qwen2': 32768, 'llama': 4096}
# The releases' processor folders (relative to the working directory of the official code).
EVE_PROCESSORS = {
  'v2': 'openai/eve-anyratio-res1600-patch16',
  'v1': 'openai/eve-patch14-anypixel-672',
}
EVE_V1_TEACHER = 'openai/clip-vit-large-patch14-336'
# config.json fields the official EVE code adds to the LLM config (dropped for a plain LLM export).
EVE_FIELDS = (
  'mm_vision_tower',
  'mm_hidden_size',
  'add_moe',
  'moe_part',
  'tune_LLM',
  'tune_VE',
  'tune_MOE',
  'vision_tower_lr',
  'mm_use_im_start_end',
  'mm_use_im_patch_token',
  'mm_projector_lr',
  'tokenizer_model_max_length',
  'mm_vision_tower_clip',
  'mm_projector_type',
  'mm_vision_select_layer',
  'mm_vision_select_feature',
  'requires_cliploss',
  'use_mm_proj',
  'tune_mm_mlp_adapter',
  'image_aspect_ratio',
  'image_grid_pinpoints',
)
# Fields of the source config that describe its files or class, never the exported model.
STALE_FIELDS = (
  '_name_or_path',
  'transformers_version',
  'architectures',
  'model_type',
  'torch_dtype',
  'dtype',
  'rope_scaling',
)


def host_value(x) -> np.ndarray:
  """One parameter on the host; a multi-host array is gathered (all processes must call this)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def hf_llm_config(
  cfg: ModelConfig, base: Mapping[str, Any] | None = None, dtype: str = 'bfloat16'
) -> dict:
  """config.json of the plain HF LLM; `base` (the source LLM's config) supplies the fields evejax
  does not model (max_position_embeddings, special token ids, ...)."""
  if cfg.family == 'qwen2' and not cfg.attention_bias:
    raise ValueError('HF Qwen2 always has q/k/v biases; this model has attention_bias=False')
  if cfg.family == 'llama' and cfg.attention_bias:
    raise ValueError('HF Llama attention_bias also adds an o_proj bias, which evejax does not have')
  architecture, model_type = HF_CLASSES[cfg.family]
  out = {k: v for k, v in (base or {}).items() if k not in EVE_FIELDS + STALE_FIELDS}
  out.update(
    architectures=[architecture],
    model_type=model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    hidden_act='silu',
    rms_norm_eps=cfg.rms_norm_eps,
    rope_theta=cfg.rope_theta,
    rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
    tie_word_embeddings=cfg.tie_word_embeddings,
    torch_dtype=dtype,
  )
  out.setdefault('max_position_embeddings', DEFAULT_MAX_POSITIONS[cfg.family])
  if cfg.family == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  return out


def eve_config(
  cfg: ModelConfig,
  base: Mapping[str, Any] | None = None,
  dtype: str = 'bfloat16',
  vision_tower: str | None = None,
  with_teacher: bool = False,
) -> dict:
  """config.json of the official EVE (v1) or EVEv2 model (EVE_REFERENCE.md §4.3). EVEv1:
  `with_teacher` sets requires_cliploss (the official code then builds PAL and its CLIP)."""
  family, architecture, model_type = EVE_CLASSES[cfg.vision_tokenizer]
  if cfg.family != family:
    raise ValueError(
      f'The official EVE{cfg.vision_tokenizer} model is a {family} LLM; this one is {cfg.family!r}'
    )
  official_geometry = (16, 2) if cfg.vision_tokenizer == 'v2' else (14, 2)
  if (cfg.vision_patch_size, cfg.vision_merge) != official_geometry:
    logging.warning(
      'Vision patch %d / merge %d differ from the official processor folders (%d/%d):'
      ' point mm_vision_tower at a processor with matching strides',
      cfg.vision_patch_size,
      cfg.vision_merge,
      *official_geometry,
    )
  out = hf_llm_config(cfg, base, dtype)
  out['architectures'], out['model_type'] = [architecture], model_type
  out.update(
    mm_vision_tower=vision_tower or EVE_PROCESSORS[cfg.vision_tokenizer],
    mm_hidden_size=cfg.vision_hidden_size,
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
  )
  if cfg.vision_tokenizer == 'v2':
    out.update(
      add_moe=bool(cfg.decomposed_parts),
      moe_part=cfg.moe_part or None,
      tune_LLM=True,
      tune_VE=True,
      tune_MOE=True,
      vision_tower_lr=None,
    )
  else:
    out.update(
      mm_vision_tower_clip=EVE_V1_TEACHER,
      mm_projector_type='mlp2x_gelu',
      mm_vision_select_layer=-2,
      mm_vision_select_feature='patch',
      requires_cliploss=with_teacher,
      use_mm_proj=True,
      tune_mm_mlp_adapter=False,
      image_aspect_ratio='square',
      image_grid_pinpoints=None,
    )
  return out


@dataclasses.dataclass(frozen=True)
class CopiedTensor:
  """A tensor written unchanged (but for the dtype of floats) from another safetensors file."""

  key: str
  file: SafetensorsFile
  source_key: str

  def planned(self, dtype: str) -> PlannedTensor:
    stored = np.dtype(DTYPES[self.file.entries[self.source_key]['dtype']])
    return PlannedTensor(
      self.key, self.file.shape(self.source_key), np.dtype(dtype) if stored.kind == 'f' else stored
    )


def teacher_tensors(clip_weights: str) -> list[CopiedTensor]:
  """EVEv1's CLIP teacher from a HF CLIPVisionModel / CLIPModel safetensors file, under both
  prefixes of the official checkpoints (keymap.TEACHER_PREFIXES)."""
  file = SafetensorsFile(clip_weights)
  tower = keymap.clip_official_keys(file.entries, clip_weights)
  return [
    CopiedTensor(prefix + key, file, source)
    for prefix in keymap.TEACHER_PREFIXES
    for key, source in sorted(tower.items())
  ]


def generation_config(hf_config: Mapping[str, Any]) -> dict:
  return {
    k: hf_config[k]
    for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
    if hf_config.get(k) is not None
  }


def write_tensors(
  params: Mapping,
  specs: list[keymap.TensorSpec],
  folder: str,
  *,
  dtype: str = 'bfloat16',
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  progress: bool = True,
  copies: Sequence[CopiedTensor] = (),
) -> list[str]:
  """Streams the tensors of `specs` from `params`, then `copies`, into safetensors shards; returns
  the files."""
  is_main = jax.process_index() == 0
  plan = [PlannedTensor(s.key, s.shape, np.dtype(dtype)) for s in specs]
  copied = [c.planned(dtype) for c in copies]
  writer = ShardedSafetensorsWriter(folder, plan + copied, max_shard_bytes) if is_main else None
  total = sum(t.nbytes for t in plan + copied)
  with tqdm(
    total=total,
    desc=f'export {os.path.basename(os.path.normpath(folder))}',
    unit='B',
    unit_scale=True,
    disable=not (progress and is_main),
  ) as bar:
    for spec, planned in zip(specs, plan):
      value = host_value(keymap.get_param(params, spec))
      if tuple(value.shape) != spec.param_shape:
        raise ValueError(
          f'parameter {"/".join(map(str, spec.path))} has shape {value.shape}, the '
          f'config needs {spec.param_shape}'
        )
      if writer:
        writer.write(spec.key, keymap.to_torch_layout(spec, value))
      bar.update(planned.nbytes)
    for copy, planned in zip(copies if writer else (), copied):
      writer.write(copy.key, copy.file.read(copy.source_key).astype(planned.dtype))
      bar.update(planned.nbytes)
  if not writer:
    return []
  writer.close()
  return writer.file_names


def copy_tokenizer(tokenizer_dir: str, folder: str) -> list[str]:
  names = [n for n in TOKENIZER_FILES if storage.exists(os.path.join(tokenizer_dir, n))]
  if not names:
    raise FileNotFoundError(
      f'No tokenizer files in {tokenizer_dir}; expected some of {TOKENIZER_FILES}'
    )
  for name in names:
    storage.copy(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
  return names


def _write_json(path: str, value: Mapping):
  storage.write_atomic(path, json.dumps(value, indent=2) + '\n')


def _finish(folder: str, config: dict, source_dir: str | None, tokenizer_dir: str | None):
  """config.json, generation_config.json (the source's if it has one) and the tokenizer files."""
  _write_json(os.path.join(folder, 'config.json'), config)
  source_generation = source_dir and os.path.join(source_dir, 'generation_config.json')
  if source_generation and storage.exists(source_generation):
    storage.copy(source_generation, os.path.join(folder, 'generation_config.json'))
  else:
    _write_json(os.path.join(folder, 'generation_config.json'), generation_config(config))
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, folder)
  elif source_dir and any(storage.exists(os.path.join(source_dir, n)) for n in TOKENIZER_FILES):
    copy_tokenizer(source_dir, folder)
  else:
    logging.warning('No tokenizer files given (tokenizer_dir): %s has none', folder)


def _source_config(source_dir: str | None) -> dict | None:
  path = source_dir and os.path.join(source_dir, 'config.json')
  if not path or not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def export_eve(
  params: Mapping,
  cfg: ModelConfig,
  folder: str,
  *,
  source_dir: str | None = None,
  tokenizer_dir: str | None = None,
  dtype: str = 'bfloat16',
  vision_tower: str | None = None,
  clip_weights: str | None = None,
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  progress: bool = True,
) -> list[str]:
  """Writes the whole EVE (v1) or EVEv2 model in the official format.

  EVEv1: with `clip_weights` the export is the training checkpoint the releases are (PAL, and the
  CLIP teacher copied from that file under both official prefixes, requires_cliploss=true);
  without, an inference checkpoint (no PAL, no CLIP, requires_cliploss=false).

  Args:
    params: evejax parameters (a pure dict, or any mapping with the same keys, e.g. a LazyParams;
      numpy or jax arrays, possibly sharded over hosts).
    cfg: their model config.
    folder: output folder (created).
    source_dir: the HF folder the model was imported from; its config.json supplies fields evejax
      does not model and its generation_config.json is copied.
    tokenizer_dir: folder of the tokenizer files to copy (defaults to `source_dir`).
    dtype: stored dtype (the release uses bfloat16).
    vision_tower: `mm_vision_tower`, the processor folder the official code loads (default: the
      release's).
    clip_weights: EVEv1 only: a HF CLIP ViT-L/14-336 safetensors file (the PAL teacher).
    max_shard_bytes: largest safetensors shard.
  Returns:
    the weight files written (on process 0; [] on the others).
  """
  if clip_weights and cfg.vision_tokenizer != 'v1':
    raise ValueError('clip_weights is the EVEv1 PAL teacher; this model is EVEv2')
  specs = [s for s in keymap.tensor_specs(cfg) if clip_weights or not s.is_pal]
  copies = teacher_tensors(clip_weights) if clip_weights else ()
  config = eve_config(cfg, _source_config(source_dir), dtype, vision_tower, bool(clip_weights))
  written = write_tensors(
    params,
    specs,
    folder,
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
    progress=progress,
    copies=copies,
  )
  if jax.process_index() == 0:
    _finish(folder, config, source_dir, tokenizer_dir)
  return written


def export_hf_llm(
  params: Mapping,
  cfg: ModelConfig,
  folder: str,
  *,
  source_dir: str | None = None,
  tokenizer_dir: str | None = None,
  dtype: str = 'bfloat16',
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  progress: bool = True,
) -> list[str]:
  """Writes the text LLM alone (no vision tower, no vision copies) as a plain HF Llama/Qwen2
  checkpoint that `transformers.AutoModelForCausalLM` loads. Arguments as `export_eve`."""
  config = hf_llm_config(cfg, _source_config(source_dir), dtype)
  specs = [s for s in keymap.tensor_specs(cfg) if s.is_llm]
  files = write_tensors(
    params, specs, folder, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress
  )
  if jax.process_index() == 0:
    _finish(folder, config, source_dir, tokenizer_dir)
  return files
