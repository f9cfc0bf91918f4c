"""Converters for the rest of the EVEv2 table: VizWiz, SEED-Bench (image), MMMU (val), ChartQA,
AI2D, RealWorldQA, OCRBench and MM-Vet, from their public releases' files.

Images embedded in parquet files (MMMU, AI2D, RealWorldQA) are written to an image folder. Prompts
follow the LLaVA-1.5 protocol (converters.py) unless the benchmark states its own: MMMU's
"(A) option" layout, VizWiz's unanswerable instruction, and OCRBench, RealWorldQA and MM-Vet, whose
questions are asked as they are.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator

from evejax import storage
from evejax.evaluation import mmmu as mmmu_lib
from evejax.evaluation.converters import (
  OPTION_LETTER,
  SHORT_ANSWER,
  choice_prompt,
  image_path,
  load_json,
  save_image,
)
from evejax.evaluation.metrics import OPTION_LETTERS

VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


def _parquet_rows(path: str, name_pattern: str = r'.*\.parquet') -> Iterator[dict]:
  """Rows of a parquet file, or of every file below a folder whose name matches `name_pattern`,
  a few at a time (a release's images are in the rows)."""
  if storage.isdir(path):
    files = [
      os.path.join(path, f)
      for f in storage.files_below(path)
      if re.fullmatch(name_pattern, os.path.basename(f))
    ]
    if not files:
      raise FileNotFoundError(f'{path}: no file named like {name_pattern!r} below this folder')
  else:
    files = [path]
  try:  # Only the parquet releases need it: the `eval` extra.
    import pyarrow.parquet as pq
  except ImportError as error:
    message = f"{path}: reading parquet needs pyarrow: pip install 'evejax[eval]'"
    raise ImportError(message) from error
  for file in files:
    with storage.open(file, 'rb') as f:
      for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
        yield from batch.to_pylist()


def _image_bytes(cell) -> bytes:
  """A Hugging Face image cell: {'bytes': ..., 'path': ...} (or the bytes themselves)."""
  return cell['bytes'] if isinstance(cell, dict) else cell


def vizwiz(questions: str, image_dir: str) -> Iterator[dict]:
  """`{split}.json` of VizWiz-VQA ([{image, question, answers: [{answer, answer_confidence}],
  answer_type}]); ids are the image names (the EvalAI submission's keys). Test has no answers."""
  for q in load_json(questions):
    yield {
      'id': q['image'],
      'question': q['question'],
      'metric': 'vqa',
      'image': image_path(image_dir, q['image']),
      'answers': [a['answer'] for a in q.get('answers', [])],
      'prompt': f'{q["question"]}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}',
      **({'category': q['answer_type']} if 'answer_type' in q else {}),
    }


def seed_bench(questions: str, image_dir: str) -> Iterator[dict]:
  """`SEED-Bench.json` ({questions: [{question_id, data_id, data_type, question, choice_a..d,
  answer, question_type_id}], question_type: {name: id}}): the image questions (SEED-I), images
  `{data_id}` in `image_dir`, the question type as category."""
  data = load_json(questions)
  type_names = {number: name for name, number in data['question_type'].items()}
  for q in data['questions']:
    if q['data_type'] != 'image':
      continue
    choices = [q[f'choice_{letter}'] for letter in 'abcd']
    yield {
      'id': str(q['question_id']),
      'question': q['question'],
      'metric': 'choice',
      'image': image_path(image_dir, q['data_id']),
      'choices': choices,
      'answers': [q['answer']],
      'prompt': choice_prompt(q['question'], choices),
      'category': type_names[q['question_type_id']],
    }


def mmmu_subject(item_id: str) -> str:
  """'validation_Art_Theory_12' -> 'Art_Theory'."""
  return item_id.split('_', 1)[1].rsplit('_', 1)[0]


def mmmu(root: str, image_out_dir: str) -> Iterator[dict]:
  """MMMU's parquet release (`{Subject}/validation-*.parquet` below `root`, or one file): the
  first image of each question (as MMMU's own single-image LLaVA evaluation), `<image n>` tags
  kept in the text, the subject as category."""
  storage.makedirs(image_out_dir)
  for row in _parquet_rows(root, r'validation-.*\.parquet'):
    options = ast.literal_eval(row['options'])
    question = row['question']
    if options:
      lines = ''.join(f'({letter}) {o}\n' for letter, o in zip(OPTION_LETTERS, options))
      prompt, answers = f'{question}\n{lines}\n{OPTION_LETTER}', [row['answer']]
    else:
      prompt, answers = f'{question}\n{SHORT_ANSWER}', mmmu_lib.gold_answers(row['answer'])
    yield {
      'id': row['id'],
      'question': question,
      'metric': 'mmmu',
      'image': save_image(_image_bytes(row['image_1']), image_out_dir, row['id']),
      'choices': [str(o) for o in options],
      'answers': answers,
      'prompt': prompt,
      'category': mmmu_subject(row['id']),
    }


def chartqa(split_dir: str, image_dir: str | None = None) -> Iterator[dict]:
  """A ChartQA split folder (`ChartQA Dataset/test`: `test_human.json`, `test_augmented.json`,
  each [{imgname, query, label}], images in `png/`): both sets, each its own category (the
  reported number is their mean; they are the same size)."""
  image_dir = image_dir or os.path.join(split_dir, 'png')
  files = [
    (kind, path)
    for kind in ('human', 'augmented')
    for path in storage.glob(split_dir, f'*_{kind}.json')
  ]
  if not files:
    raise FileNotFoundError(f'{split_dir}: no *_human.json or *_augmented.json (ChartQA split)')
  for kind, path in files:
    for number, q in enumerate(load_json(path)):
      yield {
        'id': f'{kind}-{number}',
        'question': q['query'],
        'metric': 'relaxed',
        'image': image_path(image_dir, q['imgname']),
        'answers': [str(q['label'])],
        'prompt': f'{q["query"]}\n{SHORT_ANSWER}',
        'category': kind,
      }


def ai2d(path: str, image_out_dir: str) -> Iterator[dict]:
  """AI2D test as parquet (lmms-lab/ai2d: question, options, answer = the option's index, image)."""
  storage.makedirs(image_out_dir)
  for number, row in enumerate(_parquet_rows(path)):
    choices = list(row['options'])
    answer = str(row['answer']).strip()
    letter = OPTION_LETTERS[int(answer)] if answer.isdigit() else answer
    yield {
      'id': f'ai2d-{number}',
      'question': row['question'],
      'metric': 'choice',
      'image': save_image(_image_bytes(row['image']), image_out_dir, f'ai2d-{number}'),
      'choices': choices,
      'answers': [letter],
      'prompt': choice_prompt(row['question'], choices),
    }


_OPTION_LINE = re.compile(r'^([A-Z])\.\s*(.+)$', re.MULTILINE)


def realworldqa(path: str, image_out_dir: str) -> Iterator[dict]:
  """RealWorldQA's parquet (xai-org: image, question, answer). Questions carry their own
  instructions and, for multiple choice, "A. ..." option lines: those are scored as `choice`
  (the letter, or the text of one option), the rest by exact match."""
  storage.makedirs(image_out_dir)
  for number, row in enumerate(_parquet_rows(path)):
    options = dict(_OPTION_LINE.findall(row['question']))
    answer = row['answer'].strip()
    letters = ''.join(options)
    is_choice = answer in options and letters == OPTION_LETTERS[: len(letters)]
    yield {
      'id': f'realworldqa-{number}',
      'question': row['question'],
      'metric': 'choice' if is_choice else 'exact',
      'image': save_image(_image_bytes(row['image']), image_out_dir, f'realworldqa-{number}'),
      'answers': [answer],
      'prompt': row['question'],
      'category': 'multiple choice' if is_choice else 'short answer',
      **({'choices': [o.strip() for o in options.values()]} if is_choice else {}),
    }


def ocrbench(questions: str, image_dir: str) -> Iterator[dict]:
  """`OCRBench.json` ([{dataset_name, id, image_path, question, answers, type}]), images at
  `image_path` below `image_dir` (`OCRBench_Images`); the type is the category."""
  for number, q in enumerate(load_json(questions)):
    answers = q['answers'] if isinstance(q['answers'], list) else [q['answers']]
    yield {
      'id': str(q.get('id', number)),
      'question': q['question'],
      'metric': 'ocrbench',
      'image': image_path(image_dir, q['image_path']),
      'answers': [str(a) for a in answers],
      'prompt': q['question'],
      'category': q['type'],
    }


def mmvet(questions: str, image_dir: str) -> Iterator[dict]:
  """`mm-vet.json` ({"v1_0": {imagename, question, answer, capability}}): answered here, graded by
  MM-Vet's GPT-4 judge from the exported answers (`--submission=mmvet`)."""
  for qid, q in load_json(questions).items():
    yield {
      'id': qid,
      'question': q['question'],
      'metric': 'judge',
      'image': image_path(image_dir, q['imagename']),
      'answers': [q['answer']],
      'prompt': q['question'],
      'category': ','.join(q.get('capability', [])),
    }


FORMATS = (
  'vizwiz',
  'seed_bench',
  'mmmu',
  'chartqa',
  'ai2d',
  'realworldqa',
  'ocrbench',
  'mmvet',
)
