"""From a tokenised conversation and its images to rows of the batch format (evejax/batch.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evejax import batch as bf

# The per-position arrays an encoded example carries (`pack_row` adds positions and segment ids).
EXAMPLE_KEYS = ('tokens', 'token_kind', 'patch_index', 'targets', 'loss_weights')


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


def encode_example(
  ids: Sequence[int],
  supervised: Sequence[bool],
  images: Sequence[tuple[np.ndarray, tuple[int, int]]],
) -> dict[str, np.ndarray]:
  """Expands every IMAGE_TOKEN_INDEX into its visual tokens and shifts the labels.

  Args:
    ids: token ids with one IMAGE_TOKEN_INDEX per image.
    supervised: per id, whether it is a caption/answer token the loss should predict.
    images: per image, its patch groups (N, S, F) and grid (rows, cols), as from `patchify`.
  Returns:
    the sequence arrays of EXAMPLE_KEYS (length n), `patches` (sum of N, S, F), and per patch
    group its image number `patch_image` (1, 2, ...) and grid cell `patch_coords` (row, col).
  """
  placeholders = sum(1 for i in ids if i == bf.IMAGE_TOKEN_INDEX)
  if placeholders != len(images):
    raise ValueError(
      f'the conversation has {placeholders} {bf.IMAGE_PLACEHOLDER} placeholders but '
      f'{len(images)} images; every image needs exactly one placeholder'
    )
  tokens, kinds, index, labelled = [], [], [], []
  image_iter, offset, image_numbers, coords = iter(images), 0, [], []
  for token, is_target in zip(ids, supervised):
    if token != bf.IMAGE_TOKEN_INDEX:
      tokens.append(token), kinds.append(bf.TEXT), index.append(0), labelled.append(is_target)
      continue
    groups, (rows, cols) = next(image_iter)
    kind, local = visual_token_layout(rows, cols)
    tokens.extend([0] * len(kind)), kinds.extend(kind), labelled.extend([False] * len(kind))
    index.extend(np.where(kind == bf.PATCH, local + offset, 0))
    offset += len(groups)
    image_numbers.append(np.full(len(groups), len(image_numbers) + 1, np.int32))
    coords.append(np.stack(np.divmod(np.arange(rows * cols, dtype=np.int32), cols), axis=-1))
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
    'patch_image': np.concatenate(image_numbers) if patches else np.zeros(0, np.int32),
    'patch_coords': np.concatenate(coords) if patches else np.zeros((0, 2), np.int32),
  }


def cut_text(
  ids: Sequence[int], supervised: Sequence[bool], max_text_len: int
) -> tuple[Sequence[int], Sequence[bool], int]:
  """The reference's `model_max_length` cut (EVE_REFERENCE §2.4, §3.5): token ids (one per image
  placeholder) and their labels end after `max_text_len` ids, before any image expands; 0 = no
  cut. Returns the ids, labels and the number of ids cut."""
  if not max_text_len or len(ids) <= max_text_len:
    return ids, supervised, 0
  return ids[:max_text_len], supervised[:max_text_len], len(ids) - max_text_len


def cut_to_row(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray] | None:
  """An expanded example that is longer than a row, its text tail cut at `seq_len` positions (the
  last kept position then predicts nothing, as at the end of any example); None when the cut
  would split an image's visual tokens. The reference never cuts after expansion (its rows
  grow); configs make rows long enough (text budget + one image) so this is the exception."""
  if len(example['tokens']) <= seq_len:
    return example
  if (example['token_kind'][seq_len:] != bf.TEXT).any():
    return None
  cut = {key: example[key][:seq_len].copy() for key in EXAMPLE_KEYS}
  cut['targets'][-1], cut['loss_weights'][-1] = 0, 0.0
  return {**example, **cut}


def pack_row(
  examples: Sequence[dict[str, np.ndarray]], spec: bf.BatchSpec
) -> dict[str, np.ndarray]:
  """Lays examples end to end in one row of `spec`; segment ids keep them apart.

  The EVEv1 keys (`spec.image_keys`) and offline teacher features (`spec.teacher_size`) are filled
  from each example's fields of those names.
  """
  row = spec.zeros()
  seq_len, max_patches = spec.seq_len, spec.patch_slots
  start = patch_start = images_before = 0
  for segment, ex in enumerate(examples, start=1):
    n = len(ex['tokens'])
    n_patches = 0 if ex['patches'] is None else len(ex['patches'])
    if start + n > seq_len:
      raise ValueError(
        f'example of {n} tokens (visual tokens included) does not fit the '
        f'{seq_len - start} positions left of data.seq_len={seq_len}; raise '
        'data.seq_len or lower data.max_size'
      )
    if patch_start + n_patches > max_patches:
      raise ValueError(
        f'{n_patches} visual tokens do not fit the {max_patches - patch_start} '
        'patch slots left in the row; raise data.max_size'
      )
    span = slice(start, start + n)
    for key in EXAMPLE_KEYS:
      row[key][span] = ex[key]
    row['patch_index'][span] += np.where(ex['token_kind'] == bf.PATCH, patch_start, 0)
    row['positions'][span] = np.arange(n)
    row['segment_ids'][span] = segment
    if n_patches:
      groups = slice(patch_start, patch_start + n_patches)
      row['patches'][groups] = ex['patches']
      if spec.image_keys:
        row['patch_image'][groups] = ex['patch_image'] + images_before
        row['patch_coords'][groups] = ex['patch_coords']
        images_before += int(ex['patch_image'].max())
      if spec.teacher_size:
        row['teacher_features'][groups] = teacher_features(ex, n_patches, spec.teacher_size)
    start, patch_start = start + n, patch_start + n_patches
  return row


def teacher_features_at_anchors(
  features: np.ndarray | None, coords: np.ndarray, pool: int, size: int
) -> np.ndarray:
  """HD offline PAL: features of the teacher's grid (one per pool x pool block of visual tokens,
  row-major) placed at each block's top-left token (pal.block_anchors); other tokens get zeros."""
  anchors = (coords[:, 0] % pool == 0) & (coords[:, 1] % pool == 0)
  want = (int(anchors.sum()), size)
  if features is None or np.shape(features) != want:
    raise ValueError(
      f'offline PAL with model.pal_pool={pool} needs a teacher_features field of '
      f'shape {want} (one teacher vector per {pool}x{pool} block of visual tokens, '
      f'row-major: the features of the {pool}x smaller image), got '
      f'{None if features is None else np.shape(features)}'
    )
  out = np.zeros((len(coords), size), np.float32)
  out[anchors] = features
  return out


def teacher_features(example: dict[str, np.ndarray], n_patches: int, size: int) -> np.ndarray:
  """An example's precomputed teacher features, checked against its visual tokens."""
  features = example.get('teacher_features')
  if features is None or np.shape(features) != (n_patches, size):
    raise ValueError(
      f'offline PAL needs a teacher_features field of shape ({n_patches}, {size}) '
      f'(one teacher vector per visual token, row-major) in every image record, got '
      f'{None if features is None else np.shape(features)}; precompute it or set '
      "pal.teacher='online'"
    )
  return features
