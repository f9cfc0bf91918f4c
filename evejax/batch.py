"""The batch format: the one contract between `evejax.data` (producer) and `evejax.models`
(consumer).

Images travel as patch sequences, not pixel tensors, so every array has a static shape whatever the
image sizes. One visual token covers a `merge x merge` group of `patch x patch` pixel patches; with
B rows, L positions, P patch-group slots per row, S = merge**2 and F = patch**2 * 3:

| key | shape | dtype | meaning |
| --- | --- | --- | --- |
| `tokens` | (B, L) | int32 | text token ids (0 at visual positions and padding) |
| `token_kind` | (B, L) | int32 | TEXT, PATCH, CLASS or SPLIT (see below) |
| `patch_index` | (B, L) | int32 | row-local index into `patches` where kind == PATCH, else 0 |
| `positions` | (B, L) | int32 | RoPE positions, restarting at 0 for every example |
| `segment_ids` | (B, L) | int32 | example number within the row (1, 2, ...); 0 is padding |
| `targets` | (B, L) | int32 | the next token's id (what position t predicts) |
| `loss_weights` | (B, L) | float32 | 1 where the target is a supervised caption/answer |
| `patches` | (B, P, S, F) | uint8 | raw RGB pixels of each patch group, (y, x, channel) flattened |

EVEv1 (`model.vision_tokenizer='v1'`, evejax/models/vision_v1.py) adds a 4th pixel channel to
`patches` (F = patch**2 * 4), the valid-pixel mask: 255 on image pixels, 0 on the padding that
rounds a side up to a multiple of the visual token. Its global attention and PAL also need to know
which patch groups form one image, and PAL's online teacher where each group sits (V1_KEYS):

| key | shape | dtype | meaning |
| --- | --- | --- | --- |
| `patch_image` | (B, P) | int32 | row-local image number (1, 2, ... in order); 0 = empty slot |
| `patch_coords` | (B, P, 2) | int32 | (row, col) of the group in its image's visual-token grid |
| `teacher_features` | (B, P, c) | float32 | optional: a precomputed teacher feature per group |

`BatchSpec` is this table for one run: built once from the model and data config
(`evejax.config.TrainConfig.batch_spec`), it is what every producer (preprocessor, packer,
generation, synthetic batches) and consumer (FLOPs, plan, parity check) takes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Type names only: the models import this module.
  from evejax.models.config import ModelConfig

TEXT, PATCH, CLASS, SPLIT = 0, 1, 2, 3
IGNORE_INDEX = -100  # Reference label value excluded from the loss.
IMAGE_TOKEN_INDEX = -200  # Reference placeholder id where an image's visual tokens go.
IMAGE_PLACEHOLDER = '<image>'

KEYS = (
  'tokens',
  'token_kind',
  'patch_index',
  'positions',
  'segment_ids',
  'targets',
  'loss_weights',
  'patches',
)
V1_KEYS = ('patch_image', 'patch_coords')
SEQUENCE_KEYS = KEYS[:7]  # One value per position (the rest are per patch-group slot).


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The static shape of a batch row, and the image geometry that fills its patch slots."""

  seq_len: int  # L: positions per row.
  patch_slots: int  # P: patch-group slots per row.
  patch_size: int = 16
  merge: int = 2
  channels: int = 3  # Per pixel: RGB, or RGB + the valid-pixel mask (EVEv1).
  image_keys: bool = False  # The EVEv1 keys (V1_KEYS).
  teacher_size: int = 0  # c of `teacher_features` (offline PAL); 0 = no such key.
  max_size: int = 448  # Image area budget: the side of a square, in pixels.
  resize: str = 'eve_v2_train'  # Resize policy (evejax/data/images.py).
  pal_pool: int = 1  # EVEv1 HD: image sides round to pal_pool visual tokens.

  def __post_init__(self):
    if self.channels not in (3, 4):
      raise ValueError(f'BatchSpec.channels={self.channels}: 3 (RGB) or 4 (EVEv1: RGB + valid)')
    if self.resize == 'pad' and self.channels != 4:
      raise ValueError(
        "data.resize='pad' needs the valid-pixel channel of EVEv1 (model.vision_tokenizer='v1')"
      )

  @classmethod
  def for_model(
    cls, model: ModelConfig, *, seq_len: int, patch_slots: int, **image: object
  ) -> BatchSpec:
    """The spec of `model`'s batches: patch geometry, pixel channels, EVEv1 keys and HD pooling
    come from the model; `image` sets max_size, resize or teacher_size."""
    return cls(
      seq_len=seq_len,
      patch_slots=patch_slots,
      patch_size=model.vision_patch_size,
      merge=model.vision_merge,
      channels=model.vision_channels,
      image_keys=model.vision_tokenizer == 'v1',
      pal_pool=model.pal_pool,
      **image,
    )

  def replace(self, **changes) -> BatchSpec:
    return dataclasses.replace(self, **changes)

  @property
  def token_pixels(self) -> int:
    """Side in pixels of the square one visual token covers."""
    return self.patch_size * self.merge

  @property
  def resize_multiple(self) -> int:
    """Image sides are rounded to multiples of this (HD: a whole pal_pool x pal_pool block)."""
    return self.token_pixels * self.pal_pool

  @property
  def image_budget(self) -> int:
    """Visual tokens one image may need: the grid of a max_size x max_size image plus a rounding
    row and column (the train policy rounds sides to the nearest multiple). The inference rule
    (eve_v2_infer) scales every image to the area budget and rounds both sides up, so an elongated
    one needs up to twice the area (any aspect ratio up to 4 * side**2 : 1, e.g. 10000:1 at 1600
    px; a 4332x1000 photo needs 2625 tokens at 1600 px, over the square's 51**2)."""
    side = self.max_size // self.token_pixels
    if self.resize == 'eve_v2_infer':
      return max(2 * side * side, (side + 1) ** 2)
    return (side + 1) ** 2

  @property
  def patch_shape(self) -> tuple[int, int]:
    """(S, F) of one patch group."""
    return self.merge**2, self.patch_size**2 * self.channels

  def shapes(self, rows: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every key; `rows=None` describes one row (no batch axis)."""
    lead = () if rows is None else (rows,)
    out = {k: (lead + (self.seq_len,), np.dtype(np.int32)) for k in SEQUENCE_KEYS}
    out['loss_weights'] = (lead + (self.seq_len,), np.dtype(np.float32))
    out['patches'] = (lead + (self.patch_slots, *self.patch_shape), np.dtype(np.uint8))
    if self.image_keys:
      out['patch_image'] = (lead + (self.patch_slots,), np.dtype(np.int32))
      out['patch_coords'] = (lead + (self.patch_slots, 2), np.dtype(np.int32))
    if self.teacher_size:
      out['teacher_features'] = (lead + (self.patch_slots, self.teacher_size), np.dtype(np.float32))
    return out

  def zeros(self, rows: int | None = None) -> dict[str, np.ndarray]:
    """An empty batch (or row): no example, segment 0 and no loss weight everywhere."""
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes(rows).items()}
