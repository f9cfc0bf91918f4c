"""Strict `init_from`: a model parameter the source lacks is an error naming it, the source and the
fix, unless `config.init_new` lists it; the recipes list exactly the parts a stage trains from
scratch (EVEv2 stage 0: the vision tower; never the vision copies after the copy step)."""

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from configs.eve_v1 import common as v1
from configs.eve_v2 import common as v2
from evejax.checkpoint import Checkpointer, CheckpointError, load_params
from evejax.config import ConfigError, TrainConfig, default_config
from evejax.train.step import TrainState


def saved_llm(directory) -> dict:
  """An 'LLM' checkpoint: embedding and one layer without vision copies."""
  params = {
    'embed': jnp.arange(12.0).reshape(3, 4),
    'layers': {0: {'mlp': {'kernel': jnp.ones((4, 4))}}},
  }
  ckpt = Checkpointer(str(directory), every=1, keep_last=1)
  state = TrainState.create(params, {}).replace(step=jnp.asarray(1, jnp.int32))
  ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {})
  ckpt.wait()
  return params


def decomposed_model() -> dict:
  """The same LLM with a vision copy of the MLP and a vision tower, all zeros ('fresh')."""
  return {
    'embed': jnp.zeros((3, 4)),
    'layers': {0: {'mlp': {'kernel': jnp.zeros((4, 4))}, 'moe_mlp': {'kernel': jnp.zeros((4, 4))}}},
    'vision_tower': {'conv': {'kernel': jnp.zeros((2, 4))}},
  }


def test_missing_parameters_are_an_error_naming_them_and_the_fix(tmp_path):
  saved_llm(tmp_path)
  with pytest.raises(CheckpointError) as error:
    load_params(str(tmp_path), decomposed_model())
  message = str(error.value)
  assert f'init_from={tmp_path}' in message and 'lacks 2 parameters' in message
  assert 'layers/0/moe_mlp/kernel' in message and 'vision_tower/conv/kernel' in message
  assert '--stages=copy' in message and '--moe_part' in message and 'config.init_new' in message
  # Listing only the tower leaves the vision copy missing: still an error, naming only it.
  with pytest.raises(CheckpointError, match=r'lacks 1 parameters of the model: layers/0/moe_mlp'):
    load_params(str(tmp_path), decomposed_model(), new=('^vision_tower/',))


def test_parameters_listed_in_init_new_start_fresh(tmp_path):
  saved = saved_llm(tmp_path)
  params, report = load_params(str(tmp_path), decomposed_model(), new=('^vision_tower/', '/moe_'))
  assert report['new'] == ['layers/0/moe_mlp/kernel', 'vision_tower/conv/kernel']
  np.testing.assert_array_equal(params['embed'], saved['embed'])
  np.testing.assert_array_equal(params['layers'][0]['mlp']['kernel'], 1.0)
  np.testing.assert_array_equal(params['layers'][0]['moe_mlp']['kernel'], 0.0)


def test_init_new_must_be_regexes():
  config = default_config()
  config.init_new = ('[unclosed',)
  with pytest.raises(ConfigError, match=r"init_new entry '\[unclosed' is not a regex"):
    TrainConfig.parse(config)


@pytest.mark.parametrize('size', ['7b', 'tiny'])
def test_recipes_list_only_the_parts_trained_from_scratch(size):
  arg = f'size={size},root=/r,text_llm=True'
  for stage in ('stage0', 'stage1_0', 'stage1_1', 'stage2', 'stage3'):
    config = v2.stage_config(stage, arg)
    assert tuple(config.init_new) == (('^vision_tower/',) if stage == 'stage0' else ()), stage
  for stage in v1.STAGES:
    config = v1.stage_config(stage, arg + ',teacher=offline')
    assert tuple(config.init_new) == ((v1.VISION,) if stage == 'prealign' else ()), stage
