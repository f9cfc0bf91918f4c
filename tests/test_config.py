"""Configs: big_vision-style arguments, unknown keys rejected with a clear message; `configs` is a
package that installs with evejax and that `--config=configs/...` finds from any directory."""

import configparser
import dataclasses
import os
import subprocess
import sys

import pytest
import setuptools

from evejax import batch as bf
from evejax.config import (
  BenchmarkConfig,
  CheckpointConfig,
  GuardConfig,
  ShapesConfig,
  TrainConfig,
  default_config,
)
from evejax.config_utils import load_config_file, parse_arg, resolve_config_path
from evejax.models import ModelConfig
from evejax.models.presets import PRESETS, model_preset

REPO = __file__.rsplit('/tests/', 1)[0]


def load_config(arg=''):
  sys.path.insert(0, REPO)
  try:
    import importlib

    demo = importlib.import_module('configs.demo')
    return demo.get_config(arg)
  finally:
    sys.path.remove(REPO)


def test_parse_arg_types_and_errors():
  arg = parse_arg('size=7b,blank=True,steps=3', size='tiny', blank=False, steps=1)
  assert (arg.size, arg.blank, arg.steps) == ('7b', True, 3)
  with pytest.raises(ValueError, match="Unknown config argument 'sise'"):
    parse_arg('sise=7b', size='tiny')
  with pytest.raises(ValueError, match='must be a boolean'):
    parse_arg('blank=maybe', blank=False)


def test_every_preset_builds_a_model_config():
  for name in PRESETS:
    ModelConfig.from_dict(model_preset(name))
  cfg = ModelConfig.from_dict(model_preset('eve_v2_7b'))
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size) == (
    3584,
    28,
    4,
    152064,
  )
  with pytest.raises(ValueError, match=r"model has unknown keys \['hiden_size'\]"):
    ModelConfig.from_dict({**model_preset('eve_v2_tiny'), 'hiden_size': 3})


def test_demo_config_arguments():
  assert load_config('blank=True').data.blank_images is True
  assert load_config('').data.blank_images is False
  with pytest.raises(ValueError, match="Unknown config argument 'blanc'"):
    load_config('blanc=True')


def test_cli_rejects_unknown_override(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py',
      f'--workdir={tmp_path}',
      '--config.optim.learning_rate=0.1',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "config.optim has no key 'learning_rate'" in result.stderr
  assert "'lr'" in result.stderr  # The valid keys are listed.


def test_typed_sections_parse_once_with_defaults_types_and_unknown_keys():
  config = load_config()
  cfg = TrainConfig.parse(config)
  # What the demo sets, and what it leaves at the one home of the defaults (evejax/config.py).
  assert (cfg.optim.lr, cfg.data.pack_window, cfg.checkpoint.every) == (5e-4, 128, 200)
  assert cfg.guard == GuardConfig() and cfg.benchmark == BenchmarkConfig()
  assert isinstance(cfg.data.shapes, ShapesConfig) and cfg.data.shapes.turns == 3
  # default_config() lists every field, so any of them can be overridden from the command line.
  assert TrainConfig.parse(default_config()) == TrainConfig()
  assert set(default_config().checkpoint) == {f.name for f in dataclasses.fields(CheckpointConfig)}
  assert TrainConfig.parse({'optim': {'lr': 1}}).optim.lr == 1.0  # An int is a valid float ...
  with pytest.raises(ValueError, match=r"config.data.seq_len='long' must be of type int"):
    TrainConfig.parse({'data': {'seq_len': 'long'}})  # ... a string is not an int.
  with pytest.raises(
    ValueError,
    match=r"config.guard has unknown keys \['mode'\]; valid keys: "
    r"\['max_skipped', 'nonfinite'\]",
  ):
    TrainConfig.parse({'guard': {'mode': 'skip'}})
  with pytest.raises(ValueError, match=r"guard.nonfinite='ignore'; use one of \('stop', 'skip'\)"):
    TrainConfig.parse({'guard': {'nonfinite': 'ignore'}})
  with pytest.raises(ValueError, match='total_steps=0 must be >= 1'):
    TrainConfig.parse({'total_steps': 0})
  with pytest.raises(ValueError, match='pal.weight > 0 needs model.pal=True'):
    TrainConfig.parse({'pal': {'weight': 1.0}, 'model': {'pal': False}})


def test_batch_spec_is_built_from_model_and_data_once():
  cfg = TrainConfig.parse(load_config())
  spec = cfg.batch_spec()
  assert (spec.seq_len, spec.patch_slots, spec.patch_shape) == (256, 96, (4, 16 * 16 * 3))
  assert set(spec.zeros(2)) == set(bf.KEYS) and spec.zeros(2)['patches'].shape == (2, 96, 4, 768)
  v1 = TrainConfig.parse(
    {
      'model': model_preset('eve_v1_tiny'),
      'pal': {'weight': 1.0, 'teacher': 'offline'},
      'data': {'max_size': 168, 'resize': 'eve_v1'},
    }
  )
  spec = v1.batch_spec()
  assert spec.patch_shape == (4, 14 * 14 * 4) and spec.image_keys  # The valid-pixel channel.
  assert spec.teacher_size == 64 and spec.patch_slots == (168 // 28 + 1) ** 2
  assert set(spec.zeros()) == set(bf.KEYS) | set(bf.V1_KEYS) | {'teacher_features'}
  with pytest.raises(ValueError, match="data.resize='pad' needs the valid-pixel channel"):
    TrainConfig.parse({'data': {'resize': 'pad'}}).batch_spec()


def test_setup_installs_every_package_configs_included():
  """What `pip install .` (not editable) puts in site-packages: every folder of evejax, with or
  without an __init__.py, data_pipelines and configs."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  assert setup['options']['packages'].split('#')[0].strip() == 'find_namespace:'
  include = [p.strip() for p in setup['options.packages.find']['include'].split(',')]
  found = set(setuptools.find_namespace_packages(REPO, include=include))
  folders = {
    os.path.relpath(d, REPO).replace(os.sep, '.')
    for top in ('evejax', 'configs', 'data_pipelines')
    for d, _, files in os.walk(os.path.join(REPO, top))
    if any(f.endswith('.py') for f in files)
  }
  assert folders <= found and {'evejax.data', 'configs.eve_v1', 'configs.eve_v2'} <= found
  assert not {p for p in found if p.split('.')[0] in ('tests', 'benchmarks', 'build')}


def test_configs_paths_resolve_to_the_package_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(REPO)  # As installed: importable, but not below the directory.
  monkeypatch.chdir(tmp_path)
  import configs.demo  # pylint: disable=import-outside-toplevel

  assert configs.demo.get_config('blank=True').data.blank_images is True
  packaged = os.path.join(REPO, 'configs', 'eve_v2', 'stage0.py')
  assert os.path.samefile(resolve_config_path('configs/eve_v2/stage0.py'), packaged)
  assert load_config_file('configs/demo.py:blank=True').data.blank_images is True
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'demo.py').write_text(
    'def get_config(arg=None):\n  return {"local": arg}\n'
  )
  assert load_config_file('configs/demo.py:x') == {'local': 'x'}  # A local file comes first.
  with pytest.raises(
    FileNotFoundError,
    match=r"Config 'configs/nope.py' does not exist \(relative "
    rf'to {tmp_path}, nor in the installed configs package\)',
  ):
    load_config_file('configs/nope.py')
  with pytest.raises(
    FileNotFoundError,
    match=r"Config 'demo.py' does not exist \(relative to "
    rf'{tmp_path}\)$',
  ):
    load_config_file('demo.py')  # Only configs/... paths have a packaged fallback.


def test_cli_finds_packaged_configs_and_names_a_missing_one(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)  # As installed; the working directory has no configs/.
  found = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py:blank=True',
      f'--workdir={tmp_path}',
      '--config.optim.lrr=0.1',
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "Invalid command line: --config.optim.lrr: config.optim has no key 'lrr'" in found.stderr
  missing = subprocess.run(
    [sys.executable, '-m', 'evejax.train', '--config=configs/nope.py', f'--workdir={tmp_path}'],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert missing.returncode != 0
  assert (
    "Invalid command line: Config 'configs/nope.py' does not exist (relative to "
    f'{tmp_path}, nor in the installed configs package)'
  ) in missing.stderr
  assert 'Traceback' not in missing.stderr


def test_cli_names_an_invalid_config_value_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py',
      f'--workdir={tmp_path}',
      '--config.total_steps=0',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == 'ConfigError: total_steps=0 must be >= 1'
