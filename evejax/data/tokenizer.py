"""Tokenizers: a HF `tokenizer.json` (Qwen2), a SentencePiece `tokenizer.model` (Llama / Vicuna,
EVEv1), and the demo tokenizer (a BPE trained on its own corpus).

`Tokenizer.encode` never adds BOS (the templates place it once, at the front); special tokens
written in the text map to their ids.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from evejax import storage

PAD_TOKEN = '<|endoftext|>'  # Qwen2.5's pad token; the demo tokenizer reuses Qwen's special names.
EOS_TOKEN = '<|im_end|>'
HF_FILE, SENTENCEPIECE_FILE, CONFIG_FILE = (
  'tokenizer.json',
  'tokenizer.model',
  'tokenizer_config.json',
)


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

  def _lookup(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def _id(self, token: str) -> int:
    token_id = self._lookup(token)
    if token_id is None:
      raise ValueError(
        f'Special token {token!r} is not in the tokenizer vocabulary; set it in '
        f'{CONFIG_FILE} next to the tokenizer file'
      )
    return token_id

  @staticmethod
  def load(path: str) -> Tokenizer:
    """A tokenizer file (`tokenizer.json` or a SentencePiece `.model`) or a folder holding one, with
    its special tokens from the `tokenizer_config.json` beside it. A folder with `tokenizer.model`
    loads it (the slow Llama tokenizer the EVEv1 reference uses), else its `tokenizer.json`."""
    if storage.isdir(path):
      folder = path
      names = [n for n in (SENTENCEPIECE_FILE, HF_FILE) if storage.exists(os.path.join(path, n))]
      if not names:
        raise FileNotFoundError(
          f'No {HF_FILE} or {SENTENCEPIECE_FILE} in {path}; pass a tokenizer file or the folder of '
          'a HF tokenizer'
        )
      file = os.path.join(path, names[0])
    else:
      folder, file = os.path.dirname(path), path
      if not storage.exists(file):
        raise FileNotFoundError(
          f'No tokenizer at {file}; pass a {HF_FILE} or {SENTENCEPIECE_FILE} file or the folder of '
          'a HF tokenizer'
        )
    config_file = os.path.join(folder, CONFIG_FILE)
    config = json.loads(storage.read_text(config_file)) if storage.exists(config_file) else {}
    if file.endswith('.model'):
      return SentencePieceTokenizer.from_file(file, config)
    defaults = {'eos_token': EOS_TOKEN, 'pad_token': PAD_TOKEN, 'bos_token': None}
    return Tokenizer(
      tokenizers.Tokenizer.from_str(storage.read_text(file)), **_special_tokens(config, defaults)
    )

  def save(self, folder: str) -> None:
    storage.makedirs(folder)
    storage.write_atomic(os.path.join(folder, HF_FILE), self.backend.to_str(pretty=True))
    self._save_config(folder)

  def _save_config(self, folder: str) -> None:
    config = {
      'eos_token': self.eos_token,
      'pad_token': self.pad_token,
      'bos_token': self.bos_token,
      'add_bos_token': self.bos_token is not None,
    }
    storage.write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens in the text (e.g. `<|im_end|>`) map to their ids."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_segments(self, texts: Sequence[str]) -> list[list[int]]:
    """The ids of consecutive texts (a conversation's turns), one list per text, as the whole
    `''.join(texts)` tokenises. A byte-level BPE splits words where the templates cut them (before
    a space, at a special token), so each text is encoded on its own."""
    return [self.encode(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=False)


def _special_tokens(config: dict, defaults: dict, *, add_bos: bool | None = None) -> dict:
  """eos/pad/bos token strings: `defaults` replaced by what tokenizer_config.json (`config`) sets;
  no bos unless `add_bos_token` (default: `add_bos`, else whether a bos token is named) says the
  tokenizer puts one in front; pad defaults to eos."""
  special = dict(defaults)
  for key in special:
    if _token_content(config.get(key)):
      special[key] = _token_content(config[key])
  if not config.get(
    'add_bos_token', special['bos_token'] is not None if add_bos is None else add_bos
  ):
    special['bos_token'] = None
  if special['pad_token'] is None:
    special['pad_token'] = special['eos_token']
  return special


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model as Llama's (slow, `legacy`) tokenizer uses it, the EVEv1 reference's:
  BOS `<s>` in front (tokenizer_config.json `add_bos_token`, default true), no EOS added; the text
  is split at special tokens and every other piece encoded on its own, so each gets the model's
  dummy-prefix space (the chunk after `<image>`, `\\n...`, starts `▁`, `<0x0A>` as in LLaVA-1.5);
  pad is `<unk>`, as the reference sets it."""

  @classmethod
  def from_file(cls, path: str, config: dict) -> SentencePieceTokenizer:
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel (only EVEv1 / Llama need it)
    except ImportError:
      raise ImportError(
        f'{path} is a SentencePiece tokenizer: pip install sentencepiece (evejax[convert])'
      ) from None
    processor = sentencepiece.SentencePieceProcessor(model_proto=storage.read_bytes(path))
    unk = _token_content(config.get('unk_token')) or processor.id_to_piece(processor.unk_id())
    defaults = {'eos_token': '</s>', 'pad_token': unk, 'bos_token': '<s>'}
    return cls(processor, **_special_tokens(config, defaults, add_bos=True))

  def __init__(self, processor, **special):  # a sentencepiece.SentencePieceProcessor
    super().__init__(processor, **special)
    specials = {
      processor.id_to_piece(i): i
      for i in range(processor.get_piece_size())
      if processor.is_control(i) or processor.is_unknown(i)
    }
    self._special_ids = {k: v for k, v in specials.items() if k}
    longest_first = sorted(self._special_ids, key=len, reverse=True)
    self._special_split = (
      re.compile('(' + '|'.join(map(re.escape, longest_first)) + ')') if longest_first else None
    )

  def _lookup(self, token: str) -> int | None:
    token_id = self.backend.piece_to_id(token)
    return token_id if self.backend.id_to_piece(token_id) == token else None

  def save(self, folder: str) -> None:
    storage.makedirs(folder)
    storage.write_atomic(
      os.path.join(folder, SENTENCEPIECE_FILE), self.backend.serialized_model_proto()
    )
    self._save_config(folder)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.encode_segments([text])[0]

  def encode_segments(self, texts: Sequence[str]) -> list[list[int]]:
    """The whole `''.join(texts)` tokenised (as the reference tokenises a conversation: one
    string), each piece going to the text it starts in. Encoding the texts on their own would
    give each a dummy-prefix space (` a1</s>` -> `▁`, `▁a1` instead of `▁a1`)."""
    ends = list(itertools.accumulate(len(text.encode()) for text in texts))  # byte offsets
    out: list[list[int]] = [[] for _ in texts]
    offset = 0
    joined = ''.join(texts)
    for chunk in self._special_split.split(joined) if self._special_split else [joined]:
      if chunk in self._special_ids:
        pieces = [(self._special_ids[chunk], 0)]
      else:
        pieces = [(piece.id, piece.begin) for piece in self._pieces(chunk)] if chunk else []
      for token_id, begin in pieces:
        out[min(bisect.bisect_right(ends, offset + begin), len(texts) - 1)].append(token_id)
      offset += len(chunk.encode())
    return out

  def _pieces(self, text: str):
    """SentencePiece pieces of `text` with their byte offsets (`begin`) in it."""
    try:
      return self.backend.encode(text, return_type='proto').pieces
    except TypeError:  # sentencepiece < 0.2.1
      return self.backend.encode(text, out_type='immutable_proto').pieces

  def decode(self, ids: Iterable[int]) -> str:
    return self.backend.decode(list(ids))


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
