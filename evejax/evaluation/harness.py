"""Runs a benchmark file through an Assistant: predictions per item, metrics per metric and per
category, a results table and a chart of the per-category scores.

Items are encoded a window at a time while the previous window is generated (a background thread
reads and resizes the next window's images), so memory holds two windows of pixels, not the
benchmark's; within a window, prompts are generated in batches of similar length so padding stays
small. A bad item (missing or unreadable image, a prompt longer than the context) is recorded with
its error and scored as a wrong answer; the run continues.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time
from collections.abc import Iterator, Sequence

import tqdm
from absl import logging

from evejax import storage
from evejax.evaluation import metrics as metric_lib
from evejax.evaluation import mmmu as mmmu_lib
from evejax.evaluation import submission as submission_lib
from evejax.evaluation import tables
from evejax.evaluation.records import METRICS
from evejax.inference.assistant import Assistant
from evejax.inference.sampling import SamplingConfig
from evejax.metrics.progress import Progress

WINDOW_BATCHES = 4  # Batches encoded together, sorted by length: less padding, bounded memory.


def _load_image(record: dict) -> bytes | None:
  path = record.get('image')
  if not path:
    return None
  if not storage.exists(path):
    raise FileNotFoundError(f'image file {path} does not exist')
  return storage.read_bytes(path)


def _encode_window(assistant: Assistant, records: Sequence[dict], start: int) -> list[tuple]:
  """(index, encoded prompt or None, error or None) of records[start:], longest prompt last."""
  out = []
  for index, record in enumerate(records, start=start):
    try:
      prompt = assistant.encode(
        record.get('prompt') or record['question'],
        _load_image(record),
        history=record.get('history', ()),
      )
      out.append((index, prompt, None))
    except (OSError, ValueError) as e:
      out.append((index, None, f'{type(e).__name__}: {e}'))
  return sorted(out, key=lambda item: -1 if item[1] is None else len(item[1]['tokens']))


def _encoded_windows(
  assistant: Assistant, records: Sequence[dict], window: int
) -> Iterator[list[tuple]]:
  """Windows of encoded records; the next window is encoded while the caller uses this one."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='encode') as pool:

    def submit(start: int) -> concurrent.futures.Future:
      return pool.submit(_encode_window, assistant, records[start : start + window], start)

    pending = submit(0)
    for start in range(0, len(records), window):
      encoded = pending.result()
      if start + window < len(records):
        pending = submit(start + window)
      yield encoded


def _answer_window(
  assistant: Assistant,
  records: Sequence[dict],
  encoded: list[tuple],
  sampling: SamplingConfig,
  batch_size: int,
  results: list[dict],
) -> None:
  """Fills `results` for one window of encoded records, `batch_size` prompts per generate call."""
  for index, _, error in encoded:
    if error is not None:
      results[index]['error'] = error
      logging.warning('item %s: %s', records[index]['id'], error)
  ready = [(index, prompt) for index, prompt, error in encoded if error is None]
  for start in range(0, len(ready), batch_size):
    chunk = ready[start : start + batch_size]
    try:
      answers = assistant.answer([prompt for _, prompt in chunk], sampling)
    except (ValueError, RuntimeError) as e:  # e.g. one batch too large for the device
      answers = None
      for index, _ in chunk:
        results[index]['error'] = f'{type(e).__name__}: {e}'
    for (index, _), text in zip(chunk, answers or []):
      results[index]['prediction'] = text


def predict(
  assistant: Assistant,
  records: Sequence[dict],
  sampling: SamplingConfig,
  *,
  batch_size: int = 8,
  progress: bool = False,
  log_every_s: float = 30.0,
) -> list[dict]:
  """One {'id', 'prediction'[, 'error']} per record, in the records' order. `progress`: a log line
  with the count, rate and ETA at most every `log_every_s` seconds and at the end (readable in log
  files), and on a terminal a live progress bar too."""
  results: list[dict] = [{'id': r['id'], 'prediction': ''} for r in records]
  # The ETA's rate is measured from the end of the first window on: it excludes the compilation.
  timer = Progress(len(records), unit='item')
  last_log, done = time.monotonic(), 0
  bar = tqdm.tqdm(total=len(records), unit='item', disable=None if progress else True)  # None: TTYs
  with bar:
    for encoded in _encoded_windows(assistant, records, batch_size * WINDOW_BATCHES):
      _answer_window(assistant, records, encoded, sampling, batch_size, results)
      if not done:
        timer.start(len(encoded))
      done += len(encoded)
      bar.update(len(encoded))
      # This window's pixels go now, before the window after the next one starts encoding.
      encoded.clear()
      if progress and (done == len(records) or time.monotonic() - last_log >= log_every_s):
        logging.info('evaluation: %s', timer.line(done, {}))
        last_log = time.monotonic()
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
  if metric == 'relaxed':
    return metric_lib.relaxed_accuracy(preds, answers)
  if metric == 'ocrbench':
    return metric_lib.ocrbench(preds, answers, [r['category'] for r, _ in items])
  if metric == 'mmmu':
    return mmmu_lib.score(
      preds, answers, [r['choices'] for r, _ in items], [r['id'] for r, _ in items]
    )
  raise ValueError(f'Unknown metric {metric!r}; available: {METRICS}')


def score(records: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
  """Flat metrics: '{metric}/{name}' overall, '{metric}/{category}/{name}' per category (except MME,
  whose subtasks are its categories), plus item counts. Items without answers, and those of an
  external judge (metric `judge`), are not scored."""
  by_metric = collections.defaultdict(list)
  for record, prediction in zip(records, predictions):
    if record['answers'] and record['metric'] != 'judge':
      by_metric[record['metric']].append((record, prediction))
  out = {
    'items': float(len(records)),
    'failed': float(sum('error' in p for p in predictions)),
    'unlabelled': float(sum(not r['answers'] for r in records)),
  }
  judged = sum(r['metric'] == 'judge' for r in records)
  if judged:
    out['judge'] = float(judged)
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


JUDGED = 'this benchmark (MM-Vet) is scored by an external judge from exported answers'


def required_submission(records: Sequence[dict]) -> str | None:
  """'mmvet' when some items are scored by an external judge: only the exported file scores them."""
  return 'mmvet' if any(r['metric'] == 'judge' for r in records) else None


def run(
  assistant: Assistant,
  records: Sequence[dict],
  sampling: SamplingConfig,
  output_dir: str,
  *,
  batch_size: int = 8,
  submission: str | None = None,
  submission_questions: str | None = None,
  progress: bool = True,
) -> dict[str, float]:
  """Predicts, scores, and writes to `output_dir`: predictions.jsonl, metrics.json, the results
  table (results.md, results.csv) and the per-category chart (categories.png, when matplotlib is
  installed); with `submission` (a submission.FORMATS name) also `{submission}_submission.json`.
  Items scored by an external judge (MM-Vet) need `submission='mmvet'`."""
  needed = required_submission(records)
  if needed and submission != needed:
    raise ValueError(f'{JUDGED}: pass --submission={needed} (submission={needed!r})')
  predictions = predict(assistant, records, sampling, batch_size=batch_size, progress=progress)
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
  name = os.path.basename(output_dir.rstrip('/'))
  tables.write({name: results}, output_dir)
  if submission:
    submission_lib.write(
      submission,
      os.path.join(output_dir, f'{submission}_submission.json'),
      records,
      predictions,
      submission_questions,
    )
  return results
