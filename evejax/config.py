"""The typed sections of a training config, parsed once at the entry point (MaxText style).

A `get_config(arg)` file (configs/) starts from `default_config()` — every knob at the default it
has here, so `--config.x=y` can override any of them — and sets what its run changes. `train()`
turns the ConfigDict into a `TrainConfig` once (`TrainConfig.parse`: unknown keys and wrong types
are errors naming the key); every module then receives its own section, never the raw ConfigDict.

| section        | type              | read by                                                 |
| -------------- | ----------------- | ------------------------------------------------------- |
| `model`        | ModelConfig       | evejax/models (evejax/models/config.py)                 |
| `data`         | DataConfig        | evejax/data/pipeline.py                                 |
| `optim`        | OptimConfig       | evejax/train/optim.py                                   |
| `pal`          | PalConfig         | evejax/train/pal.py (EVEv1's patch-aligning objective)  |
| `checkpoint`   | CheckpointConfig  | evejax/checkpoint/manager.py                            |
| `guard`        | GuardConfig       | evejax/train/guard.py                                   |
| `metrics`      | MetricsConfig     | evejax/metrics                                          |
| `benchmark`    | BenchmarkConfig   | evejax/evaluation/periodic.py                           |
| `distributed`  | DistributedConfig | evejax/sharding/distributed.py                          |
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from evejax.batch import BatchSpec
from evejax.config_utils import from_mapping
from evejax.data import images, shapes, templates
from evejax.models import attention
from evejax.models.clip import CLIPVisionConfig
from evejax.models.config import ModelConfig

SOURCES = ('shapes', 'records', 'tfds')


class ConfigError(ValueError):
  """A config that cannot run: the message names the key and what to set."""


def _field(default_factory):
  return dataclasses.field(default_factory=default_factory)


def _one_of(where: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{where}={value!r}; use one of {tuple(allowed)}')


@dataclasses.dataclass(frozen=True)
class TfdsConfig:
  """data.source='tfds': a prepared TensorFlow Datasets dataset."""

  name: str = ''
  data_dir: str = ''
  train_split: str = 'train'
  eval_split: str = 'validation'


@dataclasses.dataclass(frozen=True)
class BadRecordsConfig:
  """Fail once more than max_fraction of the records read are bad (from min_records records on)."""

  max_fraction: float = 0.01
  min_records: int = 1000


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """The embedded demo data (evejax/data/shapes.py): image grid, shapes, question kinds."""

  cell: int = 32
  min_cells: int = 2
  max_cells: int = 5
  max_shapes: int = 3
  turns: int = 1
  question_kinds: str = ','.join(shapes.QUESTION_KINDS)  # Comma-separated.
  text_only: bool = False  # No image: the scene's description in the prompt (a text-only LLM).

  def dataset_kwargs(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'question_kinds': tuple(self.question_kinds.split(','))}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the records come from and how they become rows (evejax/data/pipeline.py)."""

  # 'shapes': the embedded demo data; 'records': a dataset converted by data_pipelines/ at `path`
  # (ArrayRecord shards + manifest per split); 'tfds': a prepared TFDS dataset (`tfds`).
  source: str = 'shapes'
  num_train: int = 20_000  # shapes: examples of the train split ...
  num_eval: int = 512  # ... and of the held-out split (0: no held-out evaluation).
  seed: int = 0  # Shuffling (and the shapes generator).
  path: str = ''
  train_split: str = 'train'
  eval_split: str = 'eval'  # '' = no held-out evaluation.
  # Held-out text-only records, evaluated beside eval_split as eval_text/* (is the LLM's language
  # ability kept?): a split of `path` ('records'), or for 'shapes' 'text' = the held-out scenes as
  # text (shapes.text_only). '' = none.
  text_eval_split: str = ''
  tfds: TfdsConfig = _field(TfdsConfig)
  tokenizer: str = ''  # A tokenizer.json or HF folder; '' = a BPE trained on the source's corpus.
  template: str = 'chat'  # Conversation template (evejax/data/templates.py).
  seq_len: int = 256  # Positions per row, visual tokens included.
  # The reference's model_max_length: text ids (one per image placeholder) kept before the images
  # expand; longer samples are cut (counted as `truncated`, not bad records). 0 = no cut.
  max_text_len: int = 0
  max_size: int = 96  # Image area budget (side of a square), pixels.
  resize: str = 'eve_v2_train'  # Resize policy (evejax/data/images.py).
  blank_images: bool = False  # Ablation: keep the layout, erase the pixels.
  pack_window: int = 1  # Examples packed per first-fit window (1 = one example per row).
  row_patches: int = 0  # Patch-group slots per row; 0 = exactly one image's budget.
  num_threads: int = 2  # Reading and preprocessing threads ...
  num_workers: int = 0  # ... in this many worker processes (0: in the trainer's process).
  prefetch: int = 4
  cache_dir: str = ''  # Where the demo data is written once; '' = $EVEJAX_CACHE or ~/.cache.
  # Shards on object storage (gs://): ArrayRecord reads local files only. False: an error that
  # explains the gcsfuse mount (README, "Object storage"); True: copy them to local disk at start
  # (checked against the manifest's SHA-256; for datasets that fit on each host's disk).
  copy_remote_shards: bool = False
  bad_records: BadRecordsConfig = _field(BadRecordsConfig)
  shapes: ShapesConfig = _field(ShapesConfig)

  def __post_init__(self):
    _one_of('data.source', self.source, SOURCES)
    _one_of('data.resize', self.resize, images.RESIZE_POLICIES)
    _one_of('data.template', self.template, templates.TEMPLATES)
    if self.text_eval_split and self.source == 'shapes' and self.text_eval_split != 'text':
      raise ValueError(
        f'data.text_eval_split={self.text_eval_split!r}: the shapes source has one text-only '
        "held-out split, 'text'"
      )
    if self.text_eval_split and self.source == 'tfds':
      raise ValueError("data.text_eval_split needs data.source='shapes' or 'records'")
    if self.pack_window < 1:
      raise ValueError(f'data.pack_window must be >= 1 (1 = no packing), got {self.pack_window}')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, warmup + cosine decay, clipping, and what trains (evejax/train/optim.py)."""

  lr: float = 1e-3
  warmup_steps: int = 0
  end_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0  # 0 = no clipping.
  trainable: str = '.*'  # re.search over parameter paths: these train ...
  frozen: str = ''  # ... unless they match this ('' = none).
  # name -> {pattern: REGEX, lr: PEAK}: groups with their own peak learning rate.
  groups: Mapping[str, Mapping[str, Any]] = _field(dict)

  def __post_init__(self):
    for name, group in self.groups.items():
      if set(group) != {'pattern', 'lr'}:
        raise ValueError(
          f'optim.groups.{name} = {dict(group)}: give exactly pattern=REGEX and lr=PEAK_LR'
        )


@dataclasses.dataclass(frozen=True)
class PalConfig:
  """EVEv1's patch-aligning objective (evejax/train/pal.py); weight 0 = off."""

  weight: float = 0.0
  teacher: str = 'online'  # 'online': a frozen CLIP ViT each step; 'offline': features in records.
  seed: int = 0  # Of the random teacher when clip_weights is '' (the CPU demo).
  clip_weights: str = ''  # Local HF safetensors of the CLIP ViT.
  clip: CLIPVisionConfig = _field(CLIPVisionConfig)

  def __post_init__(self):
    _one_of('pal.teacher', self.teacher, ('online', 'offline'))

  @property
  def offline(self) -> bool:
    """Whether the records must carry the teacher's features."""
    return bool(self.weight) and self.teacher == 'offline'


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints in {workdir}/checkpoints (evejax/checkpoint/manager.py)."""

  every: int = 1000  # Steps between saves (and the final step, and at preemption).
  keep_last: int = 3
  keep_every: int = 0  # Also keep every k-th step's checkpoint (0: none).
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Non-finite loss or gradients (evejax/train/guard.py): 'stop', or 'skip' up to max_skipped."""

  nonfinite: str = 'stop'
  max_skipped: int = 10

  def __post_init__(self):
    _one_of('guard.nonfinite', self.nonfinite, ('stop', 'skip'))


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases logging of every run (evejax/metrics/wandb_writer.py); off without project."""

  project: str = ''  # '' = no W&B.
  entity: str = ''
  group: str = ''  # E.g. a sweep's variant (`python -m evejax.sweep` sets it when '').
  name: str = ''  # '' = the workdir's name.
  mode: str = (
    'offline'  # 'offline' (files under {workdir}/wandb, no network), 'online', 'disabled'.
  )

  def __post_init__(self):
    _one_of('metrics.wandb.mode', self.mode, ('offline', 'online', 'disabled'))


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  peak_flops: float = 0.0  # Per device, for MFU; 0 = look the device kind up (metrics/flops.py).
  wandb: WandbConfig = _field(WandbConfig)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """Generation on a benchmark file during training (evejax/evaluation/periodic.py)."""

  file: str = ''  # A records.py JSONL file; '' = off.
  every: int = 0  # Steps between runs; 0 = at the end only.
  limit: int = 0  # The first N items; 0 = all.
  batch_size: int = 16
  max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process set-up (evejax/sharding/distributed.py); empty fields read JAX_* variables."""

  coordinator_address: str = ''
  num_processes: int = 0
  process_id: int = -1
  auto: bool = False  # jax.distributed.initialize() finds everything (TPU pods, SLURM).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A whole training run."""

  seed: int = 0
  stage: str = ''  # Recipe stage name (configs/eve_v*/), for the record.
  model: ModelConfig = _field(ModelConfig)
  data: DataConfig = _field(DataConfig)
  batch_size: int = 4  # Global rows per step.
  total_steps: int = 1000
  optim: OptimConfig = _field(OptimConfig)
  pal: PalConfig = _field(PalConfig)
  # Mesh sizes over (data, fsdp, tensor), -1 = the rest; dcn=dict(data=2): multi-slice.
  mesh: Mapping[str, Any] = _field(lambda: {'data': -1, 'fsdp': 1, 'tensor': 1})
  sharding_rules: tuple = ()  # (logical axis, mesh axes) overrides of sharding.DEFAULT_RULES.
  sharding_tolerance: float = 0.02  # Most parameter bytes left replicated over fsdp/tensor.
  microbatches: int = 1  # Gradient accumulation inside the step.
  # The loss computes the logits this many positions at a time (never [B, T, vocab] at once);
  # <= 0: all at once.
  loss_chunk: int = 512
  distributed: DistributedConfig = _field(DistributedConfig)
  log_every: int = 25
  eval_every: int = 200
  eval_at_start: bool = False  # Also evaluate the starting weights (step 0, e.g. init_from's).
  checkpoint: CheckpointConfig = _field(CheckpointConfig)
  init_from: str = ''  # A workdir or checkpoint to take the weights (only) from.
  # Regexes (re.search over '/'-joined paths) of the parameters init_from may lack: those start
  # freshly initialised (e.g. the vision tower at EVEv2 stage 0); any other missing one is an error.
  init_new: tuple = ()
  benchmark: BenchmarkConfig = _field(BenchmarkConfig)
  guard: GuardConfig = _field(GuardConfig)
  metrics: MetricsConfig = _field(MetricsConfig)
  profile_steps: int = 0  # > 0: trace this many steps from profile_first_step.
  profile_first_step: int = 10

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f'total_steps={self.total_steps} must be >= 1')
    if self.batch_size < 1:
      raise ValueError(f'batch_size={self.batch_size} must be >= 1')
    for pattern in self.init_new:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as error:
        raise ValueError(f'init_new entry {pattern!r} is not a regex: {error}') from None
    if self.pal.weight and not self.model.pal:
      raise ValueError('pal.weight > 0 needs model.pal=True (the patch-aligning layer)')

  @classmethod
  def parse(cls, config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
    """The typed config of a ConfigDict (or plain dict, e.g. a checkpoint's saved config)."""
    if isinstance(config, TrainConfig):
      return config
    try:
      return from_mapping(cls, config, 'config')
    except (TypeError, ValueError) as error:  # Unknown keys, wrong types, invalid values.
      raise ConfigError(str(error)) from error

  def to_dict(self) -> dict[str, Any]:
    """JSON-able: what checkpoints and {workdir}/config.json store."""
    return dataclasses.asdict(self)

  def check_attention(self, platform: str | None = None) -> None:
    """The attention this run takes on `platform` (default: JAX's) can run and can hold its
    packed rows: cuDNN takes at most model.max_segments runs of segment ids a row."""
    try:
      implementation = attention.resolve(self.model.attention, platform)
    except ValueError as error:
      raise ConfigError(str(error)) from error
    runs = self.data.pack_window + 1  # examples, and the padding
    if implementation == 'cudnn' and runs > self.model.max_segments:
      raise ConfigError(
        f'data.pack_window={self.data.pack_window} packs up to {runs} runs of segment ids a row '
        f'(with the padding) but cuDNN attention takes model.max_segments='
        f'{self.model.max_segments}: raise model.max_segments or lower data.pack_window'
      )

  def batch_spec(self) -> BatchSpec:
    """The training batches' spec: model geometry, data shapes, offline teacher features."""
    data = self.data
    try:
      spec = BatchSpec.for_model(
        self.model,
        seq_len=data.seq_len,
        patch_slots=data.row_patches,
        max_size=data.max_size,
        resize=data.resize,
        teacher_size=self.model.pal_teacher_size if self.pal.offline else 0,
      )
    except ValueError as error:  # A data setting the model cannot take (e.g. resize='pad').
      raise ConfigError(str(error)) from error
    if data.row_patches and data.row_patches < spec.image_budget:
      raise ConfigError(
        f'data.row_patches={data.row_patches} is below the {spec.image_budget} patch groups '
        f'one image may need at data.max_size={data.max_size}; raise it (or 0 '
        'for exactly one image)'
      )
    return spec.replace(patch_slots=data.row_patches or spec.image_budget)


def default_config() -> ml_collections.ConfigDict:
  """Every field at its default: the base that configs/ files start from."""
  return ml_collections.ConfigDict(TrainConfig().to_dict())
