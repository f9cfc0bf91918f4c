"""Typed model configuration, built from the `model` section of an ml_collections config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from evejax.config_utils import from_mapping
from evejax.models import attention

DECOMPOSABLE_PARTS = ('layernorm', 'self_attn', 'mlp')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Dimensions of an EVE model. Names follow the HF configs of the base LLMs."""

  family: str = 'qwen2'  # 'qwen2' (EVEv2) or 'llama' (EVEv1).
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  head_dim: int = 128
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  attention_bias: bool = True  # q/k/v biases (Qwen2); o_proj never has one.
  tie_word_embeddings: bool = False
  # EVEv2 modality decomposition, the reference's `moe_part`: '-'-joined subset of
  # DECOMPOSABLE_PARTS; '' keeps one dense decoder for all tokens (`add_moe=False`).
  moe_part: str = 'layernorm-self_attn-mlp'
  routing: str = 'select'  # How decomposed ops pick their branch; see routing.py.
  # How attention scores are computed (evejax/models/attention.py): 'auto' (cudnn on GPU, pallas on
  # TPU, xla elsewhere), 'xla' (materialises T x T), 'cudnn' or 'pallas' (fused, flash).
  attention: str = 'auto'
  # cudnn takes packed rows as runs of equal segment ids: at most this many a row (examples plus
  # the padding); the trainer checks data.pack_window against it.
  max_segments: int = 64
  # Decoder execution (evejax/models/stack.py): scan over stacked layers (parameters get a leading
  # `layers` axis instead of `layers.N`), and the rematerialisation policy of each layer.
  scan_layers: bool = False
  remat: str = 'none'  # 'none', 'full', 'minimal' or 'save_dots'
  # Vision tokenizer (EVEv2 PEL): conv patch_size/patch_size -> GELU -> conv merge/merge.
  vision_patch_size: int = 16
  vision_merge: int = 2
  vision_hidden_size: int = 1024
  # 'v2': the EVEv2 PEL above; 'v1': the EVEv1 PEL (evejax/models/vision_v1.py): conv
  # patch_size/patch_size without bias -> local attention over merge x merge windows -> global
  # attention for the class token -> mlp2x_gelu projector. Its patches carry a 4th (valid-pixel)
  # channel.
  vision_tokenizer: str = 'v2'
  vision_heads: int = 8  # v1 local/global attention heads over vision_hidden_size
  # EVEv1 patch-aligning layer (evejax/models/pal.py): taps every pal_layer_rate-th hidden state
  # and regresses teacher patch features of width pal_teacher_size. Off = no parameters, no cost.
  pal: bool = False
  pal_layer_rate: int = 4
  pal_teacher_size: int = 1024
  pal_heads: int = 8
  # HD (EVE-7B-HD, 1344 px): the visual-token grid is twice the teacher's (CLIP 336 px), so PAL
  # averages the hidden states of every pal_pool x pal_pool block of tokens first.
  pal_pool: int = 1
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.family not in ('qwen2', 'llama'):
      raise ValueError(f"model.family must be 'qwen2' or 'llama', got {self.family!r}")
    unknown = set(self.decomposed_parts) - set(DECOMPOSABLE_PARTS)
    if unknown:
      raise ValueError(
        f'model.moe_part={self.moe_part!r} names unknown parts {sorted(unknown)}; '
        f'use a "-"-joined subset of {DECOMPOSABLE_PARTS} or "" for none'
      )
    if self.remat not in ('none', 'full', 'minimal', 'save_dots'):
      raise ValueError(f"model.remat={self.remat!r}; use 'none', 'full', 'minimal' or 'save_dots'")
    if self.routing not in ('select', 'sorted'):
      raise ValueError(
        f"model.routing={self.routing!r}; use 'select' (reference: both branches on "
        "every token) or 'sorted' (FLOP-exact)"
      )
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ValueError(
        f'model.attention={self.attention!r}; use one of {attention.IMPLEMENTATIONS}'
      )
    if self.vision_tokenizer not in ('v1', 'v2'):
      raise ValueError(f"model.vision_tokenizer={self.vision_tokenizer!r}; use 'v2' or 'v1'")
    if self.vision_tokenizer == 'v1' and self.vision_hidden_size % self.vision_heads:
      raise ValueError(
        f'model.vision_hidden_size={self.vision_hidden_size} is not a multiple of '
        f'model.vision_heads={self.vision_heads}'
      )
    if self.pal and self.pal_teacher_size % self.pal_heads:
      raise ValueError(
        f'model.pal_teacher_size={self.pal_teacher_size} is not a multiple of '
        f'model.pal_heads={self.pal_heads}'
      )
    if self.pal_pool < 1:
      raise ValueError(f'model.pal_pool={self.pal_pool} must be >= 1 (1: no pooling, 2: HD)')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'model.num_heads={self.num_heads} is not a multiple of '
        f'model.num_kv_heads={self.num_kv_heads}'
      )

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> ModelConfig:
    return from_mapping(cls, cfg, 'model')

  @property
  def decomposed_parts(self) -> tuple[str, ...]:
    return tuple(p for p in self.moe_part.split('-') if p)

  def decomposes(self, part: str) -> bool:
    return part in self.decomposed_parts

  @property
  def vision_channels(self) -> int:
    """Channels per pixel in `patches`: RGB, plus the valid-pixel channel for v1."""
    return 4 if self.vision_tokenizer == 'v1' else 3

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)
