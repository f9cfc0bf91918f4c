import io
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # noqa: E402

from evejax.models import ModelConfig  # noqa: E402

TINY = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10000.0,
  vision_patch_size=4,
  vision_merge=2,
  vision_hidden_size=12,
)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
  return ModelConfig(**TINY)


def train_sentencepiece(corpus, vocab_size: int) -> bytes:
  """A SentencePiece `tokenizer.model` trained as Llama's (BPE, byte fallback, dummy prefix,
  digits split, ids unk 0 / bos 1 / eos 2); a corpus without newlines gives `\\n` as <0x0A>."""
  sentencepiece = pytest.importorskip('sentencepiece')
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_writer=model,
    vocab_size=vocab_size,
    model_type='bpe',
    byte_fallback=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    normalization_rule_name='identity',
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
  )
  return model.getvalue()
