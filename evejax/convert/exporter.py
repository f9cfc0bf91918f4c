"""Export evejax parameters to the official EVEv2 format or to a plain HF Llama/Qwen2 LLM.

A folder the official code (and `transformers`, for the LLM) loads: safetensors shards + index,
`config.json`, `generation_config.json` and the tokenizer files. Parameters may be numpy arrays or
(sharded, multi-host) jax arrays: each tensor is gathered to the host on its own (on every process,
as the collective requires), converted to the PyTorch layout and streamed into its shard by
process 0.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from evejax.convert import keymap
from evejax.convert.files import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedSafetensorsWriter
from evejax.models import ModelConfig

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'vocab.json', 'merges.txt', 'tokenizer.model',
                   'chat_template.jinja')
HF_CLASSES = {'qwen2': ('Qwen2ForCausalLM', 'qwen2'), 'llama': ('LlamaForCausalLM', 'llama')}
EVE_CLASSES = {'qwen2': ('EVEQwen2ForCausalLM', 'eve-qwen2')}
DEFAULT_MAX_POSITIONS = {'qwen2': 32768, 'llama': 4096}
# The EVEv2 release's processor folder (relative to the working directory of the official code).
EVE_V2_PROCESSOR = 'openai/eve-anyratio-res1600-patch16'
# config.json fields the official EVE code adds to the LLM config (dropped for a plain LLM export).
EVE_FIELDS = ('mm_vision_tower', 'mm_hidden_size', 'add_moe', 'moe_part', 'tune_LLM', 'tune_VE',
              'tune_MOE', 'vision_tower_lr', 'mm_use_im_start_end', 'mm_use_im_patch_token',
              'mm_projector_lr', 'tokenizer_model_max_length', 'mm_vision_tower_clip',
              'mm_projector_type', 'mm_vision_select_layer', 'mm_vision_select_feature',
              'requires_cliploss', 'use_mm_proj', 'tune_mm_mlp_adapter', 'image_aspect_ratio',
              'image_grid_pinpoints')
# Fields of the source config that describe its files or class, never the exported model.
STALE_FIELDS = ('_name_or_path', 'transformers_version', 'architectures', 'model_type',
                'torch_dtype', 'dtype', 'rope_scaling')


def host_value(x) -> np.ndarray:
  """One parameter on the host; a multi-host array is gathered (all processes must call this)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def hf_llm_config(cfg: ModelConfig, base: Mapping[str, Any] | None = None,
                  dtype: str = 'bfloat16') -> dict:
  """config.json of the plain HF LLM; `base` (the source LLM's config) supplies the fields evejax
  does not model (max_position_embeddings, special token ids, ...)."""
  if cfg.family == 'qwen2' and not cfg.attention_bias:
    raise ValueError('HF Qwen2 always has q/k/v biases; this model has attention_bias=False')
  if cfg.family == 'llama' and cfg.attention_bias:
    raise ValueError('HF Llama attention_bias also adds an o_proj bias, which evejax does not have')
  architecture, model_type = HF_CLASSES[cfg.family]
  out = {k: v for k, v in (base or {}).items() if k not in EVE_FIELDS + STALE_FIELDS}
  out.update(
      architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act='silu',
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=dtype)
  out.setdefault('max_position_embeddings', DEFAULT_MAX_POSITIONS[cfg.family])
  if cfg.family == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  return out


def eve_config(cfg: ModelConfig, base: Mapping[str, Any] | None = None, dtype: str = 'bfloat16',
               vision_tower: str = EVE_V2_PROCESSOR) -> dict:
  """config.json of the official EVEv2 model (EVE_REFERENCE.md §4.3)."""
  if cfg.family not in EVE_CLASSES:
    raise NotImplementedError(f'Export to the official format is implemented for EVEv2 (qwen2); '
                              f'family {cfg.family!r} (EVEv1) needs its vision modules mapped '
                              'first')
  if (cfg.vision_patch_size, cfg.vision_merge) != (16, 2):
    logging.warning('Vision patch %d / merge %d differ from the official processor folders (16/2): '
                    'point mm_vision_tower at a processor with matching patch_stride/dense_stride',
                    cfg.vision_patch_size, cfg.vision_merge)
  out = hf_llm_config(cfg, base, dtype)
  out['architectures'], out['model_type'] = [EVE_CLASSES[cfg.family][0]], EVE_CLASSES[cfg.family][1]
  out.update(mm_vision_tower=vision_tower, mm_hidden_size=cfg.vision_hidden_size,
             add_moe=bool(cfg.decomposed_parts), moe_part=cfg.moe_part or None,
             tune_LLM=True, tune_VE=True, tune_MOE=True, vision_tower_lr=None,
             mm_use_im_start_end=False, mm_use_im_patch_token=False)
  return out


def generation_config(hf_config: Mapping[str, Any]) -> dict:
  return {k: hf_config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
          if hf_config.get(k) is not None}


def write_tensors(params: Mapping, specs: list[keymap.TensorSpec], folder: str, *,
                  dtype: str = 'bfloat16', max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: bool = True) -> list[str]:
  """Streams the tensors of `specs` from `params` into safetensors shards; returns the files."""
  is_main = jax.process_index() == 0
  plan = [PlannedTensor(s.key, s.shape, np.dtype(dtype)) for s in specs]
  writer = ShardedSafetensorsWriter(folder, plan, max_shard_bytes) if is_main else None
  total = sum(t.nbytes for t in plan)
  with tqdm(total=total, desc=f'export {os.path.basename(os.path.normpath(folder))}', unit='B',
            unit_scale=True, disable=not (progress and is_main)) as bar:
    for spec, planned in zip(specs, plan):
      value = host_value(keymap.get_param(params, spec))
      if tuple(value.shape) != spec.param_shape:
        raise ValueError(f'parameter {"/".join(map(str, spec.path))} has shape {value.shape}, the '
                         f'config needs {spec.param_shape}')
      if writer:
        writer.write(spec.key, keymap.to_torch_layout(spec, value))
      bar.update(planned.nbytes)
  if not writer:
    return []
  writer.close()
  return writer.file_names


def copy_tokenizer(tokenizer_dir: str, folder: str) -> list[str]:
  names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
  if not names:
    raise FileNotFoundError(f'No tokenizer files in {tokenizer_dir}; expected some of '
                            f'{TOKENIZER_FILES}')
  for name in names:
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
  return names


def _write_json(path: str, value: Mapping):
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def _finish(folder: str, config: dict, source_dir: str | None, tokenizer_dir: str | None):
  """config.json, generation_config.json (the source's if it has one) and the tokenizer files."""
  _write_json(os.path.join(folder, 'config.json'), config)
  source_generation = source_dir and os.path.join(source_dir, 'generation_config.json')
  if source_generation and os.path.exists(source_generation):
    shutil.copyfile(source_generation, os.path.join(folder, 'generation_config.json'))
  else:
    _write_json(os.path.join(folder, 'generation_config.json'), generation_config(config))
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, folder)
  elif source_dir and any(os.path.exists(os.path.join(source_dir, n)) for n in TOKENIZER_FILES):
    copy_tokenizer(source_dir, folder)
  else:
    logging.warning('No tokenizer files given (tokenizer_dir): %s has none', folder)


def _source_config(source_dir: str | None) -> dict | None:
  path = source_dir and os.path.join(source_dir, 'config.json')
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def export_eve(params: Mapping, cfg: ModelConfig, folder: str, *, source_dir: str | None = None,
               tokenizer_dir: str | None = None, dtype: str = 'bfloat16',
               vision_tower: str = EVE_V2_PROCESSOR, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               progress: bool = True) -> list[str]:
  """Writes the whole EVEv2 model in the official format.

  Args:
    params: evejax parameters (a pure dict, or any mapping with the same keys, e.g. a LazyParams;
      numpy or jax arrays, possibly sharded over hosts).
    cfg: their model config.
    folder: output folder (created).
    source_dir: the HF folder the model was imported from; its config.json supplies fields evejax
      does not model and its generation_config.json is copied.
    tokenizer_dir: folder of the tokenizer files to copy (defaults to `source_dir`).
    dtype: stored dtype (the release uses bfloat16).
    vision_tower: `mm_vision_tower`, the processor folder the official code loads.
    max_shard_bytes: largest safetensors shard.
  Returns:
    the weight files written (on process 0; [] on the others).
  """
  config = eve_config(cfg, _source_config(source_dir), dtype, vision_tower)
  files = write_tensors(params, keymap.tensor_specs(cfg), folder, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, progress=progress)
  if jax.process_index() == 0:
    _finish(folder, config, source_dir, tokenizer_dir)
  return files


def export_hf_llm(params: Mapping, cfg: ModelConfig, folder: str, *, source_dir: str | None = None,
                  tokenizer_dir: str | None = None, dtype: str = 'bfloat16',
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> list[str]:
  """Writes the text LLM alone (no vision tower, no vision copies) as a plain HF Llama/Qwen2
  checkpoint that `transformers.AutoModelForCausalLM` loads. Arguments as `export_eve`."""
  config = hf_llm_config(cfg, _source_config(source_dir), dtype)
  specs = [s for s in keymap.tensor_specs(cfg) if s.is_llm]
  files = write_tensors(params, specs, folder, dtype=dtype, max_shard_bytes=max_shard_bytes,
                        progress=progress)
  if jax.process_index() == 0:
    _finish(folder, config, source_dir, tokenizer_dir)
  return files
