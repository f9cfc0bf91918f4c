"""Submission files for benchmarks scored elsewhere: on a server (the harness only scores labelled
splits) or by an external judge (MM-Vet)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from evejax import storage
from evejax.evaluation.metrics import normalize_vqa_answer

FORMATS = ('vqav2', 'vizwiz', 'mmvet')


def vqav2(
  records: Sequence[dict], predictions: Sequence[dict], all_question_ids: Iterable[int] = ()
) -> list[dict]:
  """EvalAI's VQAv2 result format: [{"question_id": int, "answer": str}], answers normalised as
  EvalAI does. The test-dev phase expects every test-std question too: ids in `all_question_ids`
  without a prediction get an empty answer."""
  out, seen = [], set()
  for record, prediction in _paired(records, predictions):
    question_id = int(record['id'])
    seen.add(question_id)
    out.append(
      {'question_id': question_id, 'answer': normalize_vqa_answer(prediction['prediction'])}
    )
  out += [{'question_id': int(q), 'answer': ''} for q in all_question_ids if int(q) not in seen]
  return out


def vizwiz(records: Sequence[dict], predictions: Sequence[dict]) -> list[dict]:
  """EvalAI's VizWiz result format: [{"image": "VizWiz_test_00000000.jpg", "answer": str}] (the
  converter's ids are the image names), answers normalised as for VQAv2."""
  return [
    {'image': record['id'], 'answer': normalize_vqa_answer(prediction['prediction'])}
    for record, prediction in _paired(records, predictions)
  ]


def mmvet(records: Sequence[dict], predictions: Sequence[dict]) -> dict[str, str]:
  """The {"v1_0": answer, ...} file MM-Vet's GPT-4 judge (its evaluator notebook) grades."""
  return {
    record['id']: prediction['prediction'] for record, prediction in _paired(records, predictions)
  }


def _paired(records: Sequence[dict], predictions: Sequence[dict]):
  for record, prediction in zip(records, predictions, strict=True):
    if record['id'] != prediction['id']:
      raise ValueError(f'prediction {prediction["id"]!r} is not for record {record["id"]!r}')
    yield record, prediction


def write(
  fmt: str,
  path: str,
  records: Sequence[dict],
  predictions: Sequence[dict],
  questions_file: str | None = None,
) -> int:
  """Writes the `fmt` submission file; `questions_file` (VQAv2: the test-std questions JSON) lists
  the questions the server expects. Returns the number of answers."""
  if fmt not in FORMATS:
    raise ValueError(f'Unknown submission format {fmt!r}; available: {FORMATS}')
  if fmt == 'vqav2':
    ids = []
    if questions_file:
      ids = [q['question_id'] for q in json.loads(storage.read_text(questions_file))['questions']]
    entries = vqav2(records, predictions, ids)
  else:
    entries = vizwiz(records, predictions) if fmt == 'vizwiz' else mmvet(records, predictions)
  storage.write_atomic(path, json.dumps(entries, ensure_ascii=False))
  return len(entries)
