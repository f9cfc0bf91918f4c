"""Per-chip memory of every 7B stage (EVEv2 and EVEv1) from the TPU compiler: runs `python -m
evejax.plan --topology=T` for each stage and slice (one JSON each, kept: a rerun skips those done),
then writes the table into README.md.

  python benchmarks/plan_7b.py [--topologies=v5p-256,v6e-256] [--workers=1] [--only=eve_v2/stage2]
  python benchmarks/plan_7b.py --render   # the table from the JSONs there are

Each compile of a 7B stage takes ~200 s of one CPU core (libtpu's compiler; 12 min wall on a busy
2-core host). The mesh is the config's (fsdp over every chip) where the global batch splits over the
chips, else fsdp over the batch's rows and tensor over the rest.
"""

import argparse
import concurrent.futures
import importlib
import json
import math
import os
import subprocess
import sys

from configs.eve_v1 import common as v1_common
from configs.eve_v2 import common as v2_common
from evejax.sharding import topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'plan_7b')
DOC = os.path.join(REPO, 'README.md')
# The training stages of each recipe (EVEv2's 'copy' is a weight copy, not a training stage).
STAGES = {
  'eve_v2': tuple(s for s in v2_common.STAGES if s != 'copy'),
  'eve_v1': v1_common.STAGES,
}
GiB = 2**30


def mesh_for(batch: int, chips: int) -> str:
  """fsdp over every chip where the batch's rows split over them, else over the rows."""
  return 'fsdp=-1' if batch % chips == 0 else f'fsdp={batch},tensor={chips // batch}'


def jobs(topologies, only):
  for name in topologies:
    chips = topology.parse(name).chips
    for version, stages in STAGES.items():
      for stage in stages:
        if not only or f'{version}/{stage}' in only:
          config = importlib.import_module(f'configs.{version}.{stage}').get_config('size=7b')
          yield version, stage, name, mesh_for(config.batch_size, chips)


def run(version: str, stage: str, name: str, mesh: str) -> str:
  out = os.path.join(RESULTS, f'{version}_{stage}_{name}')
  if os.path.exists(out + '.json'):
    return f'{out}.json: done before'
  command = [
    sys.executable,
    '-m',
    'evejax.plan',
    f'--config=configs/{version}/{stage}.py:size=7b',
    f'--topology={name}',
    f'--mesh={mesh}',
    f'--json={out}.json',
  ]
  with open(out + '.log', 'w') as log:
    code = subprocess.run(
      ['nice', *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False
    ).returncode
  return f'{out}.json: ' + ('written' if code == 0 else f'FAILED ({code}), see {out}.log')


def render() -> str:
  """The markdown table of every JSON in RESULTS, stages in recipe order."""
  labels = {f'{v}_{s}': f'{v}/{s}' for v, stages in STAGES.items() for s in stages}
  order = list(labels)
  results = []
  for file in sorted(os.listdir(RESULTS)):
    if file.endswith('.json'):
      with open(os.path.join(RESULTS, file)) as f:
        result = json.load(f)
      result['stage'] = file.rsplit('_', 1)[0]
      results.append(result)
  results.sort(key=lambda r: (order.index(r['stage']), r['topology']))
  lines = [
    '| stage | slice (chip, HBM) | mesh | batch x positions | parameters + optimizer | '
    'activations, gradients, workspace | generated code | total per chip | fits | '
    'TFLOPs per chip per step | compile s |',
    '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |',
  ]
  for r in results:
    mesh = ', '.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1)
    chips = math.prod(r['mesh'].values())
    state = (r['params'] + r['opt_state']) / GiB
    code = f'{r["generated_code"] / GiB:.2f}' if 'generated_code' in r else '-'
    fits = 'yes' if r['fits'] else 'NO (compiler refused)' if 'refused' in r else 'NO'
    lines.append(
      f'| {labels[r["stage"]]} | {r["topology"]} ({r["device_kind"]}, '
      f'{r["hbm"] / GiB:.0f} GiB) | {mesh} | {r["batch_size"]} x {r["seq_len"]} | {state:.2f} | '
      f'{r.get("temporaries", 0) / GiB:.2f} | {code} | {r["total"] / GiB:.2f} | {fits} | '
      f'{r["analytic_flops"] / chips / 1e12:.0f} | {r["compile_s"]:.0f} |'
    )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topologies', default='v5p-256,v6e-256')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument(
    '--only', default='', help='comma-separated version/stage, e.g. eve_v2/stage2'
  )
  parser.add_argument('--render', action='store_true', help='only write the table')
  args = parser.parse_args()
  os.makedirs(RESULTS, exist_ok=True)
  if not args.render:
    only = set(filter(None, args.only.split(',')))
    todo = list(jobs(args.topologies.split(','), only))
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
      for line in pool.map(lambda job: run(*job), todo):
        print(line, flush=True)
  table = render()
  with open(DOC) as f:
    doc = f.read()
  start, end = '<!-- plan_7b table -->', '<!-- end plan_7b table -->'
  head, _, rest = doc.partition(start)
  _, _, tail = rest.partition(end)
  with open(DOC, 'w') as f:
    f.write(f'{head}{start}\n{table}\n{end}{tail}')
  print(table)


if __name__ == '__main__':
  main()
