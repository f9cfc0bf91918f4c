"""Results tables and a bar chart of per-category scores, from the harness's flat metrics of one or
more benchmarks: results.md (one row per benchmark with its headline number, then each benchmark's
categories), results.csv (the same numbers, one per line) and categories.png (one panel of bars per
benchmark with categories; skipped with a one-line notice without matplotlib)."""

from __future__ import annotations

import csv
import io
import os

from absl import logging

from evejax import storage

# The number each metric's benchmarks report (MME: perception + cognition, as in the EVEv2 table).
HEADLINE = {
  'vqa': 'accuracy',
  'exact': 'accuracy',
  'choice': 'accuracy',
  'pope': 'f1',
  'mme': 'total',
  'cider': 'cider',
  'relaxed': 'accuracy',
  'ocrbench': 'score',
  'mmmu': 'accuracy',
}
_PERCENT = {'accuracy', 'circular_accuracy', 'f1', 'precision', 'recall', 'unparsed', 'yes_ratio'}


def _headline_name(metric: str, results: dict[str, float]) -> str:
  if metric == 'choice' and 'choice/circular_accuracy' in results:
    return 'circular_accuracy'  # MMBench's CircularEval number.
  return HEADLINE[metric]


def headlines(results: dict[str, float]) -> dict[str, tuple[str, float]]:
  """{metric: (name, value)} of the benchmark's reported number per metric in `results`."""
  out = {}
  for metric in sorted({key.split('/')[0] for key in results if '/' in key}):
    if metric == 'mme':
      out[metric] = ('total', results['mme/perception'] + results['mme/cognition'])
    else:
      name = _headline_name(metric, results)
      out[metric] = (name, results[f'{metric}/{name}'])
  return out


def categories(results: dict[str, float]) -> dict[str, dict[str, float]]:
  """{metric: {category: headline value}}; MME's categories are its subtask scores."""
  out: dict[str, dict[str, float]] = {}
  for key, value in results.items():
    parts = key.split('/')
    if len(parts) < 2:
      continue
    metric = parts[0]
    if metric == 'mme' and parts[1] not in ('perception', 'cognition'):
      out.setdefault(metric, {})[parts[1]] = value
    elif len(parts) >= 3 and parts[-1] == _headline_name(metric, results):
      out.setdefault(metric, {})['/'.join(parts[1:-1])] = value
  return out


def _format(name: str, value: float) -> str:
  return f'{100 * value:.1f}' if name in _PERCENT else f'{value:g}'


def markdown(runs: dict[str, dict[str, float]]) -> str:
  """The summary table (percentages for fractions) and one table of categories per benchmark."""
  lines = ['| benchmark | metric | score | items | failed |', '| --- | --- | ---: | ---: | ---: |']
  for benchmark, results in runs.items():
    for metric, (name, value) in headlines(results).items():
      lines.append(
        f'| {benchmark} | {metric}/{name} | {_format(name, value)} '
        f'| {results["items"]:g} | {results["failed"]:g} |'
      )
  for benchmark, results in runs.items():
    for metric, scores in categories(results).items():
      name = headlines(results)[metric][0] if metric != 'mme' else 'score'
      lines += ['', f'**{benchmark}** ({metric}/{name} per category)', '']
      lines += ['| category | score |', '| --- | ---: |']
      lines += [f'| {c} | {_format(name, v)} |' for c, v in sorted(scores.items())]
  return '\n'.join(lines) + '\n'


def csv_text(runs: dict[str, dict[str, float]]) -> str:
  """benchmark, metric, category ('' for the whole benchmark), name, value."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['benchmark', 'metric', 'category', 'name', 'value'])
  for benchmark, results in runs.items():
    for metric, (name, value) in headlines(results).items():
      writer.writerow([benchmark, metric, '', name, value])
    for metric, scores in categories(results).items():
      name = headlines(results)[metric][0] if metric != 'mme' else 'score'
      for category, value in sorted(scores.items()):
        writer.writerow([benchmark, metric, category, name, value])
  return buffer.getvalue()


def chart(runs: dict[str, dict[str, float]], path: str) -> bool:
  """categories.png: a panel of horizontal bars per benchmark and metric with categories. False
  (and a one-line notice) without matplotlib, or when no benchmark has categories."""
  panels = [
    (benchmark, metric, scores)
    for benchmark, results in runs.items()
    for metric, scores in categories(results).items()
  ]
  if not panels:
    return False
  try:
    import matplotlib  # The `plots` extra: the chart is optional.
  except ImportError:
    logging.warning("No categories.png: the chart needs matplotlib (pip install 'evejax[plots]').")
    return False
  matplotlib.use('Agg')  # Files only: no display needed.
  from matplotlib import pyplot as plt

  heights = [0.8 + 0.25 * len(scores) for _, _, scores in panels]
  figure, axes = plt.subplots(
    len(panels), 1, figsize=(7, sum(heights)), gridspec_kw={'height_ratios': heights}, squeeze=False
  )
  for ax, (benchmark, metric, scores) in zip(axes[:, 0], panels):
    names = sorted(scores)
    name = headlines(runs[benchmark])[metric][0] if metric != 'mme' else 'score'
    percent = name in _PERCENT
    values = [100 * scores[c] if percent else scores[c] for c in names]
    bars = ax.barh(names, values, color='tab:blue')
    ax.bar_label(bars, fmt='%.1f' if percent else '%g', fontsize=6, padding=2)
    ax.set_xlim(0, (100 if percent else max(values, default=0)) * 1.08 or 1)  # Room for labels.
    ax.invert_yaxis()  # Categories read top to bottom in name order.
    ax.set_title(f'{benchmark}: {metric}/{name}' + (' (%)' if percent else ''), fontsize=9)
    ax.tick_params(labelsize=7)
  figure.tight_layout()
  storage.makedirs(os.path.dirname(path))
  with storage.local_file_for_writing(path) as local:  # Uploaded on exit for gs:// paths.
    figure.savefig(local, dpi=110, format='png')
  plt.close(figure)
  return True


def write(runs: dict[str, dict[str, float]], output_dir: str) -> bool:
  """results.md, results.csv and categories.png in `output_dir`; returns whether the chart was
  written."""
  storage.makedirs(output_dir)
  storage.write_atomic(os.path.join(output_dir, 'results.md'), markdown(runs))
  storage.write_atomic(os.path.join(output_dir, 'results.csv'), csv_text(runs))
  return chart(runs, os.path.join(output_dir, 'categories.png'))
