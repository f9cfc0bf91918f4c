"""The released models' tokenizers, built small in the tests: a Qwen2-style `tokenizer.json`
(EVEv2) and a Llama-style SentencePiece `tokenizer.model` (Vicuna, EVEv1). Prompt ids are checked
against the reference's rule, written out here independently: the conversation template's
`get_prompt()` string, cut at `<image>`, each chunk tokenised by the HF tokenizer
(`tokenizer_image_token`, EVE_REFERENCE.md §1.2)."""

import json

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from evejax.batch import IMAGE_TOKEN_INDEX
from evejax.data import templates
from evejax.data.tokenizer import SentencePieceTokenizer, Tokenizer
from evejax.inference import official
from evejax.inference.prompts import prompt_ids
from tests.conftest import train_sentencepiece

SYSTEM = (  # conv_qwen_v2 / conv_vicuna_v1 system prompt, copied from the reference
  'A chat between a curious user and an artificial intelligence assistant. '
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
  SYSTEM,
  'USER: What is in the image? ASSISTANT: A red circle and a blue square.',
  'USER: How many shapes are there? ASSISTANT: Three shapes: 1 circle, 2 squares.',
  "What's the colour of the triangle? It is green, isn't it?",
] * 10
# Qwen2's pre-tokenizer split (its tokenizer.json).
QWEN_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
  r'\s*[\r\n]+|\s+(?!\S)|\s+'
)
QWEN_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
TURNS = [('what is in the image?', 'a red circle.'), ("how many shapes? isn't it 3?", 'two.')]


def reference_prompt(sep2: str, questions: list[str], answers: list[str]) -> str:
  """`Conversation.get_prompt()` of SeparatorStyle.TWO (vicuna_v1, qwen2), the image first."""
  messages = []
  for i, question in enumerate(questions):
    messages.append(('USER', ('<image>\n' if i == 0 else '') + question))
    messages.append(('ASSISTANT', answers[i] if i < len(answers) else None))
  seps, text = (' ', sep2), SYSTEM + ' '
  for i, (role, message) in enumerate(messages):
    text += f'{role}: {message}{seps[i % 2]}' if message else f'{role}:'
  return text


def tokenizer_image_token(prompt: str, encode, bos_id: int | None) -> list[int]:
  """The reference's rule: chunks tokenised with special tokens; one BOS kept, in front."""
  chunks = [encode(chunk) for chunk in prompt.split('<image>')]
  offset = 1 if bos_id is not None and chunks[0] and chunks[0][0] == bos_id else 0
  ids = chunks[0][:1] if offset else []
  for i, chunk in enumerate(chunks):
    ids += ([IMAGE_TOKEN_INDEX] if i else []) + chunk[offset:]
  return ids


def evejax_prompts(tokenizer: Tokenizer, template: str) -> list[list[int]]:
  """Prompt ids of turn 1 and of turn 2 (after turn 1's answer)."""
  template = templates.get_template(template)
  return [
    prompt_ids(TURNS[k][0], tokenizer, template, with_image=True, history=TURNS[:k])
    for k in range(len(TURNS))
  ]


def reference_prompts(sep2: str, encode, bos_id) -> list[list[int]]:
  questions, answers = [q for q, _ in TURNS], [a for _, a in TURNS]
  return [
    tokenizer_image_token(reference_prompt(sep2, questions[: k + 1], answers[:k]), encode, bos_id)
    for k in range(len(TURNS))
  ]


@pytest.fixture(scope='module')
def qwen_folder(tmp_path_factory):
  """A Qwen2-style tokenizer folder: byte-level BPE behind Qwen2's split, its special tokens and
  tokenizer_config.json (no BOS, eos <|im_end|>, pad <|endoftext|>)."""
  folder = tmp_path_factory.mktemp('qwen')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(QWEN_PATTERN), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=QWEN_SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer=trainer)
  tok.save(str(folder / 'tokenizer.json'))
  config = {'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}
  (folder / 'tokenizer_config.json').write_text(json.dumps(config))
  return folder


def test_qwen2_prompt_ids_follow_the_reference(qwen_folder):
  tokenizer = Tokenizer.load(str(qwen_folder))
  assert tokenizer.bos_id is None
  assert tokenizer.eos_id == tokenizer.encode('<|im_end|>')[0] == QWEN_SPECIALS.index('<|im_end|>')
  assert tokenizer.pad_id == QWEN_SPECIALS.index('<|endoftext|>')
  hf = tokenizers.Tokenizer.from_file(str(qwen_folder / 'tokenizer.json'))
  expected = reference_prompts('<|im_end|>', lambda text: hf.encode(text).ids, None)
  assert evejax_prompts(tokenizer, official.TEMPLATES['qwen2']) == expected
  assert expected[1].count(tokenizer.eos_id) == 1  # turn 1's answer ends with <|im_end|>
  transformers = pytest.importorskip('transformers')
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_folder / 'tokenizer.json'))
  assert reference_prompts('<|im_end|>', lambda text: fast(text).input_ids, None) == expected


@pytest.fixture(scope='module')
def llama_folder(tmp_path_factory):
  """A SentencePiece BPE trained as Llama's (byte fallback, dummy prefix, digits split, no
  newline piece: `\\n` is `<0x0A>`), with Vicuna's tokenizer_config.json."""
  folder = tmp_path_factory.mktemp('llama')
  (folder / 'tokenizer.model').write_bytes(train_sentencepiece(CORPUS, 420))
  config = {
    'add_bos_token': True,
    'add_eos_token': False,
    'bos_token': {'content': '<s>', 'lstrip': False, 'rstrip': False},
    'eos_token': {'content': '</s>', 'lstrip': False, 'rstrip': False},
    'unk_token': {'content': '<unk>', 'lstrip': False, 'rstrip': False},
    'pad_token': None,
    'legacy': True,
  }
  (folder / 'tokenizer_config.json').write_text(json.dumps(config))
  return folder


def test_sentencepiece_special_tokens_and_round_trip(llama_folder, tmp_path):
  tokenizer = Tokenizer.load(str(llama_folder))
  assert isinstance(tokenizer, SentencePieceTokenizer)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)  # pad = <unk>
  assert tokenizer.vocab_size == 420
  text = 'USER: What is in the image? ASSISTANT: A red circle.'
  assert tokenizer.decode(tokenizer.encode(text)) == text
  # Special tokens written in the text are their ids; the text after one gets the dummy prefix.
  ids = tokenizer.encode('a red circle.</s>USER:')
  assert ids[ids.index(2) + 1 :] == tokenizer.encode('USER:')
  assert tokenizer.backend.id_to_piece(tokenizer.encode('USER:')[0]).startswith('▁')
  # Newlines fall back to bytes; the chunk after the image starts `▁`, `<0x0A>` (LLaVA-1.5).
  assert [tokenizer.backend.id_to_piece(i) for i in tokenizer.encode('\nWhat')[:2]] == [
    '▁',
    '<0x0A>',
  ]
  tokenizer.save(str(tmp_path))
  again = Tokenizer.load(str(tmp_path))
  assert again.encode(text) == tokenizer.encode(text) and again.bos_id == 1


def test_sentencepiece_segments_tokenise_as_one_string(llama_folder):
  """A conversation is tokenised whole, as the reference does, whatever the segments."""
  tokenizer = Tokenizer.load(str(llama_folder))
  texts = ['USER: hi ASSISTANT:', ' a red circle.</s>', 'USER: two é?', ' ', '', 'x']
  segments = tokenizer.encode_segments(texts)
  assert sum(segments, []) == tokenizer.encode(''.join(texts))
  assert segments[1][-1] == tokenizer.eos_id and segments[4] == []
  assert tokenizer.backend.id_to_piece(segments[1][0]) == '▁a'


def test_vicuna_prompt_ids_follow_the_reference(llama_folder):
  tokenizer = Tokenizer.load(str(llama_folder))
  got = evejax_prompts(tokenizer, official.TEMPLATES['llama'])
  assert [prompt[0] for prompt in got] == [tokenizer.bos_id] * len(got)
  transformers = pytest.importorskip('transformers')
  path = str(llama_folder / 'tokenizer.model')
  if int(transformers.__version__.split('.')[0]) < 5:  # the reference's slow LlamaTokenizer
    slow = transformers.LlamaTokenizer(vocab_file=path, legacy=True)
  else:  # transformers 5 keeps the SentencePiece (slow) path as a backend class
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    slow = SentencePieceBackend(
      vocab_file=path, legacy=True, bos_token='<s>', eos_token='</s>', unk_token='<unk>'
    )
  assert slow.convert_tokens_to_ids(['<s>', '</s>', '<unk>']) == [1, 2, 0]

  def encode(text):  # the slow tokenizer with add_bos_token=True (Vicuna's config)
    return [slow.bos_token_id] + slow(text, add_special_tokens=False).input_ids

  assert got == reference_prompts('</s>', encode, slow.bos_token_id)
