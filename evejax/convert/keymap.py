"""The one mapping between evejax parameter paths and the official PyTorch state-dict keys.

evejax module attributes mirror the reference names (`layers.N.self_attn.moe_q_proj`, `moe_mlp`,
`vision_tower`, ...), so a key is the parameter path with a few renames. Everything that reads or
writes official files goes through `tensor_specs` and the two layout functions below; a stacked
(scanned) layer layout only changes how `tensor_specs` enumerates layers.

EVEv1 (EVE_REFERENCE.md §4.1): the reference's `Sequential(LayerNorm, Linear)` blocks (`q`, `kv`
of the PEL attentions, the PAL's `norm_layer.N`) are `norm`/`proj` here and `.0`/`.1` there; the
projector `vision_tower/mm_projector/fc1|fc2` is `model.mm_projector.0|2`; the PAL `pal` is
`model.vision_tower_compressor`. Its CLIP teacher is no evejax parameter: the exporter copies it
from a CLIP file (`TEACHER_PREFIXES`) and the importer leaves it out.

The CLIP ViT (evejax/models/clip.py; the PAL teacher when it runs in evejax) has the HF
`CLIPVisionModel` layout: `clip_tensor_specs` names its tensors as the official checkpoints store
them below `TEACHER_PREFIXES` (`vision_model.` + the HF attribute path), and `clip_official_keys`
finds those tensors in any HF CLIP file. The importer's `load_clip` and the exporter's teacher copy
both go through them.

Layouts: a Flax Linear kernel is (in, out), PyTorch's weight (out, in). The vision convolutions have
kernel == stride, so evejax holds them as Linear kernels over the patch flattened in
(ky, kx, in_channel) order; PyTorch holds Conv2d weights (out, in, kh, kw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from evejax.models import EVE, ModelConfig
from evejax.models.clip import CLIPVision, CLIPVisionConfig

# evejax module name -> reference module name.
MODULE_RENAMES = {
  'patch_conv': 'patch_embedding.0',
  'merge_conv': 'patch_embedding.2',
  'pal': 'vision_tower_compressor',
  'fc1': '0',
  'fc2': '2',
}
NORM_LINEAR_RENAMES = {'norm': '0', 'proj': '1'}  # inside the EVEv1 LayerNorm -> Linear blocks
NORM_LINEAR_PARENTS = ('q', 'kv')  # ... and every `pal/norm_layer/N`
CONV_MODULES = frozenset({'patch_conv', 'merge_conv', 'patch_embedding'})
# The modules the map knows; anything else has no official name.
KNOWN_MODULES = ('embed_tokens', 'layers', 'norm', 'lm_head', 'vision_tower', 'pal')
KNOWN_VISION_PARAMS = (
  'patch_conv',
  'merge_conv',
  'class_embedding',
  'split_embedding',
  'patch_embedding',
  'local_attention',
  'global_attention',
  'mm_projector',
)
# Reference buffers that are recomputed at load time and may appear in old checkpoints.
IGNORED_KEY_SUFFIXES = ('rotary_emb.inv_freq',)
VISION_PREFIX = 'model.vision_tower.'
# What a stage-0 import of a plain LLM initialises: the vision tower, the EVEv1 projector and PAL.
VISION_SIDE_PREFIXES = (VISION_PREFIX, 'model.mm_projector.', 'model.vision_tower_compressor.')
# EVEv1's frozen CLIP teacher, stored twice (one shared module) in the official checkpoints.
TEACHER_PREFIXES = (
  'model.vision_clip.backbone.',
  'model.vision_tower_compressor.clip_layer.backbone.',
)
# The CLIP vision tower inside a CLIPModel, and inside the official checkpoints' teacher.
CLIP_TOWER = 'vision_model.'
CLIP_EMBEDDINGS = ('class_embedding', 'patch_embedding', 'position_embedding')


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One official tensor and where it lives in the evejax parameter tree."""

  path: tuple[Any, ...]  # keys into the evejax pure-dict parameters
  layer: int | None  # index into the leading axis of a stacked (scanned) parameter, else None
  key: str  # official state-dict key
  kind: str  # 'linear', 'conv' or 'same': how the layouts differ
  shape: tuple[int, ...]  # official (PyTorch) shape
  param_shape: tuple[int, ...]  # evejax shape (of one layer's slice for stacked parameters)
  dtype: np.dtype  # evejax parameter dtype

  @property
  def is_vision_tower(self) -> bool:
    """The vision side (PEL; EVEv1 also its projector and PAL), absent from a plain LLM."""
    return self.key.startswith(VISION_SIDE_PREFIXES)

  @property
  def is_pal(self) -> bool:
    return self.key.startswith('model.vision_tower_compressor.')

  @property
  def is_vision_copy(self) -> bool:
    """A modality copy of an LLM weight (the reference's `moe_*` tensors)."""
    return '.moe_' in self.key

  @property
  def is_llm(self) -> bool:
    """Part of the plain text LLM (what a HF Llama/Qwen2 checkpoint holds)."""
    return not (self.is_vision_tower or self.is_vision_copy)


def _abstract(build: Callable[[nnx.Rngs], nnx.Module]) -> dict:
  """The parameter tree of the module `build` makes, as ShapeDtypeStructs (nothing is allocated)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param))


def abstract_params(cfg: ModelConfig) -> dict:
  """The evejax parameter tree of `cfg` as ShapeDtypeStructs (nothing is allocated)."""
  return _abstract(lambda rngs: EVE(cfg, rngs=rngs))


def llm_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """The LLM parameter a vision copy (`moe_*`) duplicates; other paths map to themselves."""
  return tuple(k[len('moe_') :] if isinstance(k, str) and k.startswith('moe_') else k for k in path)


def _is_stacked(path: tuple[Any, ...]) -> bool:
  """Scanned layers keep one array per weight with a leading layer axis: layers.<name>..."""
  return len(path) > 1 and path[0] == 'layers' and not isinstance(path[1], int)


def _official_key(path: tuple[Any, ...], layer: int | None) -> tuple[str, str]:
  if path[0] not in KNOWN_MODULES or (
    path[0] == 'vision_tower' and path[1] not in KNOWN_VISION_PARAMS
  ):
    raise NotImplementedError(
      f'No official checkpoint name is known for parameter {"/".join(map(str, path))}: the '
      'converter maps EVEv1, EVEv2 and plain Llama/Qwen2 parameters'
    )
  *modules, leaf = [str(p) for p in path]
  if layer is not None:
    modules.insert(1, str(layer))
  kind = 'same'
  if leaf == 'kernel':
    kind = 'conv' if modules[-1] in CONV_MODULES else 'linear'
  modules = [_rename(modules, i) for i in range(len(modules))]
  if modules[:2] == ['vision_tower', 'mm_projector']:  # EVEv1: the projector sits beside the PEL
    modules = modules[1:]
  if leaf in ('class_embedding', 'split_embedding'):
    name = '.'.join(modules + [leaf])  # bare nn.Parameter in the reference
  else:
    name = '.'.join(modules + ['bias' if leaf == 'bias' else 'weight'])
  return ('' if modules[0] == 'lm_head' else 'model.') + name, kind


def _rename(modules: list[str], i: int) -> str:
  name, parent = modules[i], modules[i - 1] if i else ''
  in_norm_linear = parent in NORM_LINEAR_PARENTS or (i >= 2 and modules[i - 2] == 'norm_layer')
  if in_norm_linear and name in NORM_LINEAR_RENAMES:
    return NORM_LINEAR_RENAMES[name]
  return MODULE_RENAMES.get(name, name)


def _clip_key(path: tuple[Any, ...]) -> tuple[str, str]:
  """A CLIPVision parameter path -> (HF key below `CLIP_TOWER`, layout kind)."""
  *modules, leaf = [str(p) for p in path]
  if leaf == 'class_embedding':  # a bare nn.Parameter in HF
    return f'{CLIP_TOWER}embeddings.class_embedding', 'same'
  if leaf == 'position_embedding':  # an nn.Embedding in HF: the table is its `weight`
    modules, leaf = [leaf], 'weight'
  if modules[0] in CLIP_EMBEDDINGS:
    modules.insert(0, 'embeddings')
  elif modules[0] == 'layers':
    modules.insert(0, 'encoder')
  kind = 'same'
  if leaf == 'kernel':
    kind = 'conv' if modules[-1] == 'patch_embedding' else 'linear'
  return CLIP_TOWER + '.'.join(modules + ['bias' if leaf == 'bias' else 'weight']), kind


def _torch_shape(kind: str, shape: tuple[int, ...], conv_side: int) -> tuple[int, ...]:
  if kind == 'linear':
    return shape[::-1]
  if kind == 'conv':
    return (shape[1], shape[0] // (conv_side * conv_side), conv_side, conv_side)
  return shape


def _specs(
  params: Mapping,
  official_key: Callable[[tuple[Any, ...], int | None], tuple[str, str]],
  conv_side: Callable[[str], int],
) -> list[TensorSpec]:
  """The TensorSpecs of a parameter tree: `official_key(path, layer)` names each tensor and its
  layout kind, `conv_side(key)` is the kernel side of a conv tensor."""
  specs = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(k.key for k in key_path)
    layers = range(leaf.shape[0]) if _is_stacked(path) else [None]
    for layer in layers:
      shape = tuple(leaf.shape[1:] if layer is not None else leaf.shape)
      key, kind = official_key(path, layer)
      specs.append(
        TensorSpec(
          path,
          layer,
          key,
          kind,
          _torch_shape(kind, shape, conv_side(key)),
          shape,
          np.dtype(leaf.dtype),
        )
      )
  return specs


def tensor_specs(cfg: ModelConfig, params: Mapping | None = None) -> list[TensorSpec]:
  """Every official tensor of `cfg`'s model, in the order of the evejax parameter tree.

  `params` (arrays or ShapeDtypeStructs) defaults to the tree `EVE(cfg)` builds.
  """
  params = abstract_params(cfg) if params is None else params

  def conv_side(key: str) -> int:
    return cfg.vision_merge if key.endswith('patch_embedding.2.weight') else cfg.vision_patch_size

  return _specs(params, _official_key, conv_side)


def clip_tensor_specs(cfg: CLIPVisionConfig, params: Mapping | None = None) -> list[TensorSpec]:
  """Every tensor of the HF CLIP vision tower of `cfg`, keyed as the official EVEv1 checkpoints
  store it below `TEACHER_PREFIXES` (`CLIP_TOWER` + the HF `CLIPVisionModel` key).

  `params` (arrays or ShapeDtypeStructs) defaults to the tree `CLIPVision(cfg)` builds; its layers
  are never stacked, so every spec's `layer` is None.
  """
  params = _abstract(lambda rngs: CLIPVision(cfg, rngs=rngs)) if params is None else params
  return _specs(params, lambda path, _: _clip_key(path), lambda _: cfg.patch_size)


def clip_official_keys(file_keys: Iterable[str], source: str) -> dict[str, str]:
  """The CLIP vision tower in a HF CLIP file: official key (as `clip_tensor_specs` names it) ->
  the file's key. CLIPModel files (and older CLIPVisionModel ones) prefix the tower with
  `CLIP_TOWER`, transformers 5 saves a CLIPVisionModel without it; text-tower tensors are left out.
  Raises when `source` (the file, for the message) holds no vision tower."""
  file_keys = list(file_keys)
  tower = {k: k for k in file_keys if k.startswith(CLIP_TOWER)}
  if not tower and any(k.startswith('encoder.layers.') for k in file_keys):
    tower = {CLIP_TOWER + k: k for k in file_keys}
  if not tower:
    raise ValueError(
      f'{source} holds no CLIP vision tower: expected the safetensors file of a HF '
      'CLIPVisionModel or CLIPModel'
    )
  return tower


def to_torch_layout(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
  """An evejax parameter (slice) -> the official layout (a view where possible)."""
  if spec.kind == 'linear':
    return value.T
  if spec.kind == 'conv':
    out, cin, kh, kw = spec.shape
    return value.reshape(kh, kw, cin, out).transpose(3, 2, 0, 1)
  return value


def from_torch_layout(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
  """An official tensor -> the evejax layout (a view where possible)."""
  if spec.kind == 'linear':
    return value.T
  if spec.kind == 'conv':
    return value.transpose(2, 3, 1, 0).reshape(spec.param_shape)
  return value


def get_param(params: Mapping, spec: TensorSpec):
  """The array (or layer slice of a stacked array) that `spec` names."""
  value = params
  for key in spec.path:
    value = value[key]
  return value if spec.layer is None else value[spec.layer]
