"""Random batches in the evejax batch format (evejax/batch.py) for sharding tests and benchmarks,
and their abstract shapes for ahead-of-time compilation (evejax.plan)."""
from __future__ import annotations

import jax
import numpy as np

from evejax import batch as batch_format
from evejax.models.config import ModelConfig


def batch_shapes(cfg: ModelConfig, batch_size: int, seq_len: int,
                 num_patch_groups: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every batch key (no data), e.g. for `jax.jit(...).lower`."""
  row = (batch_size, seq_len)
  patches = (batch_size, num_patch_groups, cfg.vision_merge ** 2, cfg.vision_patch_size ** 2 * 3)
  shapes = {k: jax.ShapeDtypeStruct(row, np.int32) for k in batch_format.KEYS}
  shapes['loss_weights'] = jax.ShapeDtypeStruct(row, np.float32)
  shapes['patches'] = jax.ShapeDtypeStruct(patches, np.uint8)
  return shapes


def random_batch(cfg: ModelConfig, batch_size: int, seq_len: int, num_patch_groups: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """Mixed rows: row 0 has no image, row 1 is all image (patch tokens), the others are text with
  one image span (a class token, patch tokens, a split token) at a random place; padding at the end.
  """
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(cfg, batch_size, seq_len, num_patch_groups)
  b = {k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}
  b['patches'] = rng.integers(0, 256, shapes['patches'].shape, dtype=np.uint8)
  for r in range(batch_size):
    length = seq_len if r < 2 else int(rng.integers(seq_len // 2, seq_len + 1))
    kind = np.full(length, batch_format.TEXT, np.int32)
    if r == 1:
      kind[:] = batch_format.PATCH
    elif r > 1:
      num_patches = int(rng.integers(1, min(num_patch_groups, length - 2) + 1))
      start = int(rng.integers(0, length - num_patches - 1))
      kind[start] = batch_format.CLASS
      kind[start + 1:start + 1 + num_patches] = batch_format.PATCH
      kind[start + 1 + num_patches] = batch_format.SPLIT
    patch = kind == batch_format.PATCH
    b['token_kind'][r, :length] = kind
    b['patch_index'][r, :length][patch] = np.arange(patch.sum()) % num_patch_groups
    b['tokens'][r, :length] = np.where(patch, 0, rng.integers(1, cfg.vocab_size, length))
    b['positions'][r, :length] = np.arange(length)
    b['segment_ids'][r, :length] = 1
    b['targets'][r, :length] = rng.integers(0, cfg.vocab_size, length)
    b['loss_weights'][r, :length] = rng.random(length) < 0.7
  return b
