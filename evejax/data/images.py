"""Image decoding, the EVE any-resolution resize policies, and patchify into patch groups."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
  from evejax.batch import BatchSpec

RESIZE_POLICIES = ('eve_v2_train', 'eve_v2_infer', 'eve_v1', 'pad', 'none')
# EVEv1 fills padding with int(255 * CLIP mean) per channel; the valid-pixel channel marks it.
V1_BACKGROUND = (122, 116, 104)


def decode_image(data: bytes) -> Image.Image:
  """Encoded bytes -> RGB image. Raises ValueError for empty, truncated or unreadable data."""
  if not data:
    raise ValueError('empty image bytes')
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'undecodable image: {e}') from e
  return image.convert('RGB')


def target_size(
  width: int, height: int, max_size: int, multiple: int, policy: str
) -> tuple[int, int]:
  """Output (width, height) of an image under one of the reference resize policies.

  eve_v2_train: scale down (never up) to an area of max_size**2, then round each side to the nearest
    multiple (Python's round-half-even), at least one multiple.
  eve_v2_infer: scale to an area of max_size**2 (also up), then round each side up to a multiple.
  eve_v1: the long side becomes max_size (also up), the short side keeps the aspect ratio rounded
    up to a multiple (the EVE-7B processor at 672 px: base 336 px sides, multiples of 14, doubled).
  pad: keep the size; `with_valid_channel` pads each side up to a multiple (EVEv1 only).
  none: keep the size; each side must already be a multiple.
  """
  ratio = math.sqrt(width * height) / max_size
  if policy == 'eve_v2_train':
    if ratio > 1:
      width, height = width / ratio, height / ratio
    return (max(round(width / multiple), 1) * multiple, max(round(height / multiple), 1) * multiple)
  if policy == 'eve_v2_infer':
    return (
      max(math.ceil(width / ratio / multiple), 1) * multiple,
      max(math.ceil(height / ratio / multiple), 1) * multiple,
    )
  if policy == 'eve_v1':
    if max_size % multiple:
      raise ValueError(
        f'data.max_size={max_size} must be a multiple of {multiple} px for '
        "data.resize='eve_v1' (the long side becomes max_size)"
      )
    long, short = max(width, height), min(width, height)
    short = min(max(math.ceil(max_size * short / long / multiple), 1) * multiple, max_size)
    return (max_size, short) if width >= height else (short, max_size)
  if policy == 'pad':
    return width, height
  if policy == 'none':
    if width % multiple or height % multiple:
      raise ValueError(
        f'image of {width}x{height} px is not a multiple of {multiple} px per side; '
        "use data.resize='eve_v2_train' or resize it beforehand"
      )
    return width, height
  raise ValueError(f'Unknown data.resize {policy!r}; available: {RESIZE_POLICIES}')


def resize(image: Image.Image, spec: BatchSpec) -> Image.Image:
  """`image` resized by the spec's policy, budget and multiple (HD: whole pal_pool blocks)."""
  size = target_size(image.width, image.height, spec.max_size, spec.resize_multiple, spec.resize)
  return image if size == image.size else image.resize(size, Image.BICUBIC)


def patch_groups(pixels: np.ndarray, spec: BatchSpec) -> tuple[np.ndarray, tuple[int, int]]:
  """Resized RGB pixels (H, W, 3) -> the spec's patch groups (N, S, F) and grid (rows, cols), with
  the valid-pixel channel when the spec has 4 channels (EVEv1)."""
  if spec.channels == 4:
    pixels = with_valid_channel(pixels, spec.token_pixels)
  groups, grid = patchify(pixels, spec.patch_size, spec.merge)
  if len(groups) > spec.image_budget:
    raise ValueError(
      f'image of {pixels.shape[1]}x{pixels.shape[0]} px needs {len(groups)} visual '
      f'tokens, over the budget of {spec.image_budget} for data.max_size='
      f"{spec.max_size}; resize it with data.resize='eve_v2_train' or raise "
      'data.max_size'
    )
  return groups, grid


def patchify(pixels: np.ndarray, patch: int, merge: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(H, W, C) uint8 -> patch groups (rows*cols, merge**2, patch**2*C) and the grid (rows, cols).

  Group order is row-major over visual tokens; inside a group sub-patches are row-major and each
  sub-patch is flattened (y, x, channel), matching the reference convolution kernels.
  """
  token = patch * merge
  height, width, channels = pixels.shape
  if height % token or width % token:
    raise ValueError(f'image of {width}x{height} px is not a multiple of {token} px per side')
  rows, cols = height // token, width // token
  x = pixels.reshape(rows, merge, patch, cols, merge, patch, channels)
  x = x.transpose(0, 3, 1, 4, 2, 5, 6)  # rows, cols, my, mx, py, px, c
  return x.reshape(rows * cols, merge * merge, patch * patch * channels), (rows, cols)


def with_valid_channel(pixels: np.ndarray, multiple: int) -> np.ndarray:
  """(H, W, 3) -> (H', W', 4), sides padded up to a multiple with the EVEv1 background at the
  bottom and right; channel 3 is 255 on image pixels and 0 on padding (the reference's mask)."""
  height, width, _ = pixels.shape
  out = np.empty((-(-height // multiple) * multiple, -(-width // multiple) * multiple, 4), np.uint8)
  out[..., :3] = V1_BACKGROUND
  out[..., 3] = 0
  out[:height, :width, :3] = pixels
  out[:height, :width, 3] = 255
  return out
