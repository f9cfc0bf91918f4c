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
  """Encoded bytes -> RGB image (`to_rgb`). Raises ValueError for empty, truncated, unreadable
  data or a pixel format `to_rgb` cannot convert."""
  if not data:
    raise ValueError('empty image bytes')
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'undecodable image: {e}') from e
  return to_rgb(image)


# Modes with an alpha channel (or a transparent palette entry): composited over white, the page
# a viewer shows them on, so fully transparent pixels never train as whatever colour they hide.
_ALPHA_MODES = ('LA', 'La', 'PA', 'RGBA', 'RGBa')
# Modes Pillow's own convert('RGB') maps correctly (8 bit per channel).
_DIRECT_MODES = ('RGB', 'RGBX', 'L', '1', 'P', 'YCbCr')
_WHITE = 255


def to_rgb(image: Image.Image) -> Image.Image:
  """Any decoded image -> 8-bit RGB showing what the file shows, or ValueError('unsupported image
  mode ...') (a `bad_image` record) for a pixel format without a defined conversion.

  Pillow's `convert('RGB')` clips high-bit-depth pixels at 255 (a 16-bit greyscale PNG turns
  white) and computes CMYK as 255 - (C + K), so those are converted here:
    I;16*: 16-bit greyscale, scaled by 255 / 65535;
    I: 32-bit integer greyscale holding 16-bit values (0..65535, older Pillow's 16-bit PNGs),
      scaled alike; other values are unsupported;
    F: float greyscale in [0, 1], scaled by 255; other values are unsupported;
    CMYK: R = 255 (1 - C/255)(1 - K/255), likewise G from M and B from Y.
  """
  mode = image.mode
  if mode == 'P' and 'transparency' in image.info:
    image, mode = image.convert('RGBA'), 'RGBA'
  if mode in _ALPHA_MODES:
    rgba = image.convert('RGBA')  # Premultiplied La / RGBa are un-multiplied here.
    background = Image.new('RGBA', rgba.size, (_WHITE,) * 4)
    return Image.alpha_composite(background, rgba).convert('RGB')
  if mode in _DIRECT_MODES:
    return image if mode == 'RGB' else image.convert('RGB')
  if mode == 'CMYK':
    cmyk = np.asarray(image, np.float64) / 255
    rgb = 255 * (1 - cmyk[..., :3]) * (1 - cmyk[..., 3:])
    return Image.fromarray(np.rint(rgb).astype(np.uint8), 'RGB')
  if mode.startswith('I;16') or mode in ('I', 'F'):
    grey = np.asarray(image)
    top = 1.0 if mode == 'F' else 65535
    if grey.size and not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= top):
      raise ValueError(
        f'unsupported image mode {mode}: values {grey.min()}..{grey.max()} outside 0..{top} '
        '(convert the image to 8 or 16 bit per channel)'
      )
    grey = np.rint(grey.astype(np.float64) * (255 / top)).astype(np.uint8)
    return Image.fromarray(grey, 'L').convert('RGB')
  raise ValueError(f'unsupported image mode {mode} (convert the image to RGB)')


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
    height, width = pixels.shape[:2]
    if spec.resize in ('none', 'pad'):  # The size is kept: a resizing policy brings it down.
      fix = "resize it with data.resize='eve_v2_train' or raise data.max_size"
    else:  # Resized to the area budget, but each side is at least one token: an extreme ratio.
      fix = (
        f'its aspect ratio of {max(width, height) / min(width, height):.0f}:1 is too extreme '
        f'for data.resize={spec.resize!r} at this budget (each side keeps at least one '
        'token), so the record is skipped; a larger data.max_size keeps such images'
      )
    raise ValueError(
      f'image of {width}x{height} px needs {len(groups)} visual tokens, over the budget of '
      f'{spec.image_budget} for data.max_size={spec.max_size}; {fix}'
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
