"""A user's mistake on the command line of any evejax CLI ends in one line saying what to fix, never
a Python traceback (unless `--verbosity=1` asks for it). The commands start together: most of each
one's time is importing JAX."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_checkpoint import data_iterator, flip_one_byte, make_state

from evejax.checkpoint import Checkpointer, store
from evejax.checkpoint import manager as manager_lib

REPO = __file__.rsplit('/tests/', 1)[0]
TRAIN = [
  '-m',
  'evejax.train',
  '--config=configs/demo.py',
  '--config.total_steps=2',
  '--config.data.num_train=64',
  '--config.data.num_eval=8',
  '--config.model.num_layers=1',
]


def start(*args):
  return subprocess.Popen(
    [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def last_line(process) -> str:
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def test_user_errors_are_one_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  image = tmp_path / 'image.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  good = [{'from': 'human', 'value': '<image>'}, {'from': 'gpt', 'value': 'x'}]
  entries = [{'id': 'ok', 'image': 'image.png', 'conversations': good}] + [
    {'id': f'gone{i}', 'image': 'gone.png', 'conversations': good} for i in range(3)
  ]
  (tmp_path / 'entries.json').write_text(json.dumps(entries))
  runs = {
    'workdir_file': start(*TRAIN, f'--workdir={a_file}'),
    'workdir_file_verbose': start(*TRAIN, f'--workdir={a_file}', '--verbosity=1'),
    'no_manifest': start(
      *TRAIN,
      f'--workdir={tmp_path / "w1"}',
      '--config.data.source=records',
      f'--config.data.path={tmp_path / "no_data"}',
    ),
    'no_init_from': start(
      *TRAIN, f'--workdir={tmp_path / "w2"}', f'--config.init_from={tmp_path / "nothing"}'
    ),
    'convert': start(
      '-m',
      'data_pipelines.llava_json',
      f'--json={tmp_path / "entries.json"}',
      f'--image_dir={tmp_path}',
      f'--out_dir={tmp_path / "converted"}',
      '--workers=1',
    ),
  }
  assert last_line(runs['workdir_file']) == (
    f'ConfigError: --workdir={a_file} is a file: give a directory (created if missing)'
  )
  _, verbose = runs['workdir_file_verbose'].communicate(timeout=300)
  assert 'Traceback' in verbose and 'is a file' in verbose
  assert last_line(runs['no_manifest']) == (
    f'FileNotFoundError: no manifest {tmp_path}/no_data/train.manifest.json: convert the data '
    'with data_pipelines/ first (or check data.path and data.train_split / data.eval_split)'
  )
  assert last_line(runs['no_init_from']).startswith(
    f'CheckpointError: init_from={tmp_path}/nothing: {tmp_path}/nothing does not exist'
  )
  assert last_line(runs['convert']).startswith(
    f'TooManyBadRecords: 3 of 4 entries of {tmp_path}/entries.json are bad'
  )


@pytest.mark.slow  # Builds the model and restores: ~30 s more.
def test_no_readable_checkpoint_is_one_line(tmp_path):
  damaged = tmp_path / 'damaged'  # Its only checkpoint fails its checksums.
  ckpt = Checkpointer(str(damaged / 'checkpoints'), every=1, keep_last=3)
  ckpt.save(1, make_state(1), data_iterator(), {})
  ckpt.close()
  flip_one_byte(damaged / 'checkpoints' / '1')
  line = last_line(start(*TRAIN, f'--workdir={damaged}'))
  assert line.startswith(
    f'CheckpointError: No readable checkpoint in {damaged}/checkpoints (step 1'
  )
  assert 'differ from the checksums' in line
  assert glob.glob(str(damaged / 'checkpoints' / '1.unreadable-*'))


def test_full_disk_on_save_is_one_line_and_resumable(tmp_path, monkeypatch):
  """A save the disk cannot hold stops before Orbax writes any of it; a disk filled during the
  save is reported alike: one line with the path and the space, and step 1 still restores."""
  directory = str(tmp_path / 'checkpoints')
  ckpt = Checkpointer(directory, every=1, keep_last=3)
  ckpt.save(1, make_state(1), data_iterator(), {})
  ckpt.wait()
  size = sum(os.path.getsize(f) for f in glob.glob(f'{directory}/1/**', recursive=True))
  usage = shutil.disk_usage(directory)
  monkeypatch.setattr(
    manager_lib.shutil, 'disk_usage', lambda path: usage._replace(free=size - 2**20)
  )
  with pytest.raises(store.CheckpointError) as raised:
    ckpt.save(2, make_state(2), data_iterator(), {})
  message = str(raised.value)
  assert message == (
    f'No space left on the device of {directory} for the checkpoint of step 2: '
    f'{(size - 2**20) / 2**20:.0f} MiB free, it needs {size / 2**20:.0f} MiB. Free space there '
    f'(or lower checkpoint.keep_last) and run the same command: it resumes from {directory}/1.'
  )
  assert os.listdir(directory) == ['1']  # Nothing half-written.
  ckpt.close()  # Closing after the failure raises nothing more.
  monkeypatch.undo()

  ckpt = Checkpointer(directory, every=1, keep_last=3)

  def full_disk(*args, **kwargs):  # What a disk filled by someone else during the save gives.
    raise ValueError('RESOURCE_EXHAUSTED: Failed writing: No space left on device')

  monkeypatch.setattr(ckpt._manager, 'save', full_disk)
  with pytest.raises(store.CheckpointError, match=f'No space left on the device of {directory}'):
    ckpt.save(2, make_state(2), data_iterator(), {})
  ckpt.close()
  restored = Checkpointer(directory, every=1, keep_last=3).restore(make_state(0), data_iterator())
  assert restored[0] == 1


@pytest.mark.slow  # Trains twice through the CLI (~1 min); needs root to mount a small tmpfs.
def test_full_disk_through_the_cli_is_one_line_and_resumes(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', str(disk)])
  if mounted.returncode:
    pytest.skip('cannot mount a tmpfs here')
  try:
    flags = [*TRAIN, '--config.total_steps=3', '--config.checkpoint.every=1', f'--workdir={disk}/w']
    line = last_line(start(*flags))  # One checkpoint (~8 MiB) fits, the second does not.
    assert line.startswith(f'CheckpointError: No space left on the device of {disk}/w/checkpoints')
    assert line.endswith(f'it resumes from {disk}/w/checkpoints/1.')
    subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True)
    resumed = start(*flags)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert 'Resumed from checkpoint' in stderr
  finally:
    subprocess.run(['umount', str(disk)])
