"""Grain input pipeline: records -> decoded, resized, patchified, tokenised rows -> batches."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from evejax.data import encode, images, templates
from evejax.data.shapes import ShapesDataset
from evejax.data.tokenizer import Tokenizer, train_bpe

DEMO_TOKENIZER_VOCAB = 512


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """One record (LLaVA layout: `image` bytes, `conversations`) -> one padded row of the batch format."""
  tokenizer: Tokenizer
  template: templates.Template
  patch_size: int
  merge: int
  max_size: int
  seq_len: int
  resize: str = 'eve_v2_train'
  blank_images: bool = False  # Ablation: keep the layout, erase the pixels.

  @property
  def token_pixels(self) -> int:
    return self.patch_size * self.merge

  @property
  def max_patches(self) -> int:
    return images.max_patch_groups(self.max_size, self.token_pixels)

  @property
  def patch_shape(self) -> tuple[int, int]:
    return self.merge ** 2, self.patch_size ** 2 * 3

  def image_patches(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    image = images.resize(images.decode_image(data), self.max_size, self.token_pixels, self.resize)
    pixels = np.asarray(image, np.uint8)
    if self.blank_images:
      pixels = np.zeros_like(pixels)
    groups, grid = images.patchify(pixels, self.patch_size, self.merge)
    if len(groups) > self.max_patches:
      raise ValueError(f'image of {image.width}x{image.height} px needs {len(groups)} visual tokens, '
                       f'over the budget of {self.max_patches} for data.max_size={self.max_size}; '
                       "resize it with data.resize='eve_v2_train' or raise data.max_size")
    return groups, grid

  def encode(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The unpadded sequence arrays of one record."""
    ids, supervised = templates.tokenize_conversation(record['conversations'], self.tokenizer,
                                                      self.template)
    image_bytes = record.get('image')
    image_list = [] if image_bytes is None else [self.image_patches(image_bytes)]
    return encode.encode_example(ids, supervised, image_list)

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return encode.pack_row([self.encode(record)], self.seq_len, self.max_patches, self.patch_shape)


def batches(source, preprocess: Preprocessor, batch_size: int, *, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, num_threads: int = 2) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), preprocessed, batched rows; `num_epochs=None` repeats forever."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(preprocess).batch(batch_size, drop_remainder=shuffle)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))


def make_sources(data_cfg) -> tuple[Any, Any]:
  """Train and held-out sources named by `data.source`."""
  if data_cfg.source != 'shapes':
    raise ValueError(f"Unknown data.source {data_cfg.source!r}; available: 'shapes'")
  kw = dict(data_cfg.shapes)
  kw['question_kinds'] = tuple(kw['question_kinds'].split(','))
  # Held-out examples come from another seed, so they are images the model never saw.
  return (ShapesDataset(data_cfg.num_train, data_cfg.seed, **kw),
          ShapesDataset(data_cfg.num_eval, data_cfg.seed + 1_000_003, **kw))


def load_tokenizer(data_cfg, source) -> Tokenizer:
  """`data.tokenizer` (a tokenizer.json or HF folder), or for the demo a BPE trained on its corpus."""
  if data_cfg.tokenizer:
    return Tokenizer.load(data_cfg.tokenizer)
  return train_bpe(source.corpus(), DEMO_TOKENIZER_VOCAB)


def make_preprocessor(data_cfg, tokenizer: Tokenizer, patch_size: int, merge: int, *,
                      blank_images: bool | None = None) -> Preprocessor:
  return Preprocessor(
      tokenizer=tokenizer, template=templates.get_template(data_cfg.template),
      patch_size=patch_size, merge=merge, max_size=data_cfg.max_size, seq_len=data_cfg.seq_len,
      resize=data_cfg.resize,
      blank_images=data_cfg.blank_images if blank_images is None else blank_images)
