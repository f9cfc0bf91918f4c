"""A sweep's results: every run's metrics, mean and std over the seeds of each variant, written as
CSV and JSON, and drawn as learning curves and a bar chart (`python -m evejax.sweep --mode=results
[--plot]`, see evejax/sweep.py).

  results.json  {'keys': [...], 'variants': [{'variant', 'overrides', 'seeds', 'runs',
                 'steps', 'wall_s', 'metrics': {key: {'mean', 'std', 'values'}}}]}
  results.csv   one row per variant: variant, seeds, step, wall_s, <key> mean, <key> std, ...
  curves.png    per metric, its mean over seeds against the step, +- one std shaded
  final.png     per metric, each variant's final mean with one std as the error bar

The std is the sample standard deviation over seeds (ddof=1; 0 for one seed). Only finished runs
count (their last logged step is the total_steps of their config.json); `seeds` says how many, and
`unfinished` names the runs that have started but not finished. A finished run that never logged a
metric counts as missing for that metric (its `values` omit it).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from evejax import storage
from evejax.metrics.writers import read_jsonl

if TYPE_CHECKING:
  from evejax.sweep import Run

RESULTS_JSON, RESULTS_CSV = 'results.json', 'results.csv'
CURVES_PNG, FINAL_PNG = 'curves.png', 'final.png'


def history(workdir: str) -> list[dict[str, float]]:
  """Every record a run wrote to {workdir}/metrics.jsonl ([] if it has not started)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return read_jsonl(path) if storage.exists(path) else []


def wall_seconds(workdir: str) -> float | None:
  """From the run's config.json (written at start) to its last metrics: the run's wall time,
  compilation and evaluation included (a resumed run counts its pause too); None for object
  storage, whose modification times are the uploads'."""
  start, end = (os.path.join(workdir, name) for name in ('config.json', 'metrics.jsonl'))
  if storage.is_url(workdir) or not (os.path.exists(start) and os.path.exists(end)):
    return None
  return os.path.getmtime(end) - os.path.getmtime(start)


def finished(workdir: str, final: dict[str, float]) -> bool:
  """Whether a run logged its last step (the total_steps of its config.json, when there is one)."""
  path = os.path.join(workdir, 'config.json')
  total = None
  if storage.exists(path):
    total = json.loads(storage.read_text(path)).get('total_steps')
  return bool(final) and (total is None or final.get('step', 0) >= total)


def _stats(values: list[float]) -> dict[str, Any]:
  array = np.asarray(values, np.float64)
  return {
    'mean': float(array.mean()),
    'std': float(array.std(ddof=1)) if len(array) > 1 else 0.0,
    'values': [float(v) for v in values],
  }


def summarize(runs: Sequence[Run], keys: Sequence[str]) -> list[dict[str, Any]]:
  """Per variant (the runs sharing `Run.variant`, in sweep order): its overrides without the seed,
  the seeds that logged, and mean/std/values of each of `keys` at each run's end."""
  from evejax.sweep import SEED_KEYS, final_metrics

  variants: dict[str, list[Run]] = {}
  for run in runs:
    variants.setdefault(run.variant or run.name, []).append(run)
  summary = []
  for variant, members in variants.items():
    finals = [(run, final_metrics(run.workdir)) for run in members]
    started = [(run, final) for run, final in finals if finished(run.workdir, final)]
    walls = [w for w in (wall_seconds(run.workdir) for run, _ in started) if w is not None]
    summary.append(
      {
        'variant': variant,
        'overrides': {k: v for k, v in members[0].overrides.items() if k not in SEED_KEYS},
        'seeds': len(started),
        'runs': [run.name for run, _ in started],
        'unfinished': [run.name for run, final in finals if final and (run, final) not in started],
        'steps': [int(final['step']) for _, final in started],
        'wall_s': _stats(walls) if walls else None,
        'metrics': {
          key: _stats([final[key] for _, final in started if key in final])
          for key in keys
          if any(key in final for _, final in started)
        },
      }
    )
  return summary


def write_results(root: str, summary: list[dict[str, Any]]) -> list[str]:
  """{root}/results.json and {root}/results.csv; returns their paths."""
  keys = list(dict.fromkeys(k for variant in summary for k in variant['metrics']))
  json_path, csv_path = os.path.join(root, RESULTS_JSON), os.path.join(root, RESULTS_CSV)
  storage.makedirs(root)
  with storage.open(json_path, 'w') as f:
    json.dump({'keys': keys, 'variants': summary}, f, indent=1)
  with storage.open(csv_path, 'w') as f:
    out = csv.writer(f)
    out.writerow(
      ['variant', 'seeds', 'step', 'wall_s', *(f'{k} {s}' for k in keys for s in ('mean', 'std'))]
    )
    for variant in summary:
      metrics = variant['metrics']
      out.writerow(
        [
          variant['variant'],
          variant['seeds'],
          max(variant['steps'], default=''),
          f'{variant["wall_s"]["mean"]:.1f}' if variant['wall_s'] else '',
          *(f'{metrics[k][s]:.6g}' if k in metrics else '' for k in keys for s in ('mean', 'std')),
        ]
      )
  return [json_path, csv_path]


def markdown_table(summary: list[dict[str, Any]], keys: Sequence[str]) -> str:
  """The summary as a Markdown table: `mean ± std` per variant and metric (the mean alone when
  one seed has it)."""
  lines = [
    '| variant | seeds | ' + ' | '.join(keys) + ' |',
    '| --- | ---: | ' + ' | '.join('---:' for _ in keys) + ' |',
  ]
  for variant in summary:
    cells = []
    for key in keys:
      stat = variant['metrics'].get(key)
      if not stat:
        cells.append('-')
      elif len(stat['values']) > 1:
        cells.append(f'{stat["mean"]:.4f} ± {stat["std"]:.4f}')
      else:
        cells.append(f'{stat["mean"]:.4f}')
    lines.append(f'| {variant["variant"]} | {variant["seeds"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _curve(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """Steps logged by every seed of a variant, with the mean and std of `key` at each."""
  per_run = []
  for run in runs:
    points = {int(r['step']): r[key] for r in history(run.workdir) if key in r}
    if points:
      per_run.append(points)
  if not per_run:
    return None
  steps = sorted(set.intersection(*(set(points) for points in per_run)))
  values = np.asarray([[points[s] for s in steps] for points in per_run], np.float64)
  std = values.std(0, ddof=1) if len(per_run) > 1 else np.zeros(len(steps))
  return np.asarray(steps), values.mean(0), std


def _save(figure, path: str) -> None:
  storage.makedirs(os.path.dirname(path))
  with storage.local_file_for_writing(path) as local:  # Uploaded on exit for gs:// paths.
    figure.savefig(local, dpi=110, format='png')


def _grid(count: int):
  try:
    import matplotlib  # The `plots` extra; only --plot needs it.
  except ImportError as error:
    raise ImportError("--plot needs matplotlib: pip install 'evejax[plots]'") from error

  matplotlib.use('Agg')  # Files only: no display needed.
  from matplotlib import pyplot as plt

  cols = min(count, 3)
  rows = -(-count // cols)
  figure, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
  axes = axes.ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return plt, figure, axes


def plot(
  root: str,
  runs: Sequence[Run],
  summary: list[dict[str, Any]],
  keys: Sequence[str],
  curve_keys: Sequence[str] = (),
) -> list[str]:
  """{root}/curves.png (each of `curve_keys`, default `keys`, against the step: mean over seeds
  +- std) and {root}/final.png (each key's final mean +- std per variant); returns the paths."""
  counted = {name for variant in summary for name in variant['runs']}  # Finished runs only.
  variants: dict[str, list[Run]] = {}
  for run in runs:
    if run.name in counted:
      variants.setdefault(run.variant or run.name, []).append(run)
  curve_keys = list(curve_keys or keys)
  paths = []
  plt, figure, axes = _grid(len(curve_keys))
  for ax, key in zip(axes, curve_keys):
    for variant, members in variants.items():
      curve = _curve(members, key)
      if curve is None:
        continue
      steps, mean, std = curve
      (line,) = ax.plot(steps, mean, label=variant, linewidth=1.4)
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    figure.legend(handles, labels, loc='lower center', ncol=min(len(labels), 3), fontsize=8)
  figure.tight_layout(rect=(0, 0.06 + 0.03 * (len(variants) // 3), 1, 1))
  paths.append(os.path.join(root, CURVES_PNG))
  _save(figure, paths[-1])
  plt.close(figure)

  plt, figure, axes = _grid(len(keys))
  names = [variant['variant'] for variant in summary]
  for ax, key in zip(axes, keys):
    stats = [variant['metrics'].get(key) for variant in summary]
    means = [s['mean'] if s else np.nan for s in stats]
    errors = [s['std'] if s else 0.0 for s in stats]
    ax.bar(range(len(names)), means, yerr=errors, capsize=3, color='tab:blue', alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=40, ha='right', fontsize=7)
    ax.set_title(f'{key} (mean ± std over seeds)', fontsize=9)
    ax.grid(axis='y', alpha=0.3)
  figure.tight_layout()
  paths.append(os.path.join(root, FINAL_PNG))
  _save(figure, paths[-1])
  plt.close(figure)
  return paths
