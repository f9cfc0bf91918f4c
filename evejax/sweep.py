"""Sweeps (big_vision style): a config file may define `sweep(add)`, calling `add` once per run with
dotted overrides of its config:

  def sweep(add):
    for lr in (1e-3, 2e-3):
      for blank in (False, True):
        add(**{'optim.lr': lr, 'data.blank_images': blank})

  python -m evejax.sweep --config=configs/eve_v2/ablate_decomposition.py:root=/tmp/eve_v2 \
      --workdir=/tmp/sweep                                                         # list the runs
  python -m evejax.sweep --config=... --workdir=... --mode=commands --launcher=slurm  # launch lines
  python -m evejax.sweep --config=... --workdir=... --mode=run       # train them here, in turn
  python -m evejax.sweep --config=... --workdir=... --mode=results   # final metrics per run
  python -m evejax.sweep --config=... --workdir=... --seeds=0,1,2 --mode=results --plot

`--config.x=y` overrides on the command line apply to every run, before the run's own. Run i
writes to WORKDIR/<i>_<its own overrides>; running again resumes each run from its checkpoint.
`--seeds` repeats every run once per seed (SEED_KEYS set to it) in WORKDIR/<i>_<...>/seed<s>;
`--mode=results` then also writes mean and std over the seeds of each variant to
WORKDIR/results.{csv,json}, and `--plot` learning curves and a bar chart (evejax/sweep_results.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from evejax import cli, storage, sweep_results
from evejax.config_utils import (
  apply_overrides,
  load_config_file,
  resolve_config_path,
  run_config_module,
)
from evejax.metrics.writers import read_jsonl

LAUNCHERS = {
  # How each launcher takes `CONFIG WORKDIR [--config.key=value ...]` (see launch/).
  'local': 'python -m evejax.train --config={config} --workdir={workdir}',
  'slurm': 'sbatch launch/slurm.sbatch {config} {workdir}',
  'tpu': 'launch/tpu_vm.sh run {config} {workdir}',
  'gke': 'launch/gke.sh {config} {workdir}',
}
RESULT_KEYS = ('train/loss', 'eval/loss', 'eval/accuracy')
# What a seed sets: the initialisation of new parameters and the data (order and, for the demo
# data, the generated examples and held-out set).
SEED_KEYS = ('seed', 'data.seed')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict[str, Any]
  workdir: str
  index: int = 0  # Of the variant in sweep(add)'s order (`--runs` selects by it).
  variant: str = ''  # The name shared by the variant's seeds ('' = the run's name).

  def flags(self) -> list[str]:
    return [f'--config.{k}={v}' for k, v in self.overrides.items()]


def _slug(overrides: dict[str, Any]) -> str:
  parts = [f'{key.rsplit(".", 1)[-1]}={value}' for key, value in overrides.items()]
  return re.sub(r'[^A-Za-z0-9_.=+-]+', '-', '-'.join(parts))[:80]


def expand(
  config_spec: str,
  workdir: str,
  overrides: dict[str, Any] | None = None,
  seeds: Sequence[int] = (),
) -> list[Run]:
  """The runs that `sweep(add)` in the config file defines, each override checked against the
  config. `overrides` (the command line's) come first in every run; a run's name and workdir
  follow from its own. With `seeds`, every run once per seed (SEED_KEYS), in a seed<s> folder."""
  path = config_spec.partition(':')[0]
  sweep_fn: Callable | None = run_config_module(resolve_config_path(path)).get('sweep')
  if sweep_fn is None:
    raise ValueError(f'{path} defines no sweep(add) function')
  added: list[dict[str, Any]] = []
  sweep_fn(
    lambda **overrides: added.append({k.removeprefix('config.'): v for k, v in overrides.items()})
  )
  if not added:
    raise ValueError(f'sweep(add) in {path} added no run')
  config = load_config_file(config_spec)
  runs = []
  for index, own in enumerate(added):
    merged = {**(overrides or {}), **own}
    apply_overrides(config.copy_and_resolve_references(), merged, where=f'{path} run {index}')
    name = f'{index:02d}_{_slug(own)}' if own else f'{index:02d}'
    if not seeds:
      runs.append(Run(name, merged, os.path.join(workdir, name), index, name))
    for seed in seeds:
      seeded = {**merged, **dict.fromkeys(SEED_KEYS, seed)}
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      runs.append(Run(f'{name}/seed{seed}', seeded, run_dir, index, name))
  return runs


def launch_command(run: Run, config_spec: str, launcher: str) -> str:
  if launcher not in LAUNCHERS:
    raise ValueError(f'Unknown launcher {launcher!r}; available: {sorted(LAUNCHERS)}')
  base = LAUNCHERS[launcher].format(
    config=shlex.quote(config_spec), workdir=shlex.quote(run.workdir)
  )
  return ' '.join([base, *map(shlex.quote, run.flags())])


def run_locally(runs: Sequence[Run], config_spec: str) -> dict[str, dict[str, float]]:
  """Trains the runs one after another in this process."""
  from evejax.train.trainer import train  # Heavy; listing and results do not need it.

  finals = {}
  for run in runs:
    logging.info('sweep run %s: %s', run.name, run.overrides)
    config = apply_overrides(load_config_file(config_spec), run.overrides, where=run.name)
    if config.metrics.wandb.project and not config.metrics.wandb.group:
      config.metrics.wandb.group = run.variant  # W&B groups a variant's seeds.
    storage.makedirs(run.workdir)
    finals[run.name] = train(config, run.workdir)
  return finals


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every metric a run wrote to {workdir}/metrics.jsonl ({} if none yet)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  latest: dict[str, float] = {}
  for record in read_jsonl(path) if storage.exists(path) else []:
    latest.update(record)
  return latest


def results_table(runs: Sequence[Run], keys: Sequence[str] = RESULT_KEYS) -> str:
  """One row per run: its overrides, the last step it logged and its final `keys`."""
  rows = [['run', 'step', *keys]]
  for run in runs:
    final = final_metrics(run.workdir)
    rows.append(
      [
        run.name,
        str(final.get('step', 'not started')),
        *(f'{final[k]:.4f}' if k in final else '-' for k in keys),
      ]
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return '\n'.join(
    '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    for row in rows
  )


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so modules can share flag names)."""
  cli.define_config_flag(
    'A config file with sweep(add), as path[:arg]; --config.x=y overrides apply to every run.'
  )
  flags.DEFINE_string('workdir', None, "Root of the runs' work directories.")
  flags.DEFINE_enum('mode', 'list', ['list', 'commands', 'run', 'results'], 'What to do.')
  flags.DEFINE_enum('launcher', 'local', sorted(LAUNCHERS), 'For --mode=commands.')
  flags.DEFINE_list('runs', [], 'Only these run indices (default: all).')
  flags.DEFINE_list('seeds', [], 'Run every run once per seed (a sweep axis, SEED_KEYS).')
  flags.DEFINE_list('keys', list(RESULT_KEYS), 'Metrics in the results table.')
  flags.DEFINE_bool('plot', False, '--mode=results: also PNG learning curves and a bar chart.')
  flags.DEFINE_string('out', None, 'Where --mode=results writes its files (default: --workdir).')
  flags.DEFINE_list(
    'curves', [], 'Metrics of the learning curves (--plot; default: the --keys logged per step).'
  )
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}')
  f, spec = flags.FLAGS, cli.config_spec()
  runs = expand(spec, f.workdir, cli.config_overrides(), [int(s) for s in f.seeds])
  if f.runs:
    wanted = {int(i) for i in f.runs}
    runs = [run for run in runs if run.index in wanted]
  if f.mode == 'list':
    for run in runs:
      print(f'{run.name}\t{run.workdir}\t{" ".join(run.flags())}')
  elif f.mode == 'commands':
    for run in runs:
      print(launch_command(run, spec, f.launcher))
  elif f.mode == 'run':
    logging.set_verbosity(logging.INFO)
    run_locally(runs, spec)
    print(results_table(runs, f.keys))
  else:
    print(results_table(runs, f.keys))
    summary = sweep_results.summarize(runs, f.keys)
    out = f.out or f.workdir
    for path in sweep_results.write_results(out, summary):
      print(f'wrote {path}')
    print(sweep_results.markdown_table(summary, f.keys))
    if f.plot:
      for path in sweep_results.plot(out, runs, summary, f.keys, f.curves):
        print(f'wrote {path}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
