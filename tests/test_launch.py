"""Launch scripts: syntax and lint, the exact commands of their dry runs, and the SLURM script's
jax.distributed set-up with the SLURM environment simulated for 2 local processes."""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
  glob.glob(os.path.join(REPO, 'launch', '*.sh')) + [os.path.join(REPO, 'launch', 'slurm.sbatch')]
)
CONFIG = 'configs/eve_v2/stage1_0.py:size=7b,root=gs://b/eve_v2'
WORKDIR = "gs://b/eve_v2/stage1_0 it's"
FLAGS = ['--config.optim.lr=0.0001', '--config.optim.trainable=^vision_tower/|/moe_']
TRAIN = ['python', '-m', 'evejax.train', f'--config={CONFIG}', f'--workdir={WORKDIR}', *FLAGS]


STATUS = '~/evejax_train.status'
WAIT = (
  f'while [ ! -e {STATUS} ]; do sleep 60; done; tail -n 5 ~/evejax_train.log; exit $(cat {STATUS})'
)


def remote_train(command: str) -> list[str]:
  """The training command line inside `launch/tpu_vm.sh run`'s remote command: detached, its log
  and exit status in the worker's home."""
  words = shlex.split(command)
  assert words[:8] == ['cd', '~/evejax', '&&', 'rm', '-f', STATUS, '&&', 'nohup']
  assert words[8:10] == ['bash', '-c'] and words[11:] == ['>', '~/evejax_train.log', '2>&1', '&']
  train, status = words[10].rsplit('; ', 1)
  assert status == f'echo $? > {STATUS}'
  return shlex.split(train)


def dry_run(script: str, *args: str, **env: str) -> str:
  return subprocess.run(
    [os.path.join(REPO, 'launch', script), *args],
    capture_output=True,
    text=True,
    check=True,
    cwd=REPO,
    env={'PATH': os.environ['PATH'], 'DRY_RUN': '1', **env},
  ).stdout


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_bash_syntax_and_shellcheck(script):
  subprocess.run(['bash', '-n', script], check=True)
  shellcheck = shutil.which('shellcheck') or os.path.join(
    os.path.dirname(sys.executable), 'shellcheck'
  )
  result = subprocess.run(
    [shellcheck, '-x', script], capture_output=True, text=True, cwd=os.path.dirname(script)
  )
  assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  env = dict(TPU_NAME='pod', ZONE='us-east5-a', PROJECT='proj')
  where = ['--zone=us-east5-a', '--project=proj']
  assert shlex.split(dry_run('tpu_vm.sh', 'create', **env, SPOT='1')) == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'create',
    'pod',
    *where,
    '--accelerator-type=v5p-64',
    '--version=v2-alpha-tpuv5',
    '--spot',
  ]
  words = shlex.split(dry_run('tpu_vm.sh', 'run', CONFIG, WORKDIR, *FLAGS, **env))
  assert words[:-1] == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'ssh',
    'pod',
    *where,
    '--worker=all',
    '--command',
  ]
  # The interpreter of the venv that `setup` makes, in ~/evejax where the command starts.
  venv_train = ['.venv/bin/python', *TRAIN[1:]]
  assert remote_train(words[-1]) == [*venv_train, '--config.distributed.auto=True']
  # `wait` polls worker 0 for the status that the run leaves behind, then exits with it.
  wait = shlex.split(dry_run('tpu_vm.sh', 'wait', **env))
  assert wait[-3:] == ['--worker=0', '--command', WAIT]
  assert shlex.split(dry_run('tpu_vm.sh', 'mount', 'bkt', **env))[-1] == (
    'bash ~/evejax/launch/gcsfuse_mount.sh bkt /mnt/bkt'
  )
  install = shlex.split(dry_run('tpu_vm.sh', 'setup', **env).splitlines()[-1])[-1]
  # Python >= 3.11 in a venv inside the checkout (the images have 3.10), with the TPU build of jax.
  assert install.split(' && ')[2:] == [
    'cd ~/evejax',
    'python3 -m pip install -q --user uv',
    'python3 -m uv venv -q --allow-existing --python 3.12 .venv',
    "python3 -m uv pip install -q --python .venv/bin/python -e '.[tpu]'",
  ]
  assert shlex.split(dry_run('tpu_vm.sh', 'teardown', **env)) == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'delete',
    'pod',
    *where,
    '--quiet',
  ]


def test_tpu_vm_needs_its_settings():
  result = subprocess.run(
    [os.path.join(REPO, 'launch', 'tpu_vm.sh'), 'create'],
    capture_output=True,
    text=True,
    env={'PATH': os.environ['PATH']},
  )
  assert result.returncode == 2 and 'set TPU_NAME and ZONE' in result.stderr


def test_gke_dry_run_prints_a_jobset_running_the_trainer_on_every_host():
  out = dry_run(
    'gke.sh', CONFIG, WORKDIR, *FLAGS, IMAGE='gcr.io/p/evejax:1', NAME='eve-s1', HOSTS='8'
  )
  manifest, command = out.rstrip('\n').rsplit('\n', 1)
  assert command == 'kubectl apply -f -'
  jobset = yaml.safe_load(manifest)
  assert jobset['kind'] == 'JobSet' and jobset['metadata']['name'] == 'eve-s1'
  job = jobset['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == job['completions'] == 8
  container = job['template']['spec']['containers'][0]
  assert container['image'] == 'gcr.io/p/evejax:1'
  assert container['command'][:2] == ['bash', '-c']
  assert shlex.split(container['command'][2]) == [*TRAIN, '--config.distributed.auto=True']

  xpk = shlex.split(
    dry_run('gke.sh', CONFIG, WORKDIR, *FLAGS, IMAGE='img', NAME='eve-s1', XPK='1', CLUSTER='c')
  )
  assert xpk[:7] == [
    'xpk',
    'workload',
    'create',
    '--cluster=c',
    '--workload=eve-s1',
    '--docker-image=img',
    '--tpu-type=v5p-128',
  ]
  assert shlex.split(xpk[-1].removeprefix('--command=')) == [
    *TRAIN,
    '--config.distributed.auto=True',
  ]


def test_slurm_dry_run_prints_the_srun_command():
  words = shlex.split(dry_run('slurm.sbatch', CONFIG, WORKDIR, *FLAGS))
  env_script = os.path.join(REPO, 'launch', 'slurm_env.sh')
  assert words[:4] == ['srun', '--kill-on-bad-exit=1', '--ntasks-per-node=1', 'bash']
  assert words[6:] == ['task', env_script, CONFIG, WORKDIR, *FLAGS]


FAKE_SRUN = """\
#!/usr/bin/env bash
# Simulated srun: the command once per task, locally, with SLURM_PROCID set.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i "$@" > "$TASK_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
FAKE_SCONTROL = """\
#!/usr/bin/env bash
# Simulated `scontrol show hostnames NODELIST`: both nodes are this machine.
printf 'localhost\\nlocalhost\\n'
"""
# Stands in for the interpreter: joins the distributed system as the trainer does, gathers a value
# from every process, and reports what it was started with.
PROBE = f"""\
#!/usr/bin/env bash
exec {sys.executable} - "$@" <<'PY'
import json, os, sys
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from evejax.sharding import distributed
distributed.initialize({{}})
gathered = multihost_utils.process_allgather(jnp.array([10 + jax.process_index()]))
print(json.dumps(dict(index=jax.process_index(), count=jax.process_count(),
                      devices=jax.device_count(), gathered=gathered.ravel().tolist(),
                      argv=sys.argv[1:], address=os.environ['JAX_COORDINATOR_ADDRESS'])))
PY
"""


def test_slurm_sets_up_jax_distributed_from_slurm_variables(tmp_path):
  bin_dir, logs = tmp_path / 'bin', tmp_path / 'logs'
  bin_dir.mkdir()
  logs.mkdir()
  for name, text in [('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL), ('python', PROBE)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(
    os.environ,
    PATH=f'{bin_dir}:{os.environ["PATH"]}',
    TASK_LOGS=str(logs),
    PYTHON=str(bin_dir / 'python'),
    SLURM_JOB_ID='4242',
    SLURM_NTASKS='2',
    SLURM_JOB_NODELIST='node[1-2]',
    SLURM_SUBMIT_DIR=REPO,
    JAX_PLATFORMS='cpu',
  )
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
    [os.path.join(REPO, 'launch', 'slurm.sbatch'), CONFIG, WORKDIR, *FLAGS],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
  )
  reports = [(logs / f'task{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, reports
  for index, report in enumerate(reports):
    seen = json.loads(report.strip().splitlines()[-1])
    # The coordinator: the first node, on a port derived from the job id (20000 + 4242).
    assert seen == dict(
      index=index,
      count=2,
      devices=2,
      gathered=[10, 11],
      argv=['-m', 'evejax.train', f'--config={CONFIG}', f'--workdir={WORKDIR}', *FLAGS],
      address='localhost:24242',
    )


def test_slurm_env_outside_a_job_is_a_clear_error():
  result = subprocess.run(
    ['bash', '-c', f'source {REPO}/launch/slurm_env.sh'],
    capture_output=True,
    text=True,
    env={'PATH': os.environ['PATH']},
  )
  assert result.returncode != 0 and 'not inside a SLURM job' in result.stderr
