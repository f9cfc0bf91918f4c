"""Configs: big_vision-style arguments, unknown keys rejected with a clear message; `configs` is a
package that installs with evejax and that `--config=configs/...` finds from any directory."""
import configparser
import os
import subprocess
import sys

import pytest
import setuptools

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
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size) == (3584, 28, 4, 152064)
  with pytest.raises(ValueError, match=r"Unknown model config keys \['hiden_size'\]"):
    ModelConfig.from_dict({**model_preset('eve_v2_tiny'), 'hiden_size': 3})


def test_demo_config_arguments():
  assert load_config('blank=True').data.blank_images is True
  assert load_config('').data.blank_images is False
  with pytest.raises(ValueError, match="Unknown config argument 'blanc'"):
    load_config('blanc=True')


def test_cli_rejects_unknown_override(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'evejax.train', '--config=configs/demo.py', f'--workdir={tmp_path}',
       '--config.optim.learning_rate=0.1'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "config.optim has no key 'learning_rate'" in result.stderr
  assert "'lr'" in result.stderr  # The valid keys are listed.


def test_setup_installs_every_package_configs_included():
  """What `pip install .` (not editable) puts in site-packages: every folder of evejax, with or
  without an __init__.py, data_pipelines and configs."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  assert setup['options']['packages'].split('#')[0].strip() == 'find_namespace:'
  include = [p.strip() for p in setup['options.packages.find']['include'].split(',')]
  found = set(setuptools.find_namespace_packages(REPO, include=include))
  folders = {os.path.relpath(d, REPO).replace(os.sep, '.')
             for top in ('evejax', 'configs', 'data_pipelines')
             for d, _, files in os.walk(os.path.join(REPO, top))
             if any(f.endswith('.py') for f in files)}
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
      'def get_config(arg=None):\n  return {"local": arg}\n')
  assert load_config_file('configs/demo.py:x') == {'local': 'x'}  # A local file comes first.
  with pytest.raises(FileNotFoundError, match=r"Config 'configs/nope.py' does not exist \(relative "
                     rf'to {tmp_path}, nor in the installed configs package\)'):
    load_config_file('configs/nope.py')
  with pytest.raises(FileNotFoundError, match=r"Config 'demo.py' does not exist \(relative to "
                     rf'{tmp_path}\)$'):
    load_config_file('demo.py')  # Only configs/... paths have a packaged fallback.


def test_cli_finds_packaged_configs_and_names_a_missing_one(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)  # As installed; the working directory has no configs/.
  found = subprocess.run(
      [sys.executable, '-m', 'evejax.train', '--config=configs/demo.py:blank=True',
       f'--workdir={tmp_path}', '--config.optim.lrr=0.1'], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=120)
  assert "Invalid command line: --config.optim.lrr: config.optim has no key 'lrr'" in found.stderr
  missing = subprocess.run(
      [sys.executable, '-m', 'evejax.train', '--config=configs/nope.py', f'--workdir={tmp_path}'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0
  assert ("Invalid command line: Config 'configs/nope.py' does not exist (relative to "
          f'{tmp_path}, nor in the installed configs package)') in missing.stderr
  assert 'Traceback' not in missing.stderr
