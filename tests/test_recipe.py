"""The tiny EVEv2 recipe end to end: every stage in order, each from the previous one's output.

Per stage: exactly the parameters the reference trains changed (its substring rule, EVE_REFERENCE
§5.2, written out here independently of the configs' regexes), frozen ones are bit-identical to the
stage's starting weights, and the optimizer state holds moments for the trainable ones only.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

from evejax import recipe, sharding
from evejax.convert import checkpoints
from evejax.models import EVE, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The recipe CLI trains all five tiny stages once (~90 s): run with -m slow, like test_recipe_v1.
pytestmark = pytest.mark.slow
STEPS = 2
RECIPE = f'configs/eve_v2:size=tiny,steps={STEPS}'
OVERRIDES = {'data.num_train': 300, 'data.num_eval': 16, 'model.num_layers': 2}


def reference_trainable(stage: str, name: str) -> bool:
  """The reference's rule: (vision_tower and tune_VE) or (moe and tune_MOE) or (neither and
  tune_LLM)."""
  tune_moe, tune_llm = {
    'stage0': (False, False),
    'stage1_0': (True, False),
    'stage1_1': (True, False),
    'stage2': (True, True),
    'stage3': (True, True),
  }[stage]
  if 'vision_tower' in name:
    return True
  if 'moe' in name:
    return tune_moe
  return tune_llm


def flat(params) -> dict[str, np.ndarray]:
  return {
    '/'.join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
  }


def saved_moments(step_dir: str) -> dict[str, dict[str, np.ndarray]]:
  """Every `mu`/`nu` leaf of a saved optimizer state, by parameter name."""
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, 'opt_state'))
  moments = {'mu': {}, 'nu': {}}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    for moment in moments:
      if moment in keys:
        moments[moment]['/'.join(keys[keys.index(moment) + 1 :])] = np.asarray(value)
  return moments


def check_stage(
  root: str, stage: str, before: dict[str, np.ndarray], is_trainable, steps: int
) -> tuple[set[str], set[str]]:
  """Checks one finished stage against its starting weights: frozen parameters bit-identical,
  only trainable ones changed (the vision tower always), optimizer moments exactly for the
  trainable ones. Returns the (changed, trainable) parameter names."""
  after = flat(checkpoints.load_params(os.path.join(root, stage))[0])
  assert set(after) == set(before)
  trainable = {n for n in after if is_trainable(stage, n)}
  changed = {n for n in after if not np.array_equal(after[n], before[n])}
  for name in set(after) - trainable:
    np.testing.assert_array_equal(after[name], before[name])  # Frozen: bit-identical.
  assert changed <= trainable
  assert {n for n in after if n.startswith('vision_tower/')} <= changed
  moments = saved_moments(os.path.join(root, stage, 'checkpoints', str(steps)))
  assert set(moments['mu']) == trainable and set(moments['nu']) == trainable
  # A trainable parameter stays put only with an exactly zero gradient: e.g. the last layer's
  # vision MLP when no loss falls on a visual position (chat template: text follows the image).
  for name in trainable - changed:
    assert not moments['mu'][name].any(), (stage, name)
  return changed, trainable


@pytest.fixture(scope='module')
def recipe_root(tmp_path_factory):
  """The recipe run by its CLI: the overrides, as --config.x=y flags, reach every training stage
  (the checks below see 2 layers and the short data)."""
  root = str(tmp_path_factory.mktemp('eve_v2_tiny'))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.recipe',
      f'--config={RECIPE}',
      f'--workdir={root}',
      *(f'--config.{key}={value}' for key, value in OVERRIDES.items()),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line.split(':')[0] for line in result.stdout.splitlines()] == [
    f'eve_v2/{stage}' for stage in recipe.stages(RECIPE) if stage != 'copy'
  ]
  return root


def initial_params(
  recipe_spec: str, stage: str, root: str, overrides: dict
) -> dict[str, np.ndarray]:
  """A first stage's random start, made as the trainer makes it (jitted init: eager init rounds
  differently)."""
  config = recipe.stage_config(recipe_spec, stage, root, overrides=overrides)
  cfg = ModelConfig.from_dict(config.model)
  _, params = sharding.init_sharded(
    lambda: EVE(cfg, rngs=nnx.Rngs(config.seed)), sharding.make_mesh(config.mesh)
  )
  return flat(params)


def test_copy_step_initialises_vision_copies_from_llm_weights(recipe_root):
  stage0, _ = checkpoints.load_params(os.path.join(recipe_root, 'stage0'))
  copied, cfg = checkpoints.load_params(os.path.join(recipe_root, 'copy'))
  stage0, copied = flat(stage0), flat(copied)
  assert cfg.decomposed_parts == ('layernorm', 'self_attn', 'mlp')
  copies = [n for n in copied if 'moe_' in n]
  assert len(copies) == 2 * 12  # Per layer: 2 norms, q/k/v (+bias), o, gate/up/down.
  for name in copies:
    np.testing.assert_array_equal(copied[name], stage0[name.replace('moe_', '')])
  assert set(copied) - set(copies) == set(stage0)
  for name in stage0:
    np.testing.assert_array_equal(copied[name], stage0[name])


@pytest.mark.parametrize('stage', ['stage0', 'stage1_0', 'stage1_1', 'stage2', 'stage3'])
def test_stage_trains_exactly_the_reference_parameters(recipe_root, stage):
  order = recipe.stages(RECIPE)
  before = (
    initial_params(RECIPE, 'stage0', recipe_root, OVERRIDES)
    if stage == 'stage0'
    else flat(checkpoints.load_params(os.path.join(recipe_root, order[order.index(stage) - 1]))[0])
  )
  changed, trainable = check_stage(recipe_root, stage, before, reference_trainable, STEPS)
  assert len(changed) >= 0.8 * len(trainable), sorted(trainable - changed)


def test_stages_start_from_the_previous_stage(recipe_root):
  for stage, previous in [
    ('stage1_0', 'copy'),
    ('stage1_1', 'stage1_0'),
    ('stage2', 'stage1_1'),
    ('stage3', 'stage2'),
  ]:
    with open(os.path.join(recipe_root, stage, 'init_from_report.json')) as f:
      report = json.load(f)
    assert report['init_from'] == os.path.join(recipe_root, previous)
    assert not report['new'] and not report['dropped']


def test_rerun_skips_completed_stages(recipe_root):
  assert recipe.run(RECIPE, recipe_root, overrides=OVERRIDES) == {}
