"""The EVEv2 recipe (EVE_REFERENCE.md §5.2): the stage table and the one config builder that the
thin per-stage files share.

  stage0    PEL pre-alignment: only the vision tokenizer trains; the LLM has no vision copies yet.
  copy      no training: every vision copy (moe_*) <- its LLM weight (`python -m evejax.recipe`).
  stage1_0  vision tokenizer + vision copies at res800;  stage1_1  the same at res1600.
  stage2    everything, qwen2 template;  stage3  everything, instruction tuning.

Arguments (`--config=configs/eve_v2/stage1_0.py:size=7b,root=gs://b/eve_v2,data_root=gs://b/data`):
  size       '7b' (the paper's recipe) or 'tiny' (the same stages on the embedded shapes data, CPU).
  root       the recipe's output root: stage S writes to {root}/S (pass it as --workdir) and starts
             from {root}/<previous stage> (init_from). Stage 0 starts from {root}/llm, the imported
             base LLM (`python -m evejax.convert import --hf_dir=Qwen2.5-7B-Instruct
             --out={root}/llm`).
  data_root  7b: the directory holding each stage's converted dataset (data.source='records').
  tokenizer  7b: the Qwen2.5 tokenizer.json or HF folder.
  steps      tiny: training steps per stage.
  examples_per_row
             7b: packed examples per row (rows per step = batch / it); 0 = the stage's default
             (packed caption stages: an estimate; measure it on your data, see _cluster_base).
  text_llm   tiny: stage 0 starts from {root}/llm, the text-only LLM of configs/text_llm.py
             (default: a random LLM).
"""

import os
from collections.abc import Callable

import ml_collections

from configs import demo
from evejax.config import default_config
from evejax.config_utils import parse_arg
from evejax.models.presets import model_preset

STAGES = ('stage0', 'copy', 'stage1_0', 'stage1_1', 'stage2', 'stage3')
VISION_TOKENIZER = '^vision_tower/'
VISION_COPIES = '/moe_'  # Decoder layers' `moe_*` modules (the reference's substring rule).

# Per training stage: model changes, what trains, reference LR / global batch (examples) / text
# length (model_max_length) / image side, template, dataset and its size (one epoch), packing
# (examples_per_row, see _cluster_base). The reference's LR is 'base = VE': one group.
_NO_COPIES = dict(moe_part='')  # No vision copies before the copy step.
_STAGE = {
  'stage0': dict(
    model=_NO_COPIES,
    trainable=VISION_TOKENIZER,
    new=VISION_TOKENIZER,  # init_new: the imported LLM may lack the vision tower.
    lr=2e-4,
    batch=1024,
    text_len=2048,
    max_size=800,
    template='plain',
    dataset='datacomp1b-10m-index',
    examples=10_000_000,
    examples_per_row=4,  # Packed: independent (image, caption) pairs (_cluster_base).
  ),
  'stage1_0': dict(
    trainable=f'{VISION_TOKENIZER}|{VISION_COPIES}',
    lr=1e-4,
    batch=1024,
    text_len=2048,
    max_size=800,
    template='plain',
    dataset='datacomp1b-30m-index',
    examples=29_000_000,
    examples_per_row=4,  # Packed: independent (image, caption) pairs (_cluster_base).
  ),
  'stage1_1': dict(
    trainable=f'{VISION_TOKENIZER}|{VISION_COPIES}',
    lr=5e-5,
    batch=1024,
    text_len=4096,
    max_size=1600,
    template='plain',
    dataset='laion-openimages-sam-datacomp1b-48m-index',
    examples=48_000_000,
    examples_per_row=2,  # Packed captions; up to 1600 px images: about 2 a row (_cluster_base).
  ),
  'stage2': dict(
    trainable='.*',
    lr=2e-5,
    batch=512,
    text_len=4096,
    max_size=1600,
    template='qwen2',
    dataset='infinity-mm-generalqa-index',
    examples=15_000_000,
    # Not packed (examples_per_row 1): SFT conversations vary from tens to thousands of positions
    # (_cluster_base).
  ),
  'stage3': dict(
    trainable='.*',
    lr=1e-5,
    batch=512,
    text_len=5000,
    max_size=1600,
    template='qwen2',
    dataset='infinity-mm-llava-ov-index',
    examples=7_300_000,
    # Not packed (examples_per_row 1): SFT conversations vary from tens to thousands of positions
    # (_cluster_base).
  ),
}
WARMUP_RATIO = 0.03
ARGS = dict(
  size='tiny', root='', data_root='', tokenizer='', steps=60, text_llm=False, examples_per_row=0
)  # See the docstring.
PACK_WINDOW = 32  # Examples per first-fit window of packed stages (cuDNN: <= max_segments - 1).
ROW_MULTIPLE = 128  # Row lengths round up to this (Pallas/splash attention tiles).
SAVE_EVERY = 4000
TINY_LR_SCALE = 10.0  # The tiny model trains at 10x the 7B learning rates.


def previous_stage(stage: str) -> str:
  index = STAGES.index(stage)
  return STAGES[index - 1] if index else 'llm'


def stage_dir(root: str, stage: str) -> str:
  return os.path.join(root, stage) if root and stage else ''


def row_positions(text_len: int, max_size: int, model: dict) -> int:
  """Positions of a row that holds any sample the reference trains on whole: `text_len` text ids
  plus the visual tokens of a square max_size image ([CLASS] + n x (n PATCH + SPLIT), n the side
  in tokens plus the rounding one), rounded up to ROW_MULTIPLE. The reference never truncates
  after expansion (EVE_REFERENCE §7.8); only very elongated images (more SPLITs) can exceed this,
  and those samples lose text tail (counted as truncated)."""
  side = max_size // (model['vision_patch_size'] * model['vision_merge']) + 1
  return -(-(text_len + 1 + side * (side + 1)) // ROW_MULTIPLE) * ROW_MULTIPLE


def _cluster_base(model: dict, arg, spec: dict) -> ml_collections.ConfigDict:
  config = default_config()
  config.model.update(model)
  config.model.update(scan_layers=True, remat='full')  # Reference: gradient checkpointing.
  # FLOP-exact modality routing (each token through its own branch only); 'select' is the
  # reference's dense dual-branch compute (~2x the FLOPs of the decomposed ops), same results.
  config.model.routing = 'sorted'
  seq_len = row_positions(spec['text_len'], spec['max_size'], config.model)
  # Packing (examples_per_row > 1), on for the caption stages: one (image, caption) pair per
  # example, each independent; segment ids and restarted positions make every packed example's
  # forward pass and gradient those of a row of its own, the CE loss is a token mean over the
  # batch either way (PAL a mean over images), and captions are of similar length, so a step of
  # batch / examples_per_row rows holds about the reference's `batch` examples. Off for the
  # instruction (SFT) stages: conversations range from tens to thousands of positions, so a fixed
  # number of packed rows would swing the examples per step far from the reference's fixed batch
  # (examples_per_row=K packs them anyway). Examples per row depend on the data: measure them
  # (perf/images_per_s x perf/step_time_s in the metrics, or `python -m evejax.data.bench
  # --dataset=records`) and pass examples_per_row= to keep the reference's batch.
  per_row = arg.examples_per_row or spec.get('examples_per_row', 1)
  config.data.update(
    source='records',
    path=os.path.join(arg.data_root, spec['dataset']) if arg.data_root else '',
    train_split='train',
    eval_split='eval',
    tokenizer=arg.tokenizer,
    template=spec['template'],
    max_text_len=spec['text_len'],  # The reference's model_max_length, cut before expansion.
    seq_len=seq_len,
    max_size=spec['max_size'],
    resize='eve_v2_train',
    pack_window=PACK_WINDOW if per_row > 1 else 1,
    # Packed rows hold several images: patch slots for visual tokens filling 3/4 of the row.
    row_patches=seq_len * 3 // 4 if per_row > 1 else 0,
    num_threads=16,
    num_workers=4,
  )
  if spec['batch'] % per_row:
    raise ValueError(f'examples_per_row={per_row} does not divide the batch of {spec["batch"]}')
  config.batch_size = spec['batch'] // per_row  # Rows.
  config.total_steps = spec['examples'] // spec['batch']  # One epoch.
  # grad_clip 1.0: the HF default; under DeepSpeed probably none (§5).
  config.optim.update(lr=spec['lr'], end_lr_ratio=0.0, grad_clip=1.0)
  config.mesh = dict(data=1, fsdp=-1, tensor=1)  # Fully sharded, like ZeRO-3.
  config.log_every = 50
  config.eval_every = spec.get('save_every', SAVE_EVERY)
  config.checkpoint.update(every=spec.get('save_every', SAVE_EVERY), keep_last=2)
  # Multi-host: launch/ sets JAX_* (SLURM) or passes --config.distributed.auto=True (TPU).
  return config


def _tiny(
  arg, spec: dict, tiny_model: dict, tiny_base: Callable[[], ml_collections.ConfigDict]
) -> ml_collections.ConfigDict:
  config = tiny_base()
  config.model.update(tiny_model)
  config.total_steps = arg.steps
  config.optim.lr = spec['lr'] * TINY_LR_SCALE
  config.data.template = 'plain' if spec['template'] == 'plain' else 'chat'
  if spec['template'] == 'plain':  # Pretraining: one (image, caption) pair per example.
    config.data.shapes.question_kinds = 'caption'
    config.data.shapes.turns = 1
  config.checkpoint.every = arg.steps  # Only the stage's final weights.
  return config


def build_stage_config(
  spec: dict,
  stage: str,
  arg: str | None,
  *,
  init_stage: str,
  model_7b: dict,
  tiny_model: dict | None = None,
  tiny_base: Callable[[], ml_collections.ConfigDict] = demo.get_config,
  args: dict | None = None,
) -> ml_collections.ConfigDict:
  """One stage's config from its table row `spec` (EVEv1 shares this builder). `init_stage`: the
  stage whose output it starts from ('' = none at tiny size, where no pretrained LLM exists);
  `tiny_base`: the CPU demo config the tiny size builds on; `args`: the accepted arguments."""
  arg = parse_arg(arg, **(args or ARGS))
  if arg.size not in ('7b', 'tiny'):
    raise ValueError(f"size={arg.size!r}: use '7b' or 'tiny'")
  tiny = arg.size == 'tiny'
  config = (
    _tiny(arg, spec, tiny_model or {}, tiny_base) if tiny else _cluster_base(model_7b, arg, spec)
  )
  config.model.update(spec.get('model', {}))
  config.optim.warmup_steps = max(
    1, round(spec.get('warmup_ratio', WARMUP_RATIO) * config.total_steps)
  )
  scale = TINY_LR_SCALE if tiny else 1.0
  groups = {
    name: dict(pattern=g['pattern'], lr=g['lr'] * scale)
    for name, g in spec.get('groups', {}).items()
  }
  config.optim.update(trainable=spec['trainable'], frozen=spec.get('frozen', ''), groups=groups)
  config.init_from = stage_dir(arg.root, init_stage)
  # What init_from may lack (config.init_new): only the parts this stage trains from scratch.
  config.init_new = (spec['new'],) if spec.get('new') and config.init_from else ()
  config.stage = stage
  return config


def stage_config(
  stage: str, arg: str | None, args: dict | None = None
) -> ml_collections.ConfigDict:
  """The config of one training stage of the EVEv2 recipe; `args`: the accepted arguments when a
  config file adds its own to ARGS."""
  if stage not in _STAGE:
    raise ValueError(f'Unknown EVEv2 training stage {stage!r}; available: {sorted(_STAGE)}')
  parsed = parse_arg(arg, **(args or ARGS))
  # Tiny stage 0 starts from a random LLM unless text_llm: no pretrained one exists at that size.
  random_llm = parsed.size == 'tiny' and stage == STAGES[0] and not parsed.text_llm
  return build_stage_config(
    _STAGE[stage],
    stage,
    arg,
    init_stage='' if random_llm else previous_stage(stage),
    model_7b=model_preset('eve_v2_7b'),
    args=args,
  )
