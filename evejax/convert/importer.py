"""Import a HF Llama/Qwen2 LLM or an official EVE/EVEv2 checkpoint into evejax parameters.

Tensors are read and converted one at a time into a host buffer per parameter, which becomes a jax
array on the host CPU, so the host holds the model once (in the evejax parameter dtype) plus one
parameter.

What the source lacks is filled the way the reference recipes do it:
- no vision tower at all (an LLM checkpoint, stage 0): freshly initialised, as `EVE(cfg)` would;
- no vision copies (`moe_*`, an LLM or a stage-0 EVE checkpoint while `cfg` decomposes the layers):
  copied from the LLM weights of the same name (`vision_copies='copy'`, the reference's repeat_moe
  step) or freshly initialised (`vision_copies='init'`).
Anything else missing, any extra tensor and any shape mismatch is an error that lists them all.
EVEv1's CLIP teacher (keymap.TEACHER_PREFIXES) is no evejax parameter and is not read; `load_clip`
reads a HF CLIP file into the teacher that PAL runs in evejax (evejax/models/clip.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from tqdm import tqdm

from evejax import storage
from evejax.convert import keymap
from evejax.convert.files import CheckpointReader, SafetensorsFile
from evejax.models import EVE, ModelConfig
from evejax.models.clip import CLIPVision

VISION_COPY_MODES = ('copy', 'init')
LLM_MODEL_TYPES = {'qwen2': 'qwen2', 'eve-qwen2': 'qwen2', 'llama': 'llama', 'eve': 'llama'}
MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the model config."""


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not storage.exists(path):
    raise FileNotFoundError(f'No config.json in {folder}; pass a HF model folder')
  return json.loads(storage.read_text(path))


def rope_theta(hf: Mapping[str, Any]) -> float:
  """transformers 5 nests RoPE settings in `rope_parameters`; older configs keep `rope_theta`."""
  rope = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or rope
  if scaling.get('rope_type', scaling.get('type', 'default')) != 'default':
    raise ValueError(f'RoPE scaling {scaling} is not supported by evejax (plain RoPE only)')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def model_config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """The evejax ModelConfig of a HF Llama/Qwen2 or official EVE `config.json` (a dict).

  `overrides` set fields the file does not carry (dtypes, vision patch sizes) or replace its values,
  e.g. `moe_part='layernorm-self_attn-mlp'` to add vision copies to a plain LLM.
  """
  model_type = hf.get('model_type')
  if model_type not in LLM_MODEL_TYPES:
    raise ValueError(
      f'config.json model_type {model_type!r} is not supported; expected one of '
      f'{sorted(LLM_MODEL_TYPES)}'
    )
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(
      f'config.json hidden_act {hf["hidden_act"]!r}: evejax implements SwiGLU (silu)'
    )
  if hf.get('use_sliding_window'):
    raise ValueError('config.json use_sliding_window=true: evejax has no sliding-window attention')
  family = LLM_MODEL_TYPES[model_type]
  heads = hf['num_attention_heads']
  fields = dict(
    family=family,
    vocab_size=hf['vocab_size'],
    hidden_size=hf['hidden_size'],
    intermediate_size=hf['intermediate_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=heads,
    num_kv_heads=hf.get('num_key_value_heads') or heads,
    head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
    rope_theta=rope_theta(hf),
    rms_norm_eps=hf['rms_norm_eps'],
    attention_bias=family == 'qwen2' or bool(hf.get('attention_bias', False)),
    tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
    moe_part=(hf.get('moe_part') or '') if hf.get('add_moe') else '',
  )
  if 'mm_hidden_size' in hf:
    fields['vision_hidden_size'] = hf['mm_hidden_size']
  if family == 'llama' and hf.get('mlp_bias'):
    raise ValueError('config.json mlp_bias=true: evejax MLPs have no biases')
  return ModelConfig(**{**fields, **overrides})


# ModelConfig fields a HF/EVE config.json determines (the rest come from the processor or evejax).
HF_FIELDS = (
  'family',
  'vocab_size',
  'hidden_size',
  'intermediate_size',
  'num_layers',
  'num_heads',
  'num_kv_heads',
  'head_dim',
  'rope_theta',
  'rms_norm_eps',
  'attention_bias',
  'tie_word_embeddings',
)


def check_config_matches(hf: Mapping[str, Any], cfg: ModelConfig, source: str) -> None:
  """Raises if `config.json` (a dict, read from `source`) describes another LLM than `cfg`."""
  from_file = model_config_from_hf(hf)
  diffs = [
    f'{k}: {source} has {getattr(from_file, k)!r}, the config {getattr(cfg, k)!r}'
    for k in HF_FIELDS
    if getattr(from_file, k) != getattr(cfg, k)
  ]
  if diffs:
    raise ValueError('The checkpoint is not the model of the config:\n  ' + '\n  '.join(diffs))


def vision_fields(reader: CheckpointReader) -> dict[str, Any]:
  """Vision tokenizer (and EVEv1 PAL) sizes read off the weights (config.json does not store
  them)."""
  keys = set(reader.keys())
  first, second = (f'{keymap.VISION_PREFIX}patch_embedding.{i}.weight' for i in (0, 2))
  if first in keys and second in keys:
    hidden, _, patch, _ = reader.shape(first)
    return dict(
      vision_hidden_size=hidden, vision_patch_size=patch, vision_merge=reader.shape(second)[-1]
    )
  v1 = f'{keymap.VISION_PREFIX}patch_embedding.weight'
  if v1 not in keys:
    return {}
  hidden, _, patch, _ = reader.shape(v1)
  fields = dict(
    vision_tokenizer='v1',
    vision_hidden_size=hidden,
    vision_patch_size=patch,
    vision_merge=2,
    pal=False,
  )
  pal = 'model.vision_tower_compressor.'
  if f'{pal}input_layer.weight' in keys:
    taps = len({k.split('.')[3] for k in keys if k.startswith(f'{pal}norm_layer.')})
    num_layers = sum(k.endswith('.input_layernorm.weight') for k in keys)
    fields.update(
      pal=True,
      pal_teacher_size=reader.shape(f'{pal}input_layer.weight')[0],
      pal_layer_rate=num_layers // (taps - 1),
    )
  return fields


def _listing(title: str, items: list[str]) -> str:
  shown = items[:MAX_LISTED]
  more = f' ... and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED else ''
  return f'{title} ({len(items)}): {", ".join(shown)}{more}'


def _hints(cfg: ModelConfig, missing: list[str], extra: list[str]) -> list[str]:
  hints = []
  if any('.moe_' in k for k in extra):
    hints.append(
      f'the checkpoint has vision copies (moe_*) but model.moe_part={cfg.moe_part!r}; '
      "set model.moe_part to the checkpoint's (e.g. 'layernorm-self_attn-mlp')"
    )
  if 'lm_head.weight' in missing:
    hints.append(
      'the checkpoint has no lm_head.weight (tied embeddings): set model.tie_word_embeddings=True'
    )
  if any(k.startswith('model.vision_tower_compressor.') for k in missing):
    hints.append(
      'the checkpoint has no PAL (vision_tower_compressor; an inference export): set '
      'model.pal=False, or export with the CLIP teacher'
    )
  if 'lm_head.weight' in extra:
    hints.append('the checkpoint has an untied lm_head.weight: set model.tie_word_embeddings=False')
  return hints


def plan_sources(
  cfg: ModelConfig,
  specs: list[keymap.TensorSpec],
  reader: CheckpointReader,
  vision_copies: str = 'copy',
) -> dict[str, str]:
  """Per official key: 'read', 'copy' (from its LLM tensor) or 'init'. Raises
  CheckpointMismatchError listing every missing, extra and wrongly shaped tensor."""
  if vision_copies not in VISION_COPY_MODES:
    raise ValueError(f'vision_copies={vision_copies!r}; expected one of {VISION_COPY_MODES}')
  available = {
    k
    for k in reader.keys()
    if not k.endswith(keymap.IGNORED_KEY_SUFFIXES) and not k.startswith(keymap.TEACHER_PREFIXES)
  }
  has_vision_tower = any(k.startswith(keymap.VISION_PREFIX) for k in available)
  has_vision_copies = any('.moe_' in k for k in available)
  sources, missing, wrong = {}, [], []
  for spec in specs:
    if spec.key in available:
      sources[spec.key] = 'read'
      if reader.shape(spec.key) != spec.shape:
        wrong.append(f'{spec.key} {reader.shape(spec.key)} (expected {spec.shape})')
    elif spec.is_vision_tower and not has_vision_tower:
      sources[spec.key] = 'init'
    elif spec.is_vision_copy and not has_vision_copies:
      sources[spec.key] = vision_copies
    else:
      missing.append(spec.key)
  extra = sorted(available - set(sources))
  if missing or extra or wrong:
    lines = [f'Checkpoint {reader.folder} does not match the model config:']
    lines += [
      _listing(t, v)
      for t, v in (('missing', missing), ('unexpected', extra), ('wrong shape', wrong))
      if v
    ]
    lines += ['Hint: ' + h for h in _hints(cfg, missing, extra)]
    raise CheckpointMismatchError('\n  '.join(lines))
  return sources


def fresh_params(cfg: ModelConfig, paths: list[tuple[Any, ...]], seed: int) -> dict:
  """The parameters at `paths` as `EVE(cfg, rngs=nnx.Rngs(seed))` initialises them under jit (the
  way `sharding.init_sharded` does; eager sampling can differ in the last bit).

  Under jit only the requested outputs are computed (the rest of the init is dead code), so this
  costs the memory of the requested parameters only.
  """

  @jax.jit
  def init():
    params = nnx.to_pure_dict(nnx.state(EVE(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    return [_at(params, p) for p in paths]

  return dict(zip(paths, init()))


def _at(tree: Mapping, path: tuple[Any, ...]):
  for key in path:
    tree = tree[key]
  return tree


def import_checkpoint(
  folder: str,
  cfg: ModelConfig,
  *,
  vision_copies: str = 'copy',
  seed: int = 0,
  progress: bool = True,
) -> dict:
  """Reads a HF LLM or official EVE checkpoint folder into evejax parameters: a pure dict of jax
  arrays on the host CPU (never an accelerator), in `cfg.param_dtype`.

  Args:
    folder: a folder with `model.safetensors[.index.json]` or `pytorch_model[.bin.index.json]`.
    cfg: the evejax model the parameters are for (see `model_config_from_hf`).
    vision_copies: how vision copies the source lacks are made: 'copy' from the LLM weights (the
      reference's stage-0 -> stage-1 step; the copy shares the LLM array until trained) or 'init'
      (fresh random weights).
    seed: seed of the fresh initialisation (vision tower of an LLM checkpoint, 'init' copies).
    progress: show a progress bar.
  """
  reader = CheckpointReader(folder)
  abstract = keymap.abstract_params(cfg)
  specs = keymap.tensor_specs(cfg, abstract)
  sources = plan_sources(cfg, specs, reader, vision_copies)
  by_path = {}  # parameter path -> its tensors (one, or one per layer when stacked)
  for spec in specs:
    by_path.setdefault(spec.path, []).append(spec)
  source = {path: sources[group[0].key] for path, group in by_path.items()}
  cpu = jax.devices('cpu')[0]
  flat = {}
  reads = [path for path in by_path if source[path] == 'read']
  for path in tqdm(
    reads,
    desc=f'import {os.path.basename(os.path.normpath(folder))}',
    unit='param',
    disable=not progress,
  ):
    # Fill one host buffer per parameter, hand it to jax, drop it: one parameter in flight.
    buffer = np.empty(_at(abstract, path).shape, _at(abstract, path).dtype)
    for spec in by_path[path]:
      np.copyto(
        buffer if spec.layer is None else buffer[spec.layer],
        keymap.from_torch_layout(spec, reader.read(spec.key)),
        casting='unsafe',
      )
    flat[path] = jax.device_put(buffer, cpu)
    del buffer
  for path in by_path:
    if source[path] == 'copy':
      flat[path] = flat[keymap.llm_path(path)]
  init_paths = sorted((p for p in by_path if source[p] == 'init'), key=str)
  for path, value in fresh_params(cfg, init_paths, seed).items():
    flat[path] = jax.device_put(value, cpu)
  return traverse_util.unflatten_dict(flat)


def with_vision_copies(params: Mapping, cfg: ModelConfig) -> dict:
  """Parameters without vision copies (a stage-0 model) -> the parameters of `cfg`, whose layers are
  decomposed, with every vision copy (`moe_*`) initialised from its LLM weight: the reference's
  `repeat_moe` step, in memory. Works on numpy and jax arrays; other arrays are shared, not
  copied."""

  def fill(key_path, target):
    path = tuple(k.key for k in key_path)
    llm_path = keymap.llm_path(path)
    try:
      value = _at(params, path) if llm_path == path else _at(params, llm_path).copy()
    except KeyError as e:
      raise ValueError(
        f'parameter {"/".join(map(str, llm_path))} is missing; the parameters '
        'are not those of an EVE model with these dimensions'
      ) from e
    if tuple(value.shape) != target.shape:
      raise ValueError(
        f'parameter {"/".join(map(str, path))} has shape {tuple(value.shape)}, '
        f'the config needs {target.shape}'
      )
    return value

  return jax.tree_util.tree_map_with_path(fill, keymap.abstract_params(cfg))


def load_clip(model: CLIPVision, path: str) -> None:
  """Copies a local HF `CLIPVisionModel` / `CLIPModel` safetensors file into `model` (text-tower
  tensors are ignored). A missing tensor or a shape mismatch raises, naming the key and `path`."""
  file = SafetensorsFile(path)
  file_keys = keymap.clip_official_keys(file.entries, path)
  state = nnx.state(model, nnx.Param)
  flat = {}
  for spec in keymap.clip_tensor_specs(model.cfg, nnx.to_pure_dict(state)):
    if spec.key not in file_keys:
      raise ValueError(
        f'{path}: missing {spec.key!r}; is this a CLIP ViT with '
        f'{model.cfg.num_layers} layers (pal.clip config)?'
      )
    stored = file.shape(file_keys[spec.key])
    if stored != spec.shape:
      raise ValueError(
        f'{path}: {spec.key!r} has shape {stored}, the pal.clip config expects '
        f'{spec.shape}; fix pal.clip to match the file'
      )
    value = keymap.from_torch_layout(spec, file.read(file_keys[spec.key]))
    flat[spec.path] = jnp.asarray(value, spec.dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
