"""The tiny EVEv1 recipe end to end (slow: ~2 minutes on 2 cores): per stage, exactly the
parameters the reference trains changed, frozen ones are bit-identical, and optimizer moments exist
for the trainable ones only. Stage graph: prealign -> pretrain -> finetune, pretrain -> finetune_hd.
"""

import json
import os

import pytest
from test_recipe import check_stage, flat, initial_params

from evejax import recipe
from evejax.convert import checkpoints

STEPS = 2
RECIPE = f'configs/eve_v1:size=tiny,steps={STEPS}'
OVERRIDES = {'data.num_train': 300, 'data.num_eval': 16, 'model.num_layers': 2}
STARTS_FROM = {'pretrain': 'prealign', 'finetune': 'pretrain', 'finetune_hd': 'pretrain'}

pytestmark = pytest.mark.slow


def reference_trainable(stage: str, name: str) -> bool:
  """Pre-alignment trains names with `vision_tower` (PEL, PAL = vision_tower_compressor) or
  `mm_projector`; later stages train everything but the CLIP teacher (not a parameter here)."""
  if stage != 'prealign':
    return True
  return 'vision_tower' in name or 'mm_projector' in name or name.startswith('pal/')


@pytest.fixture(scope='module')
def recipe_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('eve_v1_tiny'))
  recipe.run(RECIPE, root, overrides=OVERRIDES)
  return root


@pytest.mark.parametrize('stage', ['prealign', 'pretrain', 'finetune', 'finetune_hd'])
def test_stage_trains_exactly_the_reference_parameters(recipe_root, stage):
  before = (
    initial_params(RECIPE, 'prealign', recipe_root, OVERRIDES)
    if stage == 'prealign'
    else flat(checkpoints.load_params(os.path.join(recipe_root, STARTS_FROM[stage]))[0])
  )
  changed, trainable = check_stage(recipe_root, stage, before, reference_trainable, STEPS)
  assert len(changed) >= 0.8 * len(trainable), sorted(trainable - changed)
  # PAL is on in every stage of the reference: its layer trains and its loss is logged.
  assert {n for n in trainable if n.startswith('pal/')} <= changed
  assert not any('clip' in n for n in changed)  # The teacher is never a parameter.
  with open(os.path.join(recipe_root, stage, 'metrics.jsonl')) as f:
    pal_losses = [r['train/pal_loss'] for r in map(json.loads, f) if 'train/pal_loss' in r]
  assert pal_losses and all(0.0 < v < 2.0 for v in pal_losses), pal_losses


def test_prealign_gives_the_vision_side_its_own_learning_rate(recipe_root):
  config = recipe.stage_config('configs/eve_v1:size=tiny', 'prealign', recipe_root)
  assert config.optim.groups.vision.lr == 10 * config.optim.lr  # 4e-4 vs 4e-5 in the reference
