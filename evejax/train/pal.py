"""EVEv1's patch-aligning objective: PAL's predictions against a frozen teacher's patch features.

The loss is 1 - cosine(pred, teacher) averaged over the valid visual tokens of each image, then
over images. A token counts when its PATCH position survived in the sequence (truncation drops the
rest, where the reference crashes), its 28x28 px are all valid pixels, and its image is real.
The teacher grid is the visual-token grid (EVE-7B: 672 px / 28 = 336 px / 14 = 24). HD inputs
(EVE-7B-HD: 1344 px, 48 tokens a side) have `model.pal_pool=2`: the hidden states of every 2x2
block of tokens are averaged first, as the reference does, and the block's prediction sits at its
top-left token, where the teacher feature of its CLIP patch is (`block_anchors`). A block counts
when all its tokens survived truncation and are valid pixels.

Configured by the `pal` section (evejax/config.py PalConfig): weight, and the teacher — 'online'
(a frozen CLIP ViT run every step, evejax/models/clip.py) or 'offline' (features precomputed by
data_pipelines/teacher_features.py and carried by the batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from evejax import batch as batch_format
from evejax.convert.importer import load_clip
from evejax.models.config import ModelConfig
from evejax.models.vision_v1 import image_extent, split_channels

if TYPE_CHECKING:  # evejax.config imports the models.
  from evejax.config import PalConfig

Array = jax.Array


def group_states(
  states: Array, token_kind: Array, patch_index: Array, num_groups: int
) -> tuple[Array, Array]:
  """Sequence states (B, L, ...) -> per patch group (B, P, ...) and whether its PATCH token is in
  the sequence (B, P); groups whose token was cut off get zeros."""
  is_patch = token_kind == batch_format.PATCH
  rows = jnp.arange(states.shape[0])[:, None]
  keep = is_patch.reshape(*is_patch.shape, *(1,) * (states.ndim - 2))
  grouped = jnp.zeros((states.shape[0], num_groups, *states.shape[2:]), states.dtype)
  grouped = grouped.at[rows, patch_index].add(jnp.where(keep, states, 0))
  present = jnp.zeros((states.shape[0], num_groups), jnp.bool_).at[rows, patch_index].max(is_patch)
  return grouped, present


def block_anchors(patch_image: Array, patch_coords: Array, pool: int) -> Array:
  """(B, P) index of the top-left group of each group's pool x pool block of its image's grid
  (groups are row-major per image: a row of the grid is `cols` groups)."""
  cols = image_extent(patch_image, patch_coords)[..., 1]
  row, col = patch_coords[..., 0], patch_coords[..., 1]
  return jnp.arange(patch_image.shape[1]) - (row % pool) * cols - col % pool


def pool_blocks(grouped: Array, keep: Array, anchors: Array, pool: int) -> tuple[Array, Array]:
  """Averages (B, P, ...) over each block at its anchor; the (B, P) mask of anchors whose whole
  block (pool**2 groups) is kept."""
  b, p = keep.shape
  rows = jnp.arange(b)[:, None]
  weight = keep.astype(grouped.dtype).reshape(b, p, *(1,) * (grouped.ndim - 2))
  total = jnp.zeros_like(grouped).at[rows, anchors].add(grouped * weight)
  count = jnp.zeros((b, p), jnp.int32).at[rows, anchors].add(keep.astype(jnp.int32))
  mean = total / jnp.maximum(count, 1).reshape(weight.shape).astype(grouped.dtype)
  return mean, count == pool * pool


def cosine_loss(pred: Array, target: Array, valid: Array, patch_image: Array) -> Array:
  """Mean over images of 1 - (mean cosine over the image's valid tokens); images without a valid
  token do not count. pred, target: (B, P, c); valid, patch_image: (B, P)."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  # torch's cosine_similarity (eps 1e-8 per norm), with a gradient that stays finite at zero.
  norm = lambda x: jnp.sqrt(jnp.maximum((x * x).sum(-1), 1e-16))
  cos = (pred * target).sum(-1) / (norm(pred) * norm(target))
  b, p = valid.shape
  segments = (patch_image + jnp.arange(b)[:, None] * (p + 1)).reshape(-1)
  weight = (valid & (patch_image > 0)).astype(jnp.float32).reshape(-1)
  cos_sum = jax.ops.segment_sum(cos.reshape(-1) * weight, segments, num_segments=b * (p + 1))
  count = jax.ops.segment_sum(weight, segments, num_segments=b * (p + 1))
  has_tokens = count > 0
  per_image = 1.0 - cos_sum / jnp.maximum(count, 1.0)
  return jnp.where(has_tokens, per_image, 0.0).sum() / jnp.maximum(has_tokens.sum(), 1)


def valid_groups(patches: Array) -> Array:
  """(B, P, S, p*p*4) uint8 -> (B, P) bool: every pixel of the group is valid."""
  return split_channels(patches)[1].all(axis=(-2, -1))


TeacherFn = Callable[[Mapping[str, Array]], Array]


def offline_teacher(batch: Mapping[str, Array]) -> Array:
  """Precomputed teacher features (B, P, c) carried by the batch (`teacher_features`)."""
  if 'teacher_features' not in batch:
    raise ValueError(
      "pal.teacher='offline' needs a 'teacher_features' field in the data records "
      "(one teacher vector per visual token); use pal.teacher='online' otherwise"
    )
  return batch['teacher_features']


@dataclasses.dataclass(frozen=True)
class PalObjective:
  """The PAL term of the training loss: `weight` and where the teacher features come from."""

  weight: float
  teacher: TeacherFn

  def __call__(self, model: nnx.Module, batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """Decoder outputs [B, L, D] (the logits are the step's, chunk by chunk) and the PAL loss
    (scalar) from one forward pass."""
    if model.pal is None:
      raise ValueError('pal.weight > 0 needs model.pal=True (the patch-aligning layer)')
    hidden, tapped = model.hidden_states(batch, model.pal.taps)
    grouped, present = group_states(
      jnp.stack(tapped, axis=2),
      batch['token_kind'],
      batch['patch_index'],
      batch['patches'].shape[1],
    )
    valid = present & valid_groups(batch['patches'])
    pool = model.cfg.pal_pool
    if pool > 1:
      anchors = block_anchors(batch['patch_image'], batch['patch_coords'], pool)
      grouped, valid = pool_blocks(grouped, valid, anchors, pool)
    pred = model.pal([grouped[:, :, j] for j in range(len(tapped))])
    target = jax.lax.stop_gradient(self.teacher(batch))
    return hidden, cosine_loss(pred, target, valid, batch['patch_image'])


def objective_from_config(pal: PalConfig, model_cfg: ModelConfig) -> PalObjective | None:
  """The PAL term of the `pal` section, or None when its weight is 0 (then no PAL metric is
  reported either)."""
  if not pal.weight:
    return None
  if pal.offline:
    return PalObjective(pal.weight, offline_teacher)
  if model_cfg.pal_pool > 1:
    raise ValueError(
      f'model.pal_pool={model_cfg.pal_pool} (HD) needs pal.teacher=offline: the '
      'teacher sees the image at the base resolution, so use the features '
      'data_pipelines/teacher_features.py writes for the base (pal_pool=1) config'
    )
  return PalObjective(pal.weight, online_teacher(pal, model_cfg))


def online_teacher(pal: PalConfig, model_cfg: ModelConfig) -> TeacherFn:
  """A frozen CLIP ViT (evejax/models/clip.py) from `pal.clip_weights` (a local HF safetensors
  file), or randomly initialised from `pal.seed` when that is '' (the demo). Its parameters are
  closed over by the step, never trained; PalObjective stops gradients at its output.
  data_pipelines/teacher_features.py runs the same function to precompute offline features."""
  from evejax.models import clip  # pylint: disable=import-outside-toplevel

  if pal.clip.hidden_size != model_cfg.pal_teacher_size:
    raise ValueError(
      f'pal.clip.hidden_size={pal.clip.hidden_size} differs from '
      f'model.pal_teacher_size={model_cfg.pal_teacher_size}'
    )
  teacher = clip.CLIPVision(pal.clip, rngs=nnx.Rngs(pal.seed))
  if pal.clip_weights:
    load_clip(teacher, pal.clip_weights)
  graphdef, state = nnx.split(teacher)

  def features(batch: Mapping[str, Array]) -> Array:
    return nnx.merge(graphdef, state).patch_features(
      batch['patches'], batch['patch_image'], batch['patch_coords']
    )

  return features
