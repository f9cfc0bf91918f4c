"""Runs a benchmark file through an Assistant: predictions per item, metrics per metric and per
category.

A bad item (missing or unreadable image, a prompt longer than the context) is recorded with its
error and scored as a wrong answer; the run continues. Prompts are generated in batches of similar
length, so padding stays small.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Sequence

from absl import logging

from evejax import storage
from evejax.evaluation import metrics as metric_lib
from evejax.evaluation import submission as submission_lib
from evejax.evaluation.records import METRICS
from evejax.inference.assistant import Assistant
from evejax.inference.sampling import SamplingConfig


def _load_image(record: dict) -> bytes | None:
  path = record.get('image')
  if not path:
    return None
  if not storage.exists(path):
    raise FileNotFoundError(f'image file {path} does not exist')
  return storage.read_bytes(path)


def predict(
  assistant: Assistant,
  records: Sequence[dict],
  sampling: SamplingConfig,
  *,
  batch_size: int = 8,
  on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
  """One {'id', 'prediction'[, 'error']} per record, in the records' order."""
  results: list[dict] = [{'id': r['id'], 'prediction': ''} for r in records]
  encoded = []
  for index, record in enumerate(records):
    try:
      encoded.append(
        (
          index,
          assistant.encode(
            record.get('prompt') or record['question'],
            _load_image(record),
            history=record.get('history', ()),
          ),
        )
      )
    except (OSError, ValueError) as e:
      results[index]['error'] = f'{type(e).__name__}: {e}'
      logging.warning('item %s: %s', record['id'], results[index]['error'])
  encoded.sort(key=lambda item: len(item[1]['tokens']))
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start : start + batch_size]
    try:
      answers = assistant.answer([prompt for _, prompt in chunk], sampling)
    except (ValueError, RuntimeError) as e:  # e.g. one batch too large for the device
      answers = None
      for index, _ in chunk:
        results[index]['error'] = f'{type(e).__name__}: {e}'
    for (index, _), text in zip(chunk, answers or []):
      results[index]['prediction'] = text
    if on_batch is not None:
      on_batch(min(start + batch_size, len(encoded)))
  return results


def _score_group(metric: str, items: list[tuple[dict, dict]]) -> dict[str, float]:
  preds = [p['prediction'] for _, p in items]
  answers = [r['answers'] for r, _ in items]
  if metric == 'vqa':
    return metric_lib.vqa_accuracy(preds, answers)
  if metric == 'exact':
    return metric_lib.exact_match(preds, answers)
  if metric == 'choice':
    return metric_lib.multiple_choice(
      preds, answers, [r['choices'] for r, _ in items], [r.get('group') for r, _ in items]
    )
  if metric == 'pope':
    return metric_lib.pope(preds, answers)
  if metric == 'mme':
    return metric_lib.mme(
      preds, answers, [r['category'] for r, _ in items], [r['group'] for r, _ in items]
    )
  if metric == 'cider':
    return metric_lib.cider(preds, answers)
  raise ValueError(f'Unknown metric {metric!r}; available: {METRICS}')


def score(records: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
  """Flat metrics: '{metric}/{name}' overall, '{metric}/{category}/{name}' per category (except MME,
  whose subtasks are its categories), plus item counts. Items without answers are not scored."""
  by_metric = collections.defaultdict(list)
  for record, prediction in zip(records, predictions):
    if record['answers']:
      by_metric[record['metric']].append((record, prediction))
  out = {
    'items': float(len(records)),
    'failed': float(sum('error' in p for p in predictions)),
    'unlabelled': float(sum(not r['answers'] for r in records)),
  }
  for metric, items in sorted(by_metric.items()):
    out.update({f'{metric}/{k}': v for k, v in _score_group(metric, items).items()})
    categories = collections.defaultdict(list)
    for record, prediction in items:
      if record.get('category') and metric != 'mme':
        categories[record['category']].append((record, prediction))
    if len(categories) > 1:
      for category, group in sorted(categories.items()):
        out.update({f'{metric}/{category}/{k}': v for k, v in _score_group(metric, group).items()})
  return out


def format_table(results: dict[str, float]) -> str:
  lines = ['| metric | value |', '| --- | --- |']
  lines += [
    f'| {k} | {v:.4f} |' if isinstance(v, float) and not v.is_integer() else f'| {k} | {v:g} |'
    for k, v in results.items()
  ]
  return '\n'.join(lines)


def run(
  assistant: Assistant,
  records: Sequence[dict],
  sampling: SamplingConfig,
  output_dir: str,
  *,
  batch_size: int = 8,
  submission: str | None = None,
  submission_questions: str | None = None,
) -> dict[str, float]:
  """Predicts, scores, and writes predictions.jsonl and metrics.json to `output_dir`; with
  `submission` (a submission.FORMATS name) also `{submission}_submission.json`."""
  predictions = predict(
    assistant,
    records,
    sampling,
    batch_size=batch_size,
    on_batch=lambda n: logging.info('%d/%d items answered', n, len(records)),
  )
  results = score(records, predictions)
  storage.makedirs(output_dir)
  with storage.open(os.path.join(output_dir, 'predictions.jsonl'), 'w') as f:
    for record, prediction in zip(records, predictions):
      f.write(
        json.dumps(
          {**prediction, 'answers': record['answers'], 'metric': record['metric']},
          ensure_ascii=False,
        )
        + '\n'
      )
  storage.write_atomic(os.path.join(output_dir, 'metrics.json'), json.dumps(results, indent=1))
  if submission:
    submission_lib.write(
      submission,
      os.path.join(output_dir, f'{submission}_submission.json'),
      records,
      predictions,
      submission_questions,
    )
  return results
