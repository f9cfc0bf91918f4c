"""CLI: one results table and chart for several evaluation runs.

  python -m evejax.evaluation.report --runs=eval/gqa,eval/mmmu,eval/ocrbench --out=eval/report

Each run folder holds the metrics.json of `python -m evejax.evaluation`; its name labels the
benchmark. Writes results.md, results.csv and categories.png to --out (tables.py) and prints the
table.
"""

import json
import os

from absl import flags, logging

from evejax import cli, storage
from evejax.evaluation import tables

_RUNS = flags.DEFINE_list('runs', None, 'Output folders of evaluation runs (with metrics.json).')
_OUT = flags.DEFINE_string('out', None, 'Folder for results.md, results.csv and categories.png.')
flags.mark_flags_as_required(['runs', 'out'])


def read_runs(folders: list[str]) -> dict[str, dict[str, float]]:
  runs = {}
  for folder in folders:
    path = os.path.join(folder, 'metrics.json')
    if not storage.exists(path):
      raise FileNotFoundError(
        f'--runs: {path} does not exist; pass folders written by python -m evejax.evaluation'
      )
    runs[os.path.basename(folder.rstrip('/'))] = json.loads(storage.read_text(path))
  return runs


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  runs = read_runs(_RUNS.value)
  tables.write(runs, _OUT.value)
  print(tables.markdown(runs), flush=True)


if __name__ == '__main__':
  cli.run(main)
