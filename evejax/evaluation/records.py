"""The benchmark file format: JSON Lines, one question per line.

  {"id": "gqa-201307251", "image": "images/n161313.jpg", "question": "Is it overcast?",
   "answers": ["no"], "metric": "exact", "prompt": "Is it overcast?\\nAnswer the question using a
   single word or phrase.", "category": "...", "group": "...", "choices": ["...", "..."]}

| field      | required | meaning                                                                  |
| ---------- | -------- | ------------------------------------------------------------------------ |
| `id`       | yes      | unique within the file                                                   |
| `question` | yes      | the question as the benchmark states it                                  |
| `metric`   | yes      | one of `METRICS` (see metrics.py): how the answer is scored              |
| `answers`  | yes      | reference answers (10 for VQA, option letters for `choice`; may be empty |
|            |          | for unlabelled test splits, which then get predictions but no score)     |
| `image`    | no       | image path, relative to the JSONL file's folder or absolute; null = text |
| `prompt`   | no       | what the model is asked (benchmark instructions included); default:      |
|            |          | `question`                                                               |
| `choices`  | `choice` | option texts in letter order (A, B, ...); `mmmu`: empty for open answers |
| `category` | no       | sub-benchmark (MME subtask, POPE split, ...); metrics are also reported  |
|            |          | per category (`mme`, `ocrbench`: required, their scoring depends on it)  |
| `group`    | `mme`    | items scored together (MME: the two questions about one image)           |
| `history`  | no       | earlier turns as [question, answer] pairs, asked before `prompt` in one  |
|            |          | conversation (the image goes in the first); default: none                |

The converters in converters.py and converters_v2.py write this format from the benchmarks' own
question files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from evejax import storage

METRICS = ('vqa', 'exact', 'choice', 'pope', 'mme', 'cider', 'relaxed', 'ocrbench', 'mmmu', 'judge')
REQUIRED = ('id', 'question', 'metric', 'answers')


def validate(record: dict, where: str) -> dict:
  """Checks one record; `where` (file:line) goes into the error message."""
  missing = [k for k in REQUIRED if k not in record]
  if missing:
    raise ValueError(f'{where}: missing field(s) {missing}; every record needs {list(REQUIRED)}')
  if record['metric'] not in METRICS:
    raise ValueError(f'{where}: unknown metric {record["metric"]!r}; available: {list(METRICS)}')
  if not isinstance(record['answers'], list):
    raise ValueError(f'{where}: "answers" must be a list of strings, got {record["answers"]!r}')
  if record['metric'] == 'choice' and not record.get('choices'):
    raise ValueError(f'{where}: metric "choice" needs a non-empty "choices" list')
  if record['metric'] == 'mmmu' and not isinstance(record.get('choices'), list):
    raise ValueError(f'{where}: metric "mmmu" needs "choices" (a list; empty for open questions)')
  if record['metric'] in ('mme', 'ocrbench') and not record.get('category'):
    raise ValueError(f'{where}: metric {record["metric"]!r} needs "category" (its subtask)')
  if record['metric'] == 'mme' and 'group' not in record:
    raise ValueError(f'{where}: metric "mme" needs "group" (the image its question pair shares)')
  history = record.get('history', [])
  if not (
    isinstance(history, list)
    and all(
      isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
      for turn in history
    )
  ):
    raise ValueError(
      f'{where}: "history" must be a list of [question, answer] string pairs, got {history!r}'
    )
  return record


def read_jsonl(path: str) -> list[dict]:
  """Records of a benchmark file, image paths made absolute. Malformed lines are errors naming the
  file and line: a benchmark silently shrinking would change its score."""
  folder = os.path.dirname(storage.absolute(path))
  records, ids = [], set()
  with storage.open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e})') from e
      validate(record, where)
      if record['id'] in ids:
        raise ValueError(f'{where}: duplicate id {record["id"]!r}')
      ids.add(record['id'])
      if record.get('image'):
        record['image'] = os.path.join(folder, record['image'])
      records.append(record)
  return records


def write_jsonl(path: str, records: Iterable[dict]) -> int:
  """Writes records (validated) one per line; returns how many."""
  storage.makedirs(os.path.dirname(storage.absolute(path)))
  count = 0
  with storage.open(path, 'w') as f:
    for count, record in enumerate(records, start=1):
      f.write(json.dumps(validate(record, f'{path} record {count}'), ensure_ascii=False) + '\n')
  return count
