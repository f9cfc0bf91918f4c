"""Tokenizers: any HF `tokenizer.json` from a local path, and the demo tokenizer (own corpus)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from evejax import storage

PAD_TOKEN = '<|endoftext|>'  # Qwen2.5's pad token; the demo tokenizer reuses Qwen's special names.
EOS_TOKEN = '<|im_end|>'


def _token_content(value) -> str | None:
  """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
  if isinstance(value, dict):
    return value.get('content')
  return value


class Tokenizer:
  """A `tokenizers.Tokenizer` with the special tokens EVE needs (eos/turn end, pad, maybe bos)."""

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
  ):
    self.backend = tokenizer
    self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
    self.eos_id = self._id(eos_token)
    self.pad_id = self._id(pad_token)
    self.bos_id = self._id(bos_token) if bos_token else None

  def _id(self, token: str) -> int:
    token_id = self.backend.token_to_id(token)
    if token_id is None:
      raise ValueError(
        f'Special token {token!r} is not in the tokenizer vocabulary; set it in '
        'tokenizer_config.json next to tokenizer.json'
      )
    return token_id

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Loads `tokenizer.json` (a file, or a folder holding it and maybe `tokenizer_config.json`)."""
    folder, file = (
      (path, os.path.join(path, 'tokenizer.json'))
      if storage.isdir(path)
      else (os.path.dirname(path), path)
    )
    if not storage.exists(file):
      raise FileNotFoundError(
        f'No tokenizer.json at {file}; pass a tokenizer.json file or the folder of a HF tokenizer'
      )
    special = {'eos_token': EOS_TOKEN, 'pad_token': PAD_TOKEN, 'bos_token': None}
    config_file = os.path.join(folder, 'tokenizer_config.json')
    if storage.exists(config_file):
      config = json.loads(storage.read_text(config_file))
      for key in special:
        if _token_content(config.get(key)):
          special[key] = _token_content(config[key])
      if not config.get('add_bos_token', special['bos_token'] is not None):
        special['bos_token'] = None
    if special['pad_token'] is None:
      special['pad_token'] = special['eos_token']
    return cls(tokenizers.Tokenizer.from_str(storage.read_text(file)), **special)

  def save(self, folder: str) -> None:
    storage.makedirs(folder)
    storage.write_atomic(os.path.join(folder, 'tokenizer.json'), self.backend.to_str(pretty=True))
    config = {
      'eos_token': self.eos_token,
      'pad_token': self.pad_token,
      'bos_token': self.bos_token,
      'add_bos_token': self.bos_token is not None,
    }
    storage.write_atomic(
      os.path.join(folder, 'tokenizer_config.json'), json.dumps(config, indent=2)
    )

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens in the text (e.g. `<|im_end|>`) map to their ids."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=False)


def train_bpe(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
  """Byte-level BPE (the Qwen2 scheme) trained on `corpus`; deterministic for a given corpus."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[PAD_TOKEN, EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus, trainer=trainer)
  return Tokenizer(tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
