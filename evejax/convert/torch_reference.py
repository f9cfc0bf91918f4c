"""A PyTorch forward of EVEv2 (and plain Llama/Qwen2) over official state-dict tensors.

The parity tool's other side for checkpoints that `transformers` cannot load (EVE's model types).
It follows the reference code path, not evejax's: convolutions on the pixel tensor, the dense blend
`f_text(x) * (1 - m) + f_vision(x) * m` for every decomposed op, one causal SDPA over all tokens.
Needs torch (the `test` extra).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from evejax import batch as bf
from evejax.convert import importer
from evejax.convert.files import CheckpointReader
from evejax.models import ModelConfig
from evejax.models.vision import CLIP_MEAN, CLIP_STD


def to_torch(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
  if value.dtype.name == 'bfloat16':  # numpy has no bfloat16: reinterpret the bits
    return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16).to(dtype)
  return torch.from_numpy(np.ascontiguousarray(value)).to(dtype)


class TorchEVE:
  """Forward of one sequence (batch of 1) with images spliced at IMAGE_TOKEN_INDEX placeholders."""

  def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]):
    self.cfg, self.t = cfg, tensors

  @classmethod
  def from_folder(cls, folder: str, dtype: torch.dtype = torch.float32) -> TorchEVE:
    reader = CheckpointReader(folder)
    cfg = importer.model_config_from_hf(importer.read_hf_config(folder))
    return cls(cfg, {k: to_torch(reader.read(k), dtype) for k in reader.keys()})

  def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.t[name + '.weight'], self.t.get(name + '.bias'))

  def _rms(self, name: str, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
    return self.t[name + '.weight'] * xf.to(x.dtype)

  def _routed(self, op, prefix: str, name: str, x: torch.Tensor, m: torch.Tensor | None):
    """op(prefix + name) for text tokens, op(prefix + 'moe_' + name) for visual ones (blend)."""
    text = op(prefix + name, x)
    vision_name = prefix + 'moe_' + name
    if m is None or not any(k.startswith(vision_name + '.') for k in self.t):
      return text
    return text * (1 - m) + op(vision_name, x) * m

  def _mlp(self, name: str, x: torch.Tensor) -> torch.Tensor:
    gate, up = self._linear(name + '.gate_proj', x), self._linear(name + '.up_proj', x)
    return self._linear(name + '.down_proj', F.silu(gate) * up)

  def _rope(self, x: torch.Tensor) -> torch.Tensor:  # (heads, L, head_dim)
    hd, length = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(length).float()[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * angles.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * angles.sin().to(x.dtype)

  def _attention(self, pre: str, h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    cfg, length = self.cfg, h.shape[0]
    proj = lambda name, heads: (
      self._routed(self._linear, pre, name, h, m).view(length, heads, cfg.head_dim).transpose(0, 1)
    )
    q = self._rope(proj('q_proj', cfg.num_heads))
    k = self._rope(proj('k_proj', cfg.num_kv_heads))
    v = proj('v_proj', cfg.num_kv_heads)
    group = cfg.num_heads // cfg.num_kv_heads
    out = F.scaled_dot_product_attention(
      q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), is_causal=True
    )
    return self._routed(self._linear, pre, 'o_proj', out.transpose(0, 1).reshape(length, -1), m)

  def vision_tokens(self, pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1 + h * (w + 1), D): conv -> GELU -> conv, SPLIT column, CLASS first."""
    t, pre = self.t, 'model.vision_tower.'
    dtype = t[pre + 'class_embedding'].dtype
    x = torch.from_numpy(np.asarray(pixels, np.float32) / 255.0)
    x = ((x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(2, 0, 1)[None].to(dtype)
    for i in (0, 2):  # kernel == stride: read both from the weights
      weight = t[f'{pre}patch_embedding.{i}.weight']
      x = F.conv2d(x, weight, t[f'{pre}patch_embedding.{i}.bias'], stride=weight.shape[-1])
      x = F.gelu(x) if i == 0 else x[0]
    split = t[pre + 'split_embedding'][:, None, None].expand(-1, x.shape[1], 1)
    x = torch.cat([x, split], -1).flatten(1).transpose(0, 1)
    return torch.cat([t[pre + 'class_embedding'][None], x])

  def logits(self, ids: list[int], images: list[np.ndarray] = ()) -> torch.Tensor:
    """(L, vocab) logits; L counts every visual token of every image."""
    pieces, vision, text, images = [], [], [], list(images)
    if sum(i == bf.IMAGE_TOKEN_INDEX for i in ids) != len(images):
      raise ValueError('ids need exactly one IMAGE_TOKEN_INDEX per image')

    def flush():
      if text:
        pieces.append(self.t['model.embed_tokens.weight'][torch.tensor(text)])
        vision.append(torch.zeros(len(text)))
        text.clear()

    for token in ids:
      if token != bf.IMAGE_TOKEN_INDEX:
        text.append(token)
        continue
      flush()
      pieces.append(self.vision_tokens(images.pop(0)))
      vision.append(torch.ones(len(pieces[-1])))
    flush()
    x = torch.cat(pieces)
    m = torch.cat(vision)[:, None].to(x.dtype)
    m = m if m.any() else None
    for n in range(self.cfg.num_layers):
      pre = f'model.layers.{n}.'
      h = self._routed(self._rms, pre, 'input_layernorm', x, m)
      x = x + self._attention(pre + 'self_attn.', h, m)
      h = self._routed(self._rms, pre, 'post_attention_layernorm', x, m)
      x = x + self._routed(self._mlp, pre, 'mlp', h, m)
    head = self.t.get('lm_head.weight', self.t['model.embed_tokens.weight'])
    return F.linear(self._rms('model.norm', x), head)
