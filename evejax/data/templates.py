"""Conversation templates and label masking (loss on caption / assistant tokens only).

A conversation is tokenised segment by segment, each segment carrying its own "supervised" flag,
which gives the reference's masks without its re-tokenise-and-count bookkeeping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from evejax.batch import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from evejax.data.tokenizer import Tokenizer

VICUNA_SYSTEM = (
  'A chat between a curious user and an artificial intelligence assistant. '
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class Template:
  """`{system}{sep}USER: {q1} ASSISTANT: {a1}{sep2}USER: ...`; plain templates: captions only."""

  name: str
  system: str = ''
  roles: tuple[str, str] = ('USER', 'ASSISTANT')
  sep: str = ' '
  sep2: str = ''
  plain: bool = False


TEMPLATES = {
  'plain': Template('plain', sep='\n', plain=True),
  'qwen2': Template('qwen2', system=VICUNA_SYSTEM, sep2='<|im_end|>'),
  'vicuna_v1': Template('vicuna_v1', system=VICUNA_SYSTEM, sep2='</s>'),
  'chat': Template('chat', sep2='<|im_end|>'),  # qwen2 without the system prompt (demo).
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f'Unknown template {name!r}; available: {sorted(TEMPLATES)}')
  return TEMPLATES[name]


ROLES = ('human', 'gpt')  # LLaVA's speakers: the user and the assistant.


class BadConversation(ValueError):
  """A conversation that does not follow the LLaVA schema (a `bad_conversation` record)."""


def conversation_pairs(conversation: object, *, open_answer: bool = False) -> list[tuple[str, str]]:
  """(question, answer) pairs of a LLaVA conversation, a list of {"from", "value"} turns that
  alternate human/gpt with non-empty string values; raises `BadConversation` naming the first
  violation. Nothing is coerced: a null value never becomes the text "None". With `open_answer`,
  the last turn may be the assistant's empty answer that generation fills (inference)."""
  if not isinstance(conversation, (list, tuple)):
    raise BadConversation(
      f'conversations must be a list of turns, got {type(conversation).__name__}'
    )
  for i, turn in enumerate(conversation):
    if not isinstance(turn, dict) or not {'from', 'value'} <= set(turn):
      raise BadConversation(f'turn {i} must be a {{"from", "value"}} object, got {turn!r:.80}')
    if turn['from'] not in ROLES:
      raise BadConversation(f'turn {i} is from {turn["from"]!r}; the roles are {ROLES}')
    left_open = open_answer and i == len(conversation) - 1 and turn['value'] == ''
    if not isinstance(turn['value'], str) or not (turn['value'].strip() or left_open):
      raise BadConversation(f'turn {i} ({turn["from"]}) has no text: value {turn["value"]!r:.80}')
  turns = list(conversation)
  if turns and turns[0]['from'] == 'gpt':  # The reference drops a leading assistant turn.
    turns = turns[1:]
  if not turns or len(turns) % 2:
    raise BadConversation(f'a conversation needs human/gpt turn pairs, got {len(turns)} turns')
  for human, gpt in zip(turns[::2], turns[1::2]):
    if (human['from'], gpt['from']) != ROLES:
      raise BadConversation(
        f"turns must alternate 'human' and 'gpt', got {human['from']!r}, {gpt['from']!r}"
      )
  return [(human['value'], gpt['value']) for human, gpt in zip(turns[::2], turns[1::2])]


def _image_first(text: str) -> str:
  """The reference moves an `<image>` in a turn to its start, followed by a newline."""
  if IMAGE_PLACEHOLDER not in text:
    return text
  count = text.count(IMAGE_PLACEHOLDER)
  rest = text.replace(IMAGE_PLACEHOLDER, '').strip()
  return (IMAGE_PLACEHOLDER + '\n') * count + rest


def _encode_segments(
  segments: Sequence[tuple[str, bool]], tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
  """Ids of the (text, supervised) segments and each id's flag. As the reference
  (`tokenizer_image_token`), the text is cut at each `<image>` (IMAGE_TOKEN_INDEX in its place)
  and each stretch between images tokenised as one string (`Tokenizer.encode_segments`)."""
  ids: list[int] = []
  supervised: list[bool] = []
  stretch: list[tuple[str, bool]] = []

  def flush():
    for (_, is_target), piece in zip(stretch, tokenizer.encode_segments([t for t, _ in stretch])):
      ids.extend(piece)
      supervised.extend([is_target] * len(piece))
    stretch.clear()

  for text, is_target in segments:
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
      if i:
        flush()
        ids.append(IMAGE_TOKEN_INDEX)
        supervised.append(is_target)
      if chunk:
        stretch.append((chunk, is_target))
  flush()
  return ids, supervised


def tokenize_conversation(
  conversation: Sequence[dict],
  tokenizer: Tokenizer,
  template: Template,
  *,
  open_answer: bool = False,
) -> tuple[list[int], list[bool]]:
  """Token ids (with IMAGE_TOKEN_INDEX placeholders) and, per id, whether it is supervised;
  `open_answer`: the last answer is empty, for generation to fill (`conversation_pairs`)."""
  pairs = conversation_pairs(conversation, open_answer=open_answer)
  segments: list[tuple[str, bool]] = []
  if template.plain:
    if len(pairs) != 1:
      raise ValueError(f'The plain template takes one (image, caption) pair, got {len(pairs)}')
    prompt, caption = pairs[0]
    image = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in prompt else ''
    segments = [(image, False), (caption.strip() + template.sep, True)]
  else:
    user, assistant = template.roles
    prefix = template.system + template.sep if template.system else ''
    for question, answer in pairs:
      segments.append(
        (f'{prefix}{user}: {_image_first(question)}{template.sep}{assistant}:', False)
      )
      segments.append((f' {answer}{template.sep2}', True))
      prefix = ''
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  ids, supervised = _encode_segments(segments, tokenizer)
  return bos + ids, [False] * len(bos) + supervised
