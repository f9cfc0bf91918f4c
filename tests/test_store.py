"""The checkpoint store: every kind of path finds its params item, a folder that is not a checkpoint
is a clear error, metadata round-trips, and a run writes its config.json before any checkpoint."""

import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from evejax.checkpoint import Checkpointer, CheckpointError, load_params, store
from evejax.config_utils import load_config_file
from evejax.models import ModelConfig
from evejax.train import trainer
from tests.conftest import TINY
from tests.test_checkpoint import data_iterator, make_state

REPO = __file__.rsplit('/tests/', 1)[0]


@pytest.fixture
def workdir(tmp_path):
  """A training workdir with complete steps 1 and 2, and a half-written step 3."""
  ckpt = Checkpointer(store.checkpoints_dir(str(tmp_path)), every=1, keep_last=3)
  for step in (1, 2):
    ckpt.save(step, make_state(step), data_iterator(), {'config': {'model': TINY, 'seed': step}})
  ckpt.close()
  steps = tmp_path / 'checkpoints'
  shutil.copytree(steps / '2', steps / '3.orbax-checkpoint-tmp')  # A save killed half-way.
  return tmp_path


def test_every_kind_of_path_resolves_to_its_params_item(workdir, tmp_path_factory):
  newest = str(workdir / 'checkpoints' / '2' / 'params')
  assert store.resolve_params_dir(str(workdir)) == newest
  assert store.resolve_params_dir(str(workdir / 'checkpoints')) == newest
  assert store.resolve_params_dir(str(workdir / 'checkpoints' / '1')) == str(
    workdir / 'checkpoints' / '1' / 'params'
  )
  imported = tmp_path_factory.mktemp('import') / 'out'
  store.write_params_folder(str(imported), make_state(7).params, {'model': TINY})
  assert store.resolve_params_dir(str(imported)) == str(imported / 'params')


@pytest.mark.parametrize('kind', ['empty folder', 'missing', 'workdir without steps'])
def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, kind):
  path = tmp_path / 'run'
  if kind == 'empty folder':
    path.mkdir()
    (path / 'notes.txt').write_text('not a checkpoint')
  elif kind == 'workdir without steps':  # A run that has not saved its first step yet.
    (path / 'checkpoints').mkdir(parents=True)
  hint = re.escape(str(path)) + ' .*give a training workdir, its checkpoints/ folder'
  with pytest.raises(CheckpointError, match=hint):
    store.resolve_params_dir(str(path))
  # init_from names the setting the path came from.
  with pytest.raises(CheckpointError, match=re.escape(f'init_from={path}: {path} ')):
    load_params(str(path), make_state(0).params)


def test_import_output_metadata_round_trips(tmp_path):
  cfg = ModelConfig(**TINY)
  config = {'model': dataclasses.asdict(cfg)}
  store.write_params_folder(str(tmp_path), make_state(3).params, config, converted_from='hf/x')
  assert store.read_metadata(str(tmp_path)) == {'config': config, 'converted_from': 'hf/x'}
  assert store.saved_config(str(tmp_path)) == config
  assert store.saved_model_config(str(tmp_path)) == cfg


def test_training_step_metadata_is_read_from_any_path_of_the_run(workdir):
  assert store.saved_config(str(workdir)) == {'model': TINY, 'seed': 2}  # The newest step.
  assert store.saved_config(str(workdir / 'checkpoints' / '1'))['seed'] == 1
  assert store.saved_model_config(str(workdir)) == ModelConfig(**TINY)


def test_missing_metadata_names_the_folder(tmp_path):
  store.write_params_folder(str(tmp_path), make_state(3).params, {})
  shutil.rmtree(tmp_path / 'metadata')
  with pytest.raises(CheckpointError, match=re.escape(f'{tmp_path} has no metadata/ item')):
    store.saved_model_config(str(tmp_path))


def test_restore_gives_back_the_saved_rng(workdir):
  ckpt = Checkpointer(store.checkpoints_dir(str(workdir)), every=1, keep_last=3)
  _, state, _ = ckpt.restore(make_state(0), data_iterator())
  np.testing.assert_array_equal(state.rng, make_state(2).rng)
  assert state.rng.dtype == jnp.uint32
  ckpt.close()


class _Stop(Exception):
  pass


def test_run_writes_its_config_before_the_first_checkpoint(tmp_path, monkeypatch):
  config = load_config_file(os.path.join(REPO, 'configs', 'demo.py'))
  config.total_steps, config.seed = 7, 123
  config.model.num_layers, config.data.num_train, config.data.num_eval = 1, 400, 8
  seen = {}

  def stop_at_the_checkpointer(*args, **kwargs):
    """Where the run would start checkpointing: record what is on disk, then end the run."""
    del args, kwargs
    seen['checkpoints'] = os.path.exists(store.checkpoints_dir(str(tmp_path)))
    with open(store.run_config_file(str(tmp_path))) as f:
      seen['config'] = json.load(f)
    raise _Stop

  monkeypatch.setattr(Checkpointer, '__init__', stop_at_the_checkpointer)
  with pytest.raises(_Stop):
    trainer.train(config, str(tmp_path))
  assert seen['checkpoints'] is False
  assert seen['config'] == json.loads(config.to_json_best_effort())
  assert (seen['config']['total_steps'], seen['config']['seed']) == (7, 123)
  assert seen['config']['model']['num_layers'] == 1
