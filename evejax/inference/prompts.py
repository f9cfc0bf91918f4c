"""Prompts for generation: the training template up to the assistant's turn, encoded like training
data.

A prompt is the dict of unpadded sequence arrays that `encode.encode_example` returns (the image
expanded into its visual tokens), so a generated answer sees exactly the layout it was trained on.
Batches are left-padded: every prompt ends at the same slot, decoding writes all rows at one cache
slot, and each row's positions continue from its own expanded prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evejax import batch as bf
from evejax.data import encode, templates
from evejax.data.pipeline import Preprocessor
from evejax.data.tokenizer import Tokenizer

Turn = Sequence[str]  # (question, answer) of an earlier exchange in the conversation


def prompt_ids(
  question: str,
  tokenizer: Tokenizer,
  template: templates.Template,
  *,
  with_image: bool,
  history: Sequence[Turn] = (),
) -> list[int]:
  """Token ids of the conversation so far and the assistant prefix (`... ASSISTANT:`),
  IMAGE_TOKEN_INDEX where the image goes (the first turn). Built by the training template itself:
  all before the answer's first supervised token, so a multi-turn prompt is the training layout."""
  questions = [q for q, _ in history] + [question]
  if with_image and not any(bf.IMAGE_PLACEHOLDER in q for q in questions):
    questions[0] = f'{bf.IMAGE_PLACEHOLDER}\n{questions[0]}'
  if not with_image and any(bf.IMAGE_PLACEHOLDER in q for q in questions):
    raise ValueError(f'the prompt has an {bf.IMAGE_PLACEHOLDER} placeholder but no image was given')
  answers = [a for _, a in history] + ['']
  conversation = [
    {'from': role, 'value': text}
    for pair in zip(questions, answers)
    for role, text in zip(('human', 'gpt'), pair)
  ]
  ids, supervised = templates.tokenize_conversation(
    conversation, tokenizer, template, open_answer=True
  )
  end = len(ids)
  while end and supervised[end - 1]:  # Drop the empty answer's supervised ids (e.g. `<|im_end|>`).
    end -= 1
  return ids[:end]


def encode_prompt(
  preprocess: Preprocessor,
  question: str,
  image: bytes | None = None,
  *,
  max_length: int | None = None,
  history: Sequence[Turn] = (),
) -> dict[str, np.ndarray]:
  """A question (and optional encoded image, earlier turns) -> the prompt's sequence arrays and
  patch groups.

  Raises ValueError for an unreadable image, or a prompt of `max_length` tokens or more (visual
  tokens included), which would leave no room to generate.
  """
  ids = prompt_ids(
    question,
    preprocess.tokenizer,
    preprocess.template,
    with_image=image is not None,
    history=history,
  )
  groups = [] if image is None else [preprocess.image_patches(image)]
  prompt = encode.encode_example(ids, [False] * len(ids), groups)
  if max_length is not None and len(prompt['tokens']) >= max_length:
    raise ValueError(
      f'the prompt has {len(prompt["tokens"])} tokens (visual tokens included), '
      f'which leaves no room to generate in a context of max_length={max_length}; '
      'shorten the question, lower data.max_size, or raise --max_length'
    )
  return prompt


def left_padded_batch(
  prompts: Sequence[dict[str, np.ndarray]], spec: bf.BatchSpec
) -> dict[str, np.ndarray]:
  """Prompts right-aligned in rows of `spec` (segment id 0 on the padding on the left)."""
  rows = []
  for prompt in prompts:
    row = encode.pack_row([prompt], spec)
    pad = spec.seq_len - len(prompt['tokens'])
    rows.append({k: np.roll(v, pad) if k in bf.SEQUENCE_KEYS else v for k, v in row.items()})
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}
