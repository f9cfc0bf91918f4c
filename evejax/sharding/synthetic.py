"""Random batches of a `BatchSpec` (evejax/batch.py) for sharding tests and benchmarks, and their
abstract shapes for ahead-of-time compilation (evejax.plan)."""

from __future__ import annotations

import math

import jax
import numpy as np

from evejax import batch as batch_format
from evejax.batch import BatchSpec


def batch_shapes(spec: BatchSpec, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every key of the spec (no data), e.g. for `jax.jit(...).lower`."""
  return {
    k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.shapes(batch_size).items()
  }


def random_batch(
  spec: BatchSpec, batch_size: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Mixed rows: row 0 has no image, row 1 is all image (patch tokens), the others are text with
  one image span (a class token, patch tokens, a split token) at a random place; padding at the end.
  Every row's patch slots form one image (EVEv1 keys: image 1, row-major on a square-ish grid)."""
  rng = np.random.default_rng(seed)
  seq_len, slots = spec.seq_len, spec.patch_slots
  b = spec.zeros(batch_size)
  b['patches'] = rng.integers(0, 256, b['patches'].shape, dtype=np.uint8)
  if spec.channels == 4:
    b['patches'][..., 3::4] = 255  # Every pixel valid.
  if spec.image_keys:
    cols = math.ceil(math.sqrt(slots))
    b['patch_image'][:] = 1
    b['patch_coords'][:] = np.stack(np.divmod(np.arange(slots), cols), axis=-1)
  if spec.teacher_size:
    b['teacher_features'] = rng.standard_normal(b['teacher_features'].shape).astype(np.float32)
  for r in range(batch_size):
    length = seq_len if r < 2 else int(rng.integers(seq_len // 2, seq_len + 1))
    kind = np.full(length, batch_format.TEXT, np.int32)
    if r == 1:
      kind[:] = batch_format.PATCH
    elif r > 1:
      num_patches = int(rng.integers(1, min(slots, length - 2) + 1))
      start = int(rng.integers(0, length - num_patches - 1))
      kind[start] = batch_format.CLASS
      kind[start + 1 : start + 1 + num_patches] = batch_format.PATCH
      kind[start + 1 + num_patches] = batch_format.SPLIT
    patch = kind == batch_format.PATCH
    b['token_kind'][r, :length] = kind
    b['patch_index'][r, :length][patch] = np.arange(patch.sum()) % slots
    b['tokens'][r, :length] = np.where(patch, 0, rng.integers(1, vocab_size, length))
    b['positions'][r, :length] = np.arange(length)
    b['segment_ids'][r, :length] = 1
    b['targets'][r, :length] = rng.integers(0, vocab_size, length)
    b['loss_weights'][r, :length] = rng.random(length) < 0.7
  return b
