"""From a tokenised conversation and its images to rows of the batch format (evejax/batch.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from evejax import batch as bf

SEQUENCE_KEYS = ('tokens', 'token_kind', 'patch_index', 'targets', 'loss_weights')


def visual_token_layout(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """Kinds and patch indices of one image's visual tokens: [CLASS] + rows x (cols PATCH + SPLIT).

  Length 1 + rows * (cols + 1), the reference layout of both EVE versions.
  """
  grid_kind = np.full((rows, cols + 1), bf.PATCH, np.int32)
  grid_kind[:, -1] = bf.SPLIT
  grid_index = np.zeros((rows, cols + 1), np.int32)
  grid_index[:, :-1] = np.arange(rows * cols).reshape(rows, cols)
  kind = np.concatenate([[bf.CLASS], grid_kind.ravel()]).astype(np.int32)
  index = np.concatenate([[0], grid_index.ravel()]).astype(np.int32)
  return kind, index


def encode_example(ids: Sequence[int], supervised: Sequence[bool],
                   images: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> dict[str, np.ndarray]:
  """Expands every IMAGE_TOKEN_INDEX into its visual tokens and shifts the labels.

  Args:
    ids: token ids with one IMAGE_TOKEN_INDEX per image.
    supervised: per id, whether it is a caption/answer token the loss should predict.
    images: per image, its patch groups (N, S, F) and grid (rows, cols), as from `patchify`.
  Returns:
    the sequence arrays of SEQUENCE_KEYS (length n) and `patches` (sum of N, S, F).
  """
  placeholders = sum(1 for i in ids if i == bf.IMAGE_TOKEN_INDEX)
  if placeholders != len(images):
    raise ValueError(f'the conversation has {placeholders} {bf.IMAGE_PLACEHOLDER} placeholders but '
                     f'{len(images)} images; every image needs exactly one placeholder')
  tokens, kinds, index, labelled = [], [], [], []
  image_iter, offset = iter(images), 0
  for token, is_target in zip(ids, supervised):
    if token != bf.IMAGE_TOKEN_INDEX:
      tokens.append(token), kinds.append(bf.TEXT), index.append(0), labelled.append(is_target)
      continue
    groups, (rows, cols) = next(image_iter)
    kind, local = visual_token_layout(rows, cols)
    tokens.extend([0] * len(kind)), kinds.extend(kind), labelled.extend([False] * len(kind))
    index.extend(np.where(kind == bf.PATCH, local + offset, 0))
    offset += len(groups)
  tokens = np.asarray(tokens, np.int32)
  labelled = np.asarray(labelled, bool)
  patches = [g for g, _ in images]
  return {
      'tokens': tokens,
      'token_kind': np.asarray(kinds, np.int32),
      'patch_index': np.asarray(index, np.int32),
      # Position t predicts token t+1; the last position predicts nothing.
      'targets': np.append(tokens[1:], 0).astype(np.int32),
      'loss_weights': np.append(labelled[1:], False).astype(np.float32),
      'patches': np.concatenate(patches) if patches else None,
  }


def pack_row(examples: Sequence[dict[str, np.ndarray]], seq_len: int, max_patches: int,
             patch_shape: tuple[int, int]) -> dict[str, np.ndarray]:
  """Lays examples end to end in one row of `seq_len` positions; segment ids keep them apart."""
  row = {k: np.zeros(seq_len, np.float32 if k == 'loss_weights' else np.int32)
         for k in SEQUENCE_KEYS + ('positions', 'segment_ids')}
  row['patches'] = np.zeros((max_patches, *patch_shape), np.uint8)
  start = patch_start = 0
  for segment, ex in enumerate(examples, start=1):
    n = len(ex['tokens'])
    n_patches = 0 if ex['patches'] is None else len(ex['patches'])
    if start + n > seq_len:
      raise ValueError(f'example of {n} tokens (visual tokens included) does not fit the '
                       f'{seq_len - start} positions left of data.seq_len={seq_len}; raise '
                       'data.seq_len or lower data.max_size')
    if patch_start + n_patches > max_patches:
      raise ValueError(f'{n_patches} visual tokens do not fit the {max_patches - patch_start} '
                       'patch slots left in the row; raise data.max_size')
    span = slice(start, start + n)
    for key in SEQUENCE_KEYS:
      row[key][span] = ex[key]
    row['patch_index'][span] += np.where(ex['token_kind'] == bf.PATCH, patch_start, 0)
    row['positions'][span] = np.arange(n)
    row['segment_ids'][span] = segment
    if n_patches:
      row['patches'][patch_start:patch_start + n_patches] = ex['patches']
    start, patch_start = start + n, patch_start + n_patches
  return row
