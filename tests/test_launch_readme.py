"""The README's "Launch on a pod / cluster" steps, run as written with DRY_RUN=1: gcloud, python
and sbatch are stand-ins that print their command line (sbatch then runs the batch script's dry
run, which prints its srun line). Every printed command is checked, and the training commands load
as the stage configs they name, each starting from the weights the step before wrote."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from evejax.config import TrainConfig
from evejax.config_utils import load_config_file
from tests.test_launch import REPO, WAIT, remote_train

BUCKET = 'my-bucket'
ROOT = f'gs://{BUCKET}/eve_v2'
STAND_IN = f"""#!{sys.executable}
import os, shlex, subprocess, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
print(shlex.join([name, *args]), flush=True)
if name == 'sbatch':  # The job's dry run: the srun line it would run.
  script = next(i for i, a in enumerate(args) if not a.startswith('-'))
  sys.exit(subprocess.run(['bash', *args[script:]]).returncode)
"""


def readme_blocks() -> list[str]:
  """The bash blocks of the README's launch section: TPU VM, GKE, SLURM."""
  with open(os.path.join(REPO, 'README.md')) as f:
    section = f.read().split('\n## Launch on a pod / cluster\n', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)```', section, re.S)


@pytest.fixture(scope='module')
def transcripts(tmp_path_factory) -> list[list[list[str]]]:
  """Per block, the commands it printed, split into words."""
  bin_dir = tmp_path_factory.mktemp('bin')
  for name in ('gcloud', 'python', 'sbatch'):
    (bin_dir / name).write_text(STAND_IN)
    (bin_dir / name).chmod(0o755)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'DRY_RUN': '1', 'USER': 'me'}
  outputs = [
    subprocess.run(
      ['bash', '-euo', 'pipefail', '-c', block],
      capture_output=True,
      text=True,
      check=True,
      cwd=REPO,
      env=env,
    ).stdout
    for block in readme_blocks()
  ]
  assert len(outputs) == 3, 'expected the TPU VM, GKE and SLURM blocks'
  return outputs


def train_config(words: list[str], workdir: str) -> TrainConfig:
  """The config that a `python -m evejax.train --config=... --workdir=...` line trains."""
  assert words[1:3] == ['-m', 'evejax.train'] and words[4] == f'--workdir={workdir}'
  return TrainConfig.parse(load_config_file(words[3].removeprefix('--config=')))


def check_stage1(cfg: TrainConfig, data_root: str, tokenizer: str):
  """Stage 1.0 as configs/eve_v2 builds it, from the copy step's output."""
  assert cfg.init_from == f'{ROOT}/copy' and cfg.init_new == ()
  assert cfg.data.path == f'{data_root}/datacomp1b-30m-index' and cfg.data.tokenizer == tokenizer
  assert cfg.model.routing == 'sorted' and cfg.data.pack_window > 1 and cfg.model.moe_part


def test_tpu_vm_steps(transcripts):
  llm = f'gs://{BUCKET}/models/Qwen2.5-7B-Instruct'
  args = f'size=7b,root={ROOT},data_root=/mnt/{BUCKET}/data,tokenizer={llm}'
  gcloud_tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  where = ['eve', '--zone=us-east5-a']
  lines = [shlex.split(line) for line in transcripts[0].splitlines()]
  ssh = [*gcloud_tpu, 'ssh', *where]
  expected = [
    ['gcloud', 'storage', 'cp', '-r', 'Qwen2.5-7B-Instruct', f'gs://{BUCKET}/models/'],
    ['python', '-m', 'evejax.convert', 'import', f'--hf_dir={llm}']
    + ['--config=configs/eve_v2/stage0.py:size=7b', f'--out={ROOT}/llm'],
    ['python', '-m', 'evejax.plan', f'--config=configs/eve_v2/stage1_0.py:{args}']
    + ['--topology=v5p-128'],
    [*gcloud_tpu, 'create', *where, '--accelerator-type=v5p-128', '--version=v2-alpha-tpuv5'],
    ['tar', '-czf', '/tmp/evejax-me.tar.gz', '-C', REPO, '--exclude=.git', '--exclude=.venv', '.'],
    [*gcloud_tpu, 'scp', '/tmp/evejax-me.tar.gz', 'eve:/tmp/evejax.tar.gz', where[1]]
    + ['--worker=all'],
    [*ssh, '--worker=all', '--command', lines[6][-1]],  # The install: test_launch.py.
    [
      *ssh,
      '--worker=all',
      '--command',
      f'bash ~/evejax/launch/gcsfuse_mount.sh {BUCKET} /mnt/{BUCKET}',
    ],
    [*ssh, '--worker=all', '--command', lines[8][-1]],  # Stage 0, below.
    [*ssh, '--worker=0', '--command', WAIT],
    ['python', '-m', 'evejax.recipe', f'--config=configs/eve_v2:{args}', f'--workdir={ROOT}']
    + ['--stages=copy'],
    [*ssh, '--worker=all', '--command', lines[11][-1]],  # Stage 1.0, below.
    [*ssh, '--worker=0', '--command', WAIT],
    [*gcloud_tpu, 'delete', *where, '--quiet'],
  ]
  assert lines == expected
  stage0, stage1 = (remote_train(lines[i][-1]) for i in (8, 11))
  assert stage0[-1] == stage1[-1] == '--config.distributed.auto=True'
  # Stage 0 starts from the imported LLM; the copy step (recipe --workdir=ROOT) writes ROOT/copy.
  assert train_config(stage0, f'{ROOT}/stage0').init_from == f'{ROOT}/llm'
  check_stage1(train_config(stage1, f'{ROOT}/stage1_0'), f'/mnt/{BUCKET}/data', llm)


def test_gke_step(transcripts):
  manifest, command = transcripts[1].rstrip('\n').rsplit('\n', 1)
  assert command == 'kubectl apply -f -'
  jobset = yaml.safe_load(manifest)
  assert jobset['metadata']['name'] == 'eve-stage1-0'
  job = jobset['spec']['replicatedJobs'][0]['template']['spec']
  pod = job['template']
  assert job['parallelism'] == 16 and pod['metadata']['annotations'] == {
    'gke-gcsfuse/volumes': 'true'
  }
  spec = pod['spec']
  assert spec['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '4x4x4'
  assert spec['serviceAccountName'] == 'evejax'
  (volume,) = spec['volumes']
  assert volume['csi']['driver'] == 'gcsfuse.csi.storage.gke.io'
  assert volume['csi']['volumeAttributes']['bucketName'] == BUCKET
  (container,) = spec['containers']
  assert container['image'] == 'us-docker.pkg.dev/my-project/evejax/evejax:latest'
  assert container['volumeMounts'] == [
    {'name': volume['name'], 'mountPath': f'/mnt/{BUCKET}', 'readOnly': True}
  ]
  train = shlex.split(container['command'][2])
  assert train[-1] == '--config.distributed.auto=True'
  llm = f'gs://{BUCKET}/models/Qwen2.5-7B-Instruct'
  check_stage1(train_config(train[:-1], f'{ROOT}/stage1_0'), f'/mnt/{BUCKET}/data', llm)


def test_slurm_steps(transcripts):
  llm = '/shared/models/Qwen2.5-7B-Instruct'
  args = f'size=7b,root={ROOT},data_root=/shared/data,tokenizer={llm}'
  stage0 = [f'configs/eve_v2/stage0.py:{args}', f'{ROOT}/stage0']
  stage1 = [f'configs/eve_v2/stage1_0.py:{args}', f'{ROOT}/stage1_0']
  srun = ['srun', '--kill-on-bad-exit=1', '--ntasks-per-node=1', 'bash', '-c']
  env_script = os.path.join(REPO, 'launch', 'slurm_env.sh')
  lines = [shlex.split(line) for line in transcripts[2].splitlines()]
  assert lines == [
    ['python', '-m', 'evejax.convert', 'import', f'--hf_dir={llm}']
    + ['--config=configs/eve_v2/stage0.py:size=7b', f'--out={ROOT}/llm'],
    ['sbatch', '--wait', '--nodes=16', 'launch/slurm.sbatch', *stage0],
    [*srun, lines[2][5], 'task', env_script, *stage0],
    ['python', '-m', 'evejax.recipe', f'--config=configs/eve_v2:{args}', f'--workdir={ROOT}']
    + ['--stages=copy'],
    ['sbatch', '--nodes=16', 'launch/slurm.sbatch', *stage1],
    [*srun, lines[5][5], 'task', env_script, *stage1],
  ]
  # Each task runs "$PYTHON" -m evejax.train --config=$1 --workdir=$2 (test_launch.py runs it).
  assert '"${PYTHON:-python}" -m evejax.train "--config=$1" "--workdir=$2"' in lines[5][5]
  workdir = stage1[1]
  check_stage1(
    train_config(
      ['python', '-m', 'evejax.train', f'--config={stage1[0]}', f'--workdir={workdir}'], workdir
    ),
    '/shared/data',
    llm,
  )
