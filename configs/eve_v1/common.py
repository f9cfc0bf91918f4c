"""The EVEv1 recipe (EVE_REFERENCE.md §5.1): the stage table; configs are built by the builder the
EVEv2 recipe uses (configs/eve_v2/common.py, same arguments: size, root, data_root, tokenizer, steps).

  prealign     PEL + projector + PAL train (4e-4); the LLM is frozen. From {root}/llm (Vicuna-7B).
  pretrain     everything (except the CLIP teacher) at 4e-5.
  finetune     SFT at 2e-5, vicuna_v1 template, anypixel-672   (EVE-7B).
  finetune_hd  SFT at 2e-5, vicuna_v1 template, anypixel-1344  (EVE-7B-HD); also from pretrain.

The PAL loss is on in every stage of the reference. The EVEv1 model (its PEL and PAL, issue 4) is
used where the presets provide it (`eve_v1_7b`, `eve_v1_tiny`); until then the stand-in is a LLaMA
decoder with the EVEv2 vision tokenizer at 14 px patches, and no PAL.
"""
import os
import runpy

from evejax.models.presets import PRESETS

_V2 = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'eve_v2', 'common.py'))
STAGES = ('prealign', 'pretrain', 'finetune', 'finetune_hd')
INIT = {'prealign': 'llm', 'pretrain': 'prealign', 'finetune': 'pretrain',
        'finetune_hd': 'pretrain'}
# The reference's groups are substring rules: `vision_tower` (the PEL, and the PAL, its
# `vision_tower_compressor`) and `mm_projector`; here the PAL is `pal/`.
VISION = 'vision_tower|mm_projector|^pal/'

VICUNA_7B = dict(family='llama', vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0,
                 rms_norm_eps=1e-5, attention_bias=False, moe_part='', vision_patch_size=14,
                 vision_merge=2, vision_hidden_size=1024, dtype='bfloat16', param_dtype='float32')
TINY = dict(family='llama', attention_bias=False, moe_part='', rms_norm_eps=1e-5)

_STAGE = {
    'prealign': dict(trainable=VISION, groups={'vision': dict(pattern=VISION, lr=4e-4)},
                     lr=4e-5, warmup_ratio=0.03, batch=512, seq_len=2048, max_size=672,
                     template='plain', dataset='eve-cap33m',
                     examples=16_000_000,  # README: the first 16M of EVE-cap33M.
                     save_every=7813),
    'pretrain': dict(trainable='.*', lr=4e-5, warmup_ratio=0.01, batch=512, seq_len=2048,
                     max_size=672, template='plain', dataset='eve-cap33m', examples=33_000_000,
                     save_every=7813),
    'finetune': dict(trainable='.*', lr=2e-5, warmup_ratio=0.01, batch=128, seq_len=2048,
                     max_size=672, template='vicuna_v1', dataset='llava-v1.5-mix665k',
                     examples=665_000, save_every=50000),
    'finetune_hd': dict(trainable='.*', lr=2e-5, warmup_ratio=0.01, batch=128, seq_len=4096,
                        max_size=1344, template='vicuna_v1', dataset='eve-instruct-mix1.8m',
                        examples=1_865_000, save_every=50000),
}


def stage_config(stage: str, arg: str | None):
  """The config of one training stage of the EVEv1 recipe."""
  if stage not in _STAGE:
    raise ValueError(f'Unknown EVEv1 training stage {stage!r}; available: {sorted(_STAGE)}')
  tiny = _V2['parse_arg'](arg, **_V2['ARGS']).size == 'tiny'
  # Tiny prealign starts from a random LLM: there is no pretrained one at that size.
  init_stage = '' if tiny and stage == STAGES[0] else INIT[stage]
  return _V2['build_stage_config'](
      _STAGE[stage], stage, arg, init_stage=init_stage,
      model_7b=dict(PRESETS.get('eve_v1_7b', VICUNA_7B)),
      tiny_model=dict(PRESETS.get('eve_v1_tiny', TINY)))
