"""Model dimensions of the released EVE models and of small variants (HF config values)."""

from __future__ import annotations

QWEN2_5_7B = dict(
  family='qwen2',
  vocab_size=152064,
  hidden_size=3584,
  intermediate_size=18944,
  num_layers=28,
  num_heads=28,
  num_kv_heads=4,
  head_dim=128,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  attention_bias=True,
)
QWEN2_5_1_5B = dict(
  family='qwen2',
  vocab_size=151936,
  hidden_size=1536,
  intermediate_size=8960,
  num_layers=28,
  num_heads=12,
  num_kv_heads=2,
  head_dim=128,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  attention_bias=True,
  tie_word_embeddings=True,
)
QWEN2_5_0_5B = dict(
  family='qwen2',
  vocab_size=151936,
  hidden_size=896,
  intermediate_size=4864,
  num_layers=24,
  num_heads=14,
  num_kv_heads=2,
  head_dim=64,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  attention_bias=True,
  tie_word_embeddings=True,
)
VICUNA_7B = dict(
  family='llama',
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_layers=32,
  num_heads=32,
  num_kv_heads=32,
  head_dim=128,
  rope_theta=1e4,
  rms_norm_eps=1e-5,
  attention_bias=False,
  moe_part='',
)
# EVEv1 PEL (14 px conv, 2x2 local windows, C=1024, 8 heads) and PAL (9 taps, CLIP-L width).
EVE_V1_VISION = dict(
  vision_tokenizer='v1',
  vision_patch_size=14,
  vision_merge=2,
  vision_hidden_size=1024,
  vision_heads=8,
  pal=True,
  pal_layer_rate=4,
  pal_teacher_size=1024,
  pal_heads=8,
)
EVE_V2_VISION = dict(
  vision_patch_size=16, vision_merge=2, vision_hidden_size=1024, moe_part='layernorm-self_attn-mlp'
)

PRESETS = {
  # EVE-7B (v1): Vicuna-7B v1.5 with the EVEv1 PEL and PAL.
  'eve_v1_7b': dict(**VICUNA_7B, **EVE_V1_VISION, dtype='bfloat16', param_dtype='float32'),
  # CPU demo: the EVEv1 tokenizer geometry (28 px visual tokens), a small Llama, PAL on 5 taps.
  'eve_v1_tiny': dict(
    family='llama',
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    rope_theta=1e4,
    rms_norm_eps=1e-5,
    attention_bias=False,
    moe_part='',
    vision_tokenizer='v1',
    vision_patch_size=14,
    vision_merge=2,
    vision_hidden_size=64,
    vision_heads=4,
    pal=True,
    pal_layer_rate=1,
    pal_teacher_size=64,
    pal_heads=4,
  ),
  # EVE-7B-HD-v2.0: Qwen2.5-7B-Instruct with every layer decomposed.
  'eve_v2_7b': dict(**QWEN2_5_7B, **EVE_V2_VISION, dtype='bfloat16', param_dtype='float32'),
  'eve_v2_1.5b': dict(**QWEN2_5_1_5B, **EVE_V2_VISION, dtype='bfloat16', param_dtype='float32'),
  'eve_v2_0.5b': dict(**QWEN2_5_0_5B, **EVE_V2_VISION, dtype='bfloat16', param_dtype='float32'),
  # CPU demo: the reference tokenizer geometry (16 px patches, 2x2 merge), a small decoder.
  'eve_v2_tiny': dict(
    family='qwen2',
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    attention_bias=True,
    moe_part='layernorm-self_attn-mlp',
    vision_patch_size=16,
    vision_merge=2,
    vision_hidden_size=256,
  ),
}


def model_preset(name: str) -> dict:
  if name not in PRESETS:
    raise ValueError(f'Unknown model preset {name!r}; available: {sorted(PRESETS)}')
  return dict(PRESETS[name])
