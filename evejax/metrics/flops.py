"""Analytic FLOPs of an EVE train step and model FLOPs utilisation (MFU).

Counts the matmuls, which are all but a few percent of the work: the vision tokenizer (two linear
maps per patch group), the decoder projections and MLPs, attention scores and values, and the LM
head. Decomposed (EVEv2) ops count twice under `routing='select'`, which evaluates both the text
and the vision branch on every token, and once under `routing='sorted'` (one branch per token).
Attention counts the full L x L matrix, as the dense kernel computes it (causal masking saves
nothing there). Backward = 2x forward, except that no gradient flows into the pixels, so the first
vision matmul's input gradient is not computed.
"""

from __future__ import annotations

import jax

from evejax.batch import BatchSpec
from evejax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched as a substring of `jax.Device.device_kind`
# (first match wins, so longer names come first).
PEAK_FLOPS = (
  ('TPU v6 lite', 918e12),  # Trillium (v6e)
  ('TPU v5 lite', 197e12),  # v5e
  ('TPU v5p', 459e12),
  ('TPU v5', 459e12),
  ('TPU v4', 275e12),
  ('TPU v3', 123e12),
  ('H200', 989e12),
  ('H100', 989e12),  # SXM; PCIe parts peak at 756e12: set metrics.peak_flops for those.
  ('GH200', 989e12),
  ('B200', 2250e12),
  ('A100', 312e12),
  ('L4', 121e12),
)


def _branches(cfg: ModelConfig, part: str) -> int:
  return 2 if cfg.decomposes(part) and cfg.routing == 'select' else 1


def forward_flops(cfg: ModelConfig, spec: BatchSpec, batch_size: int) -> dict:
  """Forward FLOPs of `batch_size` rows of `spec` (L positions, P patch-group slots), by part."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  seq_len = spec.seq_len
  tokens = batch_size * seq_len
  group = spec.merge**2
  # The RGB channels enter the patch matmul; EVEv1's valid-pixel channel does not.
  patch_in, vision_hidden = spec.patch_size**2 * 3, cfg.vision_hidden_size
  patch_groups = batch_size * spec.patch_slots
  projections = 2 * d * (2 * n * h + 2 * k * h)  # q, o and k, v
  mlp = 2 * 3 * d * cfg.intermediate_size
  per_token_layer = projections * _branches(cfg, 'self_attn') + mlp * _branches(cfg, 'mlp')
  return {
    'vision_patch': patch_groups * group * 2 * patch_in * vision_hidden,
    'vision_merge': patch_groups * 2 * group * vision_hidden * d,
    'decoder_linear': cfg.num_layers * tokens * per_token_layer,
    'attention': cfg.num_layers * batch_size * 4 * seq_len**2 * n * h,
    'lm_head': tokens * 2 * d * cfg.vocab_size,
  }


def train_step_flops(cfg: ModelConfig, spec: BatchSpec, batch_size: int) -> float:
  """FLOPs of one forward + backward pass over `batch_size` rows of `spec`."""
  forward = forward_flops(cfg, spec, batch_size)
  return 3 * sum(forward.values()) - forward['vision_patch']  # No gradient w.r.t. the pixels.


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override` if set, else from PEAK_FLOPS, else None (unknown)."""
  if override:
    return float(override)
  return next((peak for name, peak in PEAK_FLOPS if name in device_kind), None)


def mfu(
  flops_per_step: float, steps_per_second: float, num_devices: int, peak_per_device: float
) -> float:
  """Achieved model FLOP/s over the devices' combined peak."""
  return flops_per_step * steps_per_second / (num_devices * peak_per_device)


def device_kind() -> str:
  return jax.devices()[0].device_kind
