"""Benchmark metrics, each following the protocol its benchmark's official (or LLaVA's) scorer uses.

| metric   | benchmarks             | protocol                                                   |
| -------- | ---------------------- | ---------------------------------------------------------- |
| `vqa`    | VQAv2, TextVQA         | EvalAI answer normalisation; min(1, matches / 3) averaged  |
|          |                        | over the leave-one-out subsets of the human answers        |
| `exact`  | GQA, shapes demo       | normalised prediction equals a normalised answer           |
| `choice` | ScienceQA-IMG, MMBench | option letter parsed from the prediction is the answer     |
| `pope`   | POPE                   | yes/no from the first sentence; precision/recall/F1 of yes |
| `mme`    | MME                    | per subtask 100 * (question accuracy + image accuracy+),   |
|          |                        | summed over the perception and the cognition subtasks      |
| `cider`  | captions               | CIDEr-D of pycocoevalcap                                   |
| `relaxed`| ChartQA                | pix2struct's relaxed accuracy: numbers within 5% of the    |
|          |                        | answer, other answers equal (case-insensitive)             |
| `ocrbench`| OCRBench              | the answer is a substring of the prediction; `score`: the  |
|          |                        | count of right items (of 1000 for the full benchmark)      |
| `mmmu`   | MMMU                   | MMMU's parsing of option letters and open answers (mmmu.py)|
| `judge`  | MM-Vet                 | not scored here: answers exported for an external judge    |

Every function takes parallel lists and returns a dict of aggregate numbers (fractions, not percent,
except MME's scores, which are on the benchmark's own scale).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

# --- EvalAI / official VQA answer normalisation ---------------------------------------------------

_CONTRACTIONS = dict(
  pair.split(':')
  for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're
whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've""".split()
)
_NUMBERS = {
  'none': '0',
  'zero': '0',
  'one': '1',
  'two': '2',
  'three': '3',
  'four': '4',
  'five': '5',
  'six': '6',
  'seven': '7',
  'eight': '8',
  'nine': '9',
  'ten': '10',
}
_ARTICLES = {'a', 'an', 'the'}
_PUNCTUATION = (
  ';',
  '/',
  '[',
  ']',
  '"',
  '{',
  '}',
  '(',
  ')',
  '=',
  '+',
  '\\',
  '_',
  '-',
  '>',
  '<',
  '@',
  '`',
  ',',
  '?',
  '!',
)
_PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')  # The official pattern, quirk included.
_COMMA_STRIP = re.compile(r'(?<=\d)(\,)+(?=\d)')


def normalize_vqa_answer(text: str) -> str:
  """The EvalAI answer processor of the VQA / TextVQA servers (LLaVA's m4c_evaluator)."""
  text = text.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  text = text.replace('\n', ' ').replace('\t', ' ').strip()
  # Punctuation: deleted when spaced (or a digit comma is around), else replaced by a space.
  drop = _COMMA_STRIP.search(text) is not None
  out = text
  for p in _PUNCTUATION:
    out = out.replace(p, '' if drop or p + ' ' in text or ' ' + p in text else ' ')
  out = _PERIOD_STRIP.sub('', out)
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """VQA accuracy: per question, the mean over leave-one-out subsets of min(1, matches / 3)."""
  scores = [vqa_score(p, a) for p, a in zip(predictions, answers)]
  return {'accuracy': _mean(scores)}


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
  if not answers:
    raise ValueError('VQA accuracy needs the human answers; this item has none')
  pred = normalize_vqa_answer(prediction)
  gts = [normalize_vqa_answer(a) for a in answers]
  return _mean(
    [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
  )


# --- exact match ----------------------------------------------------------------------------------


def normalize_exact(text: str) -> str:
  """Lower case, single spaces, no surrounding whitespace or trailing full stop."""
  return ' '.join(text.lower().split()).rstrip('.').strip()


def exact_score(prediction: str, answers: Sequence[str]) -> float:
  return float(normalize_exact(prediction) in {normalize_exact(a) for a in answers})


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  return {'accuracy': _mean([exact_score(p, a) for p, a in zip(predictions, answers)])}


# --- multiple choice ------------------------------------------------------------------------------

OPTION_LETTERS = string.ascii_uppercase


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
  """The option letter a prediction names: "B", "B.", "(B) ...", "The answer is B.", or the text of
  exactly one option. None when no option can be read."""
  letters = OPTION_LETTERS[: len(choices)]
  text = prediction.strip()
  match = (
    re.fullmatch(r'\(?([A-Z])\)?[.:]?', text)
    or re.match(r'\(?([A-Z])[.):]\s', text)
    or re.search(r'[Tt]he answer is \(?([A-Z])\b', text)
  )
  if match and match.group(1) in letters:
    return match.group(1)
  named = [
    letter
    for letter, choice in zip(letters, choices)
    if normalize_exact(choice) == normalize_exact(text)
  ]
  return named[0] if len(named) == 1 else None


def choice_score(prediction: str, answers: Sequence[str], choices: Sequence[str]) -> float:
  """`answers` holds the correct option letter."""
  return float(parse_choice(prediction, choices) in set(answers))


def multiple_choice(
  predictions: Sequence[str],
  answers: Sequence[Sequence[str]],
  choices: Sequence[Sequence[str]],
  groups: Sequence[str | None] | None = None,
) -> dict[str, float]:
  """Accuracy per item; with `groups` (MMBench's circular evaluation: one group per question,
  one item per rotation of its options) also `circular_accuracy`: a question counts only when
  every rotation is answered right."""
  parsed = [parse_choice(p, c) for p, c in zip(predictions, choices)]
  correct = [x in set(a) for x, a in zip(parsed, answers)]
  out = {
    'accuracy': _mean([float(c) for c in correct]),
    'unparsed': _mean([float(x is None) for x in parsed]),
  }
  if groups is not None and any(g is not None for g in groups):
    by_group = {}
    for group, ok in zip(groups, correct):
      by_group[group] = by_group.get(group, True) and ok
    out['circular_accuracy'] = _mean([float(ok) for ok in by_group.values()])
  return out


# --- POPE -----------------------------------------------------------------------------------------


def pope_label(prediction: str) -> str:
  """LLaVA's POPE rule: "no" if the first sentence has the word No/no/not, else "yes"."""
  words = prediction.split('.')[0].replace(',', '').split(' ')
  return 'no' if {'No', 'no', 'not'} & set(words) else 'yes'


def pope(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """Precision, recall and F1 of "yes" (the object is present), accuracy and the yes-ratio."""
  counts = collections.Counter()
  for prediction, gold in zip(predictions, answers):
    label = gold[0].strip().lower()
    if label not in ('yes', 'no'):
      raise ValueError(f'POPE answers are "yes" or "no", got {gold[0]!r}')
    counts[(pope_label(prediction), label)] += 1
  tp, fp = counts[('yes', 'yes')], counts[('yes', 'no')]
  tn, fn = counts[('no', 'no')], counts[('no', 'yes')]
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  total = tp + fp + tn + fn
  return {
    'accuracy': (tp + tn) / total,
    'precision': precision,
    'recall': recall,
    'f1': f1,
    'yes_ratio': (tp + fp) / total,
  }


# --- MME ------------------------------------------------------------------------------------------

MME_PERCEPTION = (
  'existence',
  'count',
  'position',
  'color',
  'posters',
  'celebrity',
  'scene',
  'landmark',
  'artwork',
  'OCR',
)
MME_COGNITION = (
  'commonsense_reasoning',
  'numerical_calculation',
  'text_translation',
  'code_reasoning',
)


def mme_label(prediction: str) -> str:
  """MME's parser: "yes"/"no" if the answer is that word or its first 4 characters contain it."""
  text = prediction.strip().lower()
  if text in ('yes', 'no'):
    return text
  return 'yes' if 'yes' in text[:4] else 'no' if 'no' in text[:4] else 'other'


def mme(
  predictions: Sequence[str],
  answers: Sequence[Sequence[str]],
  categories: Sequence[str],
  groups: Sequence[str],
) -> dict[str, float]:
  """Per subtask (category) 100 * (accuracy + accuracy+), accuracy+ counting images (groups) whose
  questions are all right; `perception` and `cognition` are the sums over their subtasks."""
  per_task = collections.defaultdict(lambda: collections.defaultdict(list))
  for prediction, gold, task, group in zip(predictions, answers, categories, groups):
    per_task[task][group].append(mme_label(prediction) == gold[0].strip().lower())
  scores = {}
  for task, images in per_task.items():
    questions = [ok for oks in images.values() for ok in oks]
    scores[task] = 100 * (_mean(questions) + _mean([all(oks) for oks in images.values()]))
  unknown = sorted(set(scores) - set(MME_PERCEPTION) - set(MME_COGNITION))
  if unknown:
    raise ValueError(f'Unknown MME subtasks {unknown}; expected {MME_PERCEPTION + MME_COGNITION}')
  return {
    'perception': sum(v for k, v in scores.items() if k in MME_PERCEPTION),
    'cognition': sum(v for k, v in scores.items() if k in MME_COGNITION),
    **{f'{task}': score for task, score in sorted(scores.items())},
  }


# --- ChartQA relaxed accuracy ---------------------------------------------------------------------


def _relaxed_float(text: str) -> float | None:
  try:
    return float(text.rstrip('%')) / 100 if text.endswith('%') else float(text)
  except ValueError:
    return None


def relaxed_score(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
  """pix2struct's `relaxed_correctness` (ChartQA's metric), right against any answer: a number
  within `tolerance` of a non-zero numeric answer ("12%" is 0.12), otherwise equal strings
  ignoring case."""
  prediction = prediction.strip()
  predicted = _relaxed_float(prediction)
  for answer in answers:
    target = _relaxed_float(answer)
    if predicted is not None and target:
      if abs(predicted - target) / abs(target) <= tolerance:
        return 1.0
    elif prediction.lower() == answer.lower():
      return 1.0
  return 0.0


def relaxed_accuracy(
  predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> dict[str, float]:
  return {'accuracy': _mean([relaxed_score(p, a) for p, a in zip(predictions, answers)])}


# --- OCRBench -------------------------------------------------------------------------------------

OCRBENCH_HME = 'Handwritten Mathematical Expression Recognition'
OCRBENCH_RECOGNITION = (
  'Regular Text Recognition',
  'Irregular Text Recognition',
  'Artistic Text Recognition',
  'Handwriting Recognition',
  'Digit String Recognition',
  'Non-Semantic Text Recognition',
)


def ocrbench_score(prediction: str, answers: Sequence[str], category: str) -> float:
  """OCRBench's rule: right when an answer is a substring of the prediction, both lower-cased and
  stripped, line breaks as spaces; for handwritten formulas (HME100k) with every space removed and
  case kept, as the official scorer does."""
  formula = category == OCRBENCH_HME

  def normal(text: str) -> str:
    if formula:
      return text.strip().replace('\n', ' ').replace(' ', '')
    return text.lower().strip().replace('\n', ' ')

  return float(any(normal(a) in normal(prediction) for a in answers))


def ocrbench(
  predictions: Sequence[str], answers: Sequence[Sequence[str]], categories: Sequence[str]
) -> dict[str, float]:
  """`score`: right items (the benchmark's number, of 1000), `accuracy`, and the official
  `text_recognition` sum over the six recognition categories."""
  right = [ocrbench_score(p, a, c) for p, a, c in zip(predictions, answers, categories)]
  recognition = sum(r for r, c in zip(right, categories) if c in OCRBENCH_RECOGNITION)
  return {'score': sum(right), 'accuracy': _mean(right), 'text_recognition': recognition}


# --- CIDEr ----------------------------------------------------------------------------------------


def _caption_tokens(text: str) -> str:
  """Pure-Python stand-in for the Java PTB tokenizer: lower case, punctuation removed."""
  return ' '.join(re.sub(r"[^\w\s']", ' ', text.lower()).split())


def cider(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """CIDEr-D (pycocoevalcap's scorer; document frequencies from this set's references)."""
  try:  # The scorer is pure Python (only the tokenizer would need Java); an optional extra.
    from pycocoevalcap.cider.cider import Cider
  except ImportError as error:
    raise ImportError("The CIDEr metric needs pycocoevalcap: pip install 'evejax[eval]'") from error
  refs = {i: [_caption_tokens(a) for a in gold] for i, gold in enumerate(answers)}
  hyps = {i: [_caption_tokens(p)] for i, p in enumerate(predictions)}
  score, _ = Cider().compute_score(refs, hyps)
  return {'cider': float(score)}


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values) if values else 0.0
