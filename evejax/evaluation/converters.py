"""Converters from benchmarks' own question files to the JSONL format of records.py.

Prompts carry the LLaVA-1.5 evaluation instructions the EVE papers used (EVE_REFERENCE.md §6.2):
short answers "Answer the question using a single word or phrase.", multiple choice "Answer with the
option's letter from the given choices directly.". Image paths are written absolute.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Iterator

from PIL import Image

from evejax import storage
from evejax.evaluation.metrics import OPTION_LETTERS

SHORT_ANSWER = 'Answer the question using a single word or phrase.'
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


def load_json(path: str):
  return json.loads(storage.read_text(path))


def image_path(image_dir: str, name: str) -> str:
  return storage.absolute(os.path.join(image_dir, name))


def save_image(data: bytes, image_out_dir: str, stem: str) -> str:
  """Writes an embedded image as `{stem}.{its format}` in `image_out_dir`; its absolute path."""
  kind = (Image.open(io.BytesIO(data)).format or 'png').lower()
  path = os.path.join(image_out_dir, f'{stem}.{kind}')
  with storage.open(path, 'wb') as out:
    out.write(data)
  return storage.absolute(path)


def choice_prompt(question: str, choices: list[str], hint: str | None = None) -> str:
  options = '\n'.join(f'{letter}. {c}' for letter, c in zip(OPTION_LETTERS, choices))
  context = f'Context: {hint}\n' if hint else ''
  return f'{context}{question}\n{options}\n{OPTION_LETTER}'


def vqav2(questions: str, image_dir: str, annotations: str | None = None) -> Iterator[dict]:
  """`v2_OpenEnded_mscoco_{split}_questions.json` (+ `v2_mscoco_{split}_annotations.json`); images
  `COCO_{split}_{image_id:012d}.jpg` in `image_dir`. Test splits have no annotations."""
  data = load_json(questions)
  subtype = data.get('data_subtype', 'val2014')
  answers = {}
  if annotations:
    answers = {a['question_id']: a for a in load_json(annotations)['annotations']}
  for q in data['questions']:
    ann = answers.get(q['question_id'], {})
    yield {
      'id': str(q['question_id']),
      'question': q['question'],
      'metric': 'vqa',
      'image': image_path(image_dir, f'COCO_{subtype}_{q["image_id"]:012d}.jpg'),
      'answers': [a['answer'] for a in ann.get('answers', [])],
      'prompt': f'{q["question"]}\n{SHORT_ANSWER}',
      **({'category': ann['answer_type']} if 'answer_type' in ann else {}),
    }


def gqa(questions: str, image_dir: str) -> Iterator[dict]:
  """`{split}_balanced_questions.json` ({question_id: {imageId, question, answer, types}})."""
  for qid, q in load_json(questions).items():
    yield {
      'id': str(qid),
      'question': q['question'],
      'metric': 'exact',
      'image': image_path(image_dir, f'{q["imageId"]}.jpg'),
      'answers': [q['answer']] if 'answer' in q else [],
      'prompt': f'{q["question"]}\n{SHORT_ANSWER}',
      **({'category': q['types']['structural']} if 'types' in q else {}),
    }


def textvqa(questions: str, image_dir: str) -> Iterator[dict]:
  """`TextVQA_0.5.1_{split}.json` ({"data": [{question_id, image_id, question, answers}]})."""
  for q in load_json(questions)['data']:
    yield {
      'id': str(q['question_id']),
      'question': q['question'],
      'metric': 'vqa',
      'image': image_path(image_dir, f'{q["image_id"]}.jpg'),
      'answers': q.get('answers', []),
      'prompt': f'{q["question"]}\n{SHORT_ANSWER}',
    }


def scienceqa_img(problems: str, image_dir: str, split: str = 'test') -> Iterator[dict]:
  """`problems.json` of ScienceQA, the questions of `split` that have an image (SQA-IMG); images
  `{split}/{pid}/image.png` under `image_dir`."""
  for pid, p in load_json(problems).items():
    if p.get('split') != split or not p.get('image'):
      continue
    yield {
      'id': str(pid),
      'question': p['question'],
      'metric': 'choice',
      'image': image_path(image_dir, os.path.join(split, str(pid), p['image'])),
      'choices': list(p['choices']),
      'answers': [OPTION_LETTERS[p['answer']]],
      'prompt': choice_prompt(p['question'], p['choices'], p.get('hint')),
      'category': p.get('subject', ''),
    }


def pope(questions: str, image_dir: str) -> Iterator[dict]:
  """`coco_pope_{random,popular,adversarial}.json` (JSON Lines: question_id, image, text, label);
  the split, from the file name, becomes the category."""
  category = os.path.basename(questions).rsplit('.', 1)[0].rsplit('_', 1)[-1]
  with open(questions) as f:
    for line in filter(str.strip, f):
      q = json.loads(line)
      yield {
        'id': f'{category}-{q["question_id"]}',
        'question': q['text'],
        'metric': 'pope',
        'image': image_path(image_dir, q['image']),
        'answers': [q['label']],
        'prompt': f'{q["text"]}\n{SHORT_ANSWER}',
        'category': category,
      }


def mme(root: str) -> Iterator[dict]:
  """`MME_Benchmark_release_version/`: one folder per subtask with `name.txt` files of
  "question<TAB>Yes|No" lines next to `name.jpg|png`, or in `questions_answers_YN/` beside
  `images/`."""
  for task in sorted(os.listdir(root)):
    folder = os.path.join(root, task)
    if not os.path.isdir(folder):
      continue
    qa_dir = os.path.join(folder, 'questions_answers_YN')
    image_dir = os.path.join(folder, 'images')
    if not os.path.isdir(qa_dir):
      qa_dir = image_dir = folder
    images = {
      os.path.splitext(n)[0]: n
      for n in os.listdir(image_dir)
      if n.lower().endswith(('.jpg', '.jpeg', '.png'))
    }
    for name in sorted(n for n in os.listdir(qa_dir) if n.endswith('.txt')):
      stem = name[:-4]
      if stem not in images:
        raise FileNotFoundError(
          f'MME {os.path.join(qa_dir, name)}: no image {stem}.jpg/.png in {image_dir}'
        )
      with open(os.path.join(qa_dir, name)) as f:
        lines = [line.rstrip('\n').split('\t') for line in f if line.strip()]
      for i, (question, answer) in enumerate(lines):
        yield {
          'id': f'{task}/{stem}/{i}',
          'question': question,
          'metric': 'mme',
          'image': image_path(image_dir, images[stem]),
          'answers': [answer.strip()],
          'prompt': f'{question}\n{SHORT_ANSWER}',
          'category': task,
          'group': f'{task}/{stem}',
        }


def _present(value: str | None) -> bool:
  return value is not None and value.strip() != '' and value.strip().lower() != 'nan'


def mmbench(tsv: str, image_out_dir: str, circular: bool = True) -> Iterator[dict]:
  """MMBench `.tsv` (index, question, hint, A-D, answer, category, base64 image); images are
  written to `image_out_dir`. `circular` (MMBench's CircularEval): each question once per rotation
  of its options, all in the group of its index; the harness then reports `circular_accuracy`."""
  storage.makedirs(image_out_dir)
  csv.field_size_limit(1 << 30)
  with open(tsv, newline='') as f:
    for row in csv.DictReader(f, delimiter='\t'):
      choices = [row[letter] for letter in 'ABCD' if _present(row.get(letter))]
      path = save_image(base64.b64decode(row['image']), image_out_dir, str(row['index']))
      hint = row.get('hint') if _present(row.get('hint')) else None
      answer = row['answer'].strip() if _present(row.get('answer')) else None
      for shift in range(len(choices) if circular else 1):
        rotated = choices[shift:] + choices[:shift]
        # The correct option moves with the rotation: letter index - shift.
        letter = (
          OPTION_LETTERS[(OPTION_LETTERS.index(answer) - shift) % len(choices)] if answer else None
        )
        yield {
          'id': str(row['index']) + (f'-r{shift}' if shift else ''),
          'question': row['question'],
          'metric': 'choice',
          'image': path,
          'choices': rotated,
          'answers': [letter] if letter else [],
          'prompt': choice_prompt(row['question'], rotated, hint),
          'category': row.get('category', ''),
          **({'group': str(row['index'])} if circular else {}),
        }


def _shapes_category(question: str) -> str:
  for prefix, kind in (
    ('describe', 'caption'),
    ('what color', 'color'),
    ('what shape', 'shape'),
    ('how many', 'count'),
    ('what is at the top', 'top'),
  ):
    if question.startswith(prefix):
      return kind
  raise ValueError(f'not a shapes question: {question!r}')


def shapes(
  source, image_out_dir: str, limit: int | None = None, *, history: bool = False
) -> Iterator[dict]:
  """The demo's held-out shapes questions (a ShapesDataset), images written as PNG files. Every
  turn of a multi-turn record becomes its own question about the image (each is answerable from
  the image alone); with `history`, asked after the record's earlier turns and their reference
  answers (the training layout). `limit` counts records."""
  storage.makedirs(image_out_dir)
  for index in range(len(source) if limit is None else min(limit, len(source))):
    record = source[index]
    path = os.path.join(image_out_dir, f'{record["id"]}.png')
    with storage.open(path, 'wb') as f:
      f.write(record['image'])
    turns = record['conversations']
    pairs = [
      (human['value'].replace('<image>', '').strip(), gpt['value'])
      for human, gpt in zip(turns[::2], turns[1::2])
    ]
    for turn, (question, answer) in enumerate(pairs):
      yield {
        'id': f'{record["id"]}-{turn}',
        'question': question,
        'metric': 'exact',
        'image': storage.absolute(path),
        'answers': [answer],
        'category': _shapes_category(question),
        **({'history': [list(p) for p in pairs[:turn]]} if history else {}),
      }


FORMATS = ('vqav2', 'gqa', 'textvqa', 'scienceqa_img', 'pope', 'mme', 'mmbench', 'shapes')
