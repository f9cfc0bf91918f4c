"""Configs: big_vision-style arguments, unknown keys rejected with a clear message."""
import subprocess
import sys

import pytest

from evejax.config_utils import parse_arg
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
  with pytest.raises(ValueError, match=r"model has unknown keys \['hiden_size'\]"):
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
