"""MMMU's answer parsing and scoring: the rules of the benchmark's own `eval/utils/eval_utils.py`
(parse_multi_choice_response, parse_open_response, eval_multi_choice, eval_open), quirks included.

Multiple choice: "(B)" anywhere, else " B " as a word, else (answers of more than 5 words) an
option's text; of several candidates the last mentioned wins; none at all is a random option (the
official scorer's `random.choice`, here seeded by the item id so a run's score is reproducible).
Open questions: the tails of the answer's sentences after "is", "so", "therefore", ... and the
numbers in them are the candidates; a number matches a gold number rounded to 2 decimals, a string
matches when a gold string is in it.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence

_STRIPPED = (',', '.', '!', '?', ';', ':', "'")
_KEY_INDICATORS = ('could be ', 'so ', 'is ', 'thus ', 'therefore ', 'final ', 'answer ', 'result ')
_NUMBER_PATTERNS = (
  r'-?\b\d{1,3}(?:,\d{3})+\b',  # with thousands separators
  r'-?\d+(?:\.\d+)?[eE][+-]?\d+',  # scientific notation
  r'-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])',  # plain ("12kg" is no number)
)


def parse_choice(response: str, letters: Sequence[str], options: Sequence[str], seed: str) -> str:
  """The option letter MMMU reads from `response`; `seed` picks the random letter of an answer
  naming no option."""
  for char in _STRIPPED:
    response = response.strip(char)
  response = f' {response} '  # Spaces so " A " matches at either end.
  candidates = [letter for letter in letters if f'({letter})' in response]
  bracketed, by_text = bool(candidates), False
  if not candidates:
    candidates = [letter for letter in letters if f' {letter} ' in response]
  if not candidates and len(response.split()) > 5:
    candidates = [
      letter for letter, option in zip(letters, options) if option.lower() in response.lower()
    ]
    by_text = bool(candidates)
  if not candidates:
    return random.Random(seed).choice(list(letters))
  if len(candidates) == 1:
    return candidates[0]
  text = dict(zip(letters, options))
  if by_text:
    positions = [response.lower().rfind(text[c].lower()) for c in candidates]
  elif bracketed:
    positions = [response.rfind(f'({c})') for c in candidates]
  else:
    positions = [response.rfind(f' {c} ') for c in candidates]
  return candidates[positions.index(max(positions))]  # The first of equal maxima, as np.argmax.


def _is_number(text: str) -> bool:
  try:
    float(text.replace(',', ''))
  except ValueError:
    return False
  return True


def normalize(text: str) -> list[str | float]:
  """A number rounded to 2 decimals; a string lower-cased (one character padded with a space
  on either side, so it does not match inside words)."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(',', '')), 2)]
  text = text.lower()
  return [f' {text}', f'{text} '] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
  response = response.strip().strip('.').lower()
  # The official split looks for a capital after a full stop in the lower-cased text, so in effect
  # it splits at line breaks only; kept for identical scores.
  sentences = re.split(r'\.\s(?=[A-Z])|\n', response)
  keys = []
  for index, sentence in enumerate(sentences):
    indicators = _KEY_INDICATORS + (('=',) if index == len(sentences) - 1 else ())
    shortest = None  # The shortest tail after an indicator (an empty one is replaced).
    for indicator in indicators:
      if indicator in sentence:
        tail = sentence.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest not in _STRIPPED:
      keys.append(shortest)
  return keys or [response]


def parse_open(response: str) -> list[str | float]:
  """Normalised candidate answers of an open question's response."""
  keys = _key_responses(response)
  numbers = [n for key in keys for pattern in _NUMBER_PATTERNS for n in re.findall(pattern, key)]
  return list({value for text in keys + numbers for value in normalize(text)})


def open_correct(response: str, gold: Sequence[str]) -> bool:
  targets = [value for answer in gold for value in normalize(answer)]
  for candidate in parse_open(response):
    if isinstance(candidate, str):
      if any(isinstance(t, str) and t in candidate for t in targets):
        return True
    elif candidate in targets:
      return True
  return False


def gold_answers(answer: str) -> list[str]:
  """An open question's `answer` field: one answer, or a Python list literal of several."""
  try:
    parsed = ast.literal_eval(answer) if answer.startswith('[') else None
  except (ValueError, SyntaxError):  # Text that only starts with a bracket.
    parsed = None
  return [str(a) for a in parsed] if isinstance(parsed, list) else [answer]


def score(
  predictions: Sequence[str],
  answers: Sequence[Sequence[str]],
  choices: Sequence[Sequence[str]],
  ids: Sequence[str],
) -> dict[str, float]:
  """Accuracy; items with `choices` are multiple choice (`answers`: the letter), the others open
  (`answers`: the accepted answers)."""
  correct = []
  for prediction, gold, options, item_id in zip(predictions, answers, choices, ids):
    if options:
      letters = [chr(ord('A') + i) for i in range(len(options))]
      correct.append(parse_choice(prediction, letters, options, item_id) in gold)
    else:
      correct.append(open_correct(prediction, gold))
  return {'accuracy': sum(correct) / len(correct) if correct else 0.0}
