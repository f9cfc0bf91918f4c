"""The EVEv1 recipe (EVE_REFERENCE.md §5.1): the stage table; configs are built by the builder the
EVEv2 recipe uses (configs/eve_v2/common.py: size, root, data_root, tokenizer, steps), plus the
PAL teacher arguments below.

  prealign     PEL + projector + PAL train (4e-4); the LLM is frozen. From {root}/llm (Vicuna-7B).
  pretrain     everything (except the CLIP teacher) at 4e-5.
  finetune     SFT at 2e-5, vicuna_v1 template, anypixel-672   (EVE-7B).
  finetune_hd  SFT at 2e-5, vicuna_v1 template, anypixel-1344  (EVE-7B-HD); also from pretrain.

The PAL loss (weight 1) is on in every stage of the reference. Its teacher, CLIP ViT-L/14-336 at the
penultimate layer, is frozen and never a trainable parameter:
  teacher=offline  (7b default) read precomputed features from the records
                   (extras['teacher_features'], written by data_pipelines/teacher_features.py);
  teacher=online   run it every step from clip_weights, a local HF safetensors file of
                   openai/clip-vit-large-patch14-336.
size=tiny builds on configs/demo_v1.py: the tiny EVEv1 with a small random frozen CLIP teacher.
"""

from configs import demo_v1
from configs.eve_v2 import common as v2
from evejax.config_utils import parse_arg
from evejax.models.presets import PRESETS

ARGS = dict(v2.ARGS, teacher='', clip_weights='')  # teacher '': offline at 7b, online tiny
STAGES = ('prealign', 'pretrain', 'finetune', 'finetune_hd')
INIT = {
  'prealign': 'llm',
  'pretrain': 'prealign',
  'finetune': 'pretrain',
  'finetune_hd': 'pretrain',
}
# The reference's groups are substring rules: `vision_tower` (the PEL, and the PAL, its
# `vision_tower_compressor`) and `mm_projector`; here the PAL is `pal/`.
VISION = 'vision_tower|mm_projector|^pal/'


_STAGE = {
  'prealign': dict(
    trainable=VISION,
    new=VISION,  # init_new: the imported LLM may lack the PEL, projector and PAL.
    groups={'vision': dict(pattern=VISION, lr=4e-4)},
    lr=4e-5,
    warmup_ratio=0.03,
    batch=512,
    text_len=2048,
    max_size=672,
    template='plain',
    dataset='eve-cap33m',
    examples=16_000_000,  # README: the first 16M of EVE-cap33M.
    save_every=7813,
    examples_per_row=4,  # Packed captions (configs/eve_v2/common.py: _cluster_base).
  ),
  'pretrain': dict(
    trainable='.*',
    lr=4e-5,
    warmup_ratio=0.01,
    batch=512,
    text_len=2048,
    max_size=672,
    template='plain',
    dataset='eve-cap33m',
    examples=33_000_000,
    save_every=7813,
    examples_per_row=4,  # Packed captions (configs/eve_v2/common.py: _cluster_base).
  ),
  'finetune': dict(
    trainable='.*',
    lr=2e-5,
    warmup_ratio=0.01,
    batch=128,
    text_len=2048,
    max_size=672,
    template='vicuna_v1',
    dataset='llava-v1.5-mix665k',
    examples=665_000,
    save_every=50000,
    # Not packed: SFT (configs/eve_v2/common.py: _cluster_base).
  ),
  'finetune_hd': dict(
    trainable='.*',
    lr=2e-5,
    warmup_ratio=0.01,
    batch=128,
    text_len=4096,
    max_size=1344,
    template='vicuna_v1',
    dataset='eve-instruct-mix1.8m',
    examples=1_865_000,
    save_every=50000,
    # Not packed: SFT (configs/eve_v2/common.py: _cluster_base).
  ),
}


def _pal_7b(arg) -> dict:
  """PAL as the reference: weight 1, CLIP ViT-L/14-336 (the CLIPVisionConfig defaults)."""
  teacher = arg.teacher or 'offline'
  if teacher == 'online' and not arg.clip_weights:
    raise ValueError(
      'EVEv1 at size=7b needs its PAL teacher: clip_weights=<local safetensors of '
      'openai/clip-vit-large-patch14-336>, or teacher=offline with precomputed '
      "features in the records' extras"
    )
  return dict(weight=1.0, teacher=teacher, seed=0, clip_weights=arg.clip_weights)


def stage_config(stage: str, arg: str | None):
  """The config of one training stage of the EVEv1 recipe."""
  if stage not in _STAGE:
    raise ValueError(f'Unknown EVEv1 training stage {stage!r}; available: {sorted(_STAGE)}')
  parsed = parse_arg(arg, **ARGS)
  tiny = parsed.size == 'tiny'
  # Tiny prealign starts from a random LLM unless text_llm: no pretrained one exists at that size.
  random_llm = tiny and stage == STAGES[0] and not parsed.text_llm
  init_stage = '' if random_llm else INIT[stage]
  config = v2.build_stage_config(
    _STAGE[stage],
    stage,
    arg,
    init_stage=init_stage,
    model_7b=dict(PRESETS['eve_v1_7b']),
    tiny_base=demo_v1.get_config,
    args=ARGS,
  )
  if tiny:
    config.pal.teacher = parsed.teacher or config.pal.teacher
  else:
    config.pal.update(_pal_7b(parsed))
    # The reference's EVEv1 processor: long side = max_size, the 4th channel marks valid pixels.
    config.data.resize = 'eve_v1'
    # 1344 px = 2x the teacher's grid: PAL pools 2x2 token blocks, sides round to 56 px, and
    # the offline features are the 672 px run's (the CLIP input is 336 px for both).
    config.model.pal_pool = config.data.max_size // 672
  return config
