"""Stage configs against the reference's recipe tables (EVE_REFERENCE.md §5.1, §5.2)."""

import os

import pytest

from evejax import recipe
from evejax.config import TrainConfig
from evejax.models import ModelConfig

# stage: (peak LR, global batch in examples, text length, image side, template, starts from)
EVE_V2_7B = {
  'stage0': (2e-4, 1024, 2048, 800, 'plain', 'llm'),
  'stage1_0': (1e-4, 1024, 2048, 800, 'plain', 'copy'),
  'stage1_1': (5e-5, 1024, 4096, 1600, 'plain', 'stage1_0'),
  'stage2': (2e-5, 512, 4096, 1600, 'qwen2', 'stage1_1'),
  'stage3': (1e-5, 512, 5000, 1600, 'qwen2', 'stage2'),
}
EVE_V1_7B = {
  'prealign': (4e-5, 512, 2048, 672, 'plain', 'llm'),
  'pretrain': (4e-5, 512, 2048, 672, 'plain', 'prealign'),
  'finetune': (2e-5, 128, 2048, 672, 'vicuna_v1', 'pretrain'),
  'finetune_hd': (2e-5, 128, 4096, 1344, 'vicuna_v1', 'pretrain'),
}
# Row positions: the text budget plus a square max-size image's visual tokens, [CLASS] + n (n + 1)
# with n = side / token side + 1 (v2: 32 px tokens, v1: 28 px), rounded up to 128 (by hand:
# 2048 + 703 -> 2816, 4096 + 2653 -> 6784, 5000 + 2653 -> 7680, 2048 + 651 -> 2816,
# 4096 + 2451 -> 6656). Packed (examples per row): the caption stages.
ROWS = {
  'stage0': (2816, 4),
  'stage1_0': (2816, 4),
  'stage1_1': (6784, 2),
  'stage2': (6784, 1),
  'stage3': (7680, 1),
  'prealign': (2816, 4),
  'pretrain': (2816, 4),
  'finetune': (2816, 1),
  'finetune_hd': (6656, 1),
}


@pytest.mark.parametrize('name, table', [('eve_v2', EVE_V2_7B), ('eve_v1', EVE_V1_7B)])
def test_7b_stages_follow_the_reference_tables(name, table):
  assert [s for s in recipe.stages(f'configs/{name}') if s != 'copy'] == list(table)
  for stage, (lr, batch, text_len, side, template, start) in table.items():
    config = recipe.stage_config(f'configs/{name}:size=7b,data_root=/data', stage, '/runs')
    seq_len, per_row = ROWS[stage]
    assert (
      config.optim.lr,
      config.batch_size * per_row,
      config.data.max_text_len,
      config.data.seq_len,
      config.data.max_size,
      config.data.template,
    ) == (lr, batch, text_len, seq_len, side, template), stage
    assert (config.data.pack_window > 1) == (per_row > 1), stage
    assert config.model.routing == 'sorted'  # FLOP-exact routing for training.
    assert config.init_from == os.path.join('/runs', start)
    assert config.data.path.startswith('/data/')
    assert config.optim.weight_decay == 0.0 and config.optim.end_lr_ratio == 0.0
    ratio = 0.03 if name == 'eve_v2' or stage == 'prealign' else 0.01
    assert config.optim.warmup_steps == round(ratio * config.total_steps)
    TrainConfig.parse(config).batch_spec()  # A valid model and data geometry.


def test_examples_per_row_packs_any_stage_and_keeps_the_batch():
  sft = recipe.stage_config('configs/eve_v2:size=7b,examples_per_row=4', 'stage3', '/r')
  assert (sft.batch_size, sft.data.pack_window > 1, sft.total_steps) == (128, True, 14257)
  unpacked = recipe.stage_config('configs/eve_v2:size=7b,examples_per_row=1', 'stage1_0', '/r')
  assert (unpacked.batch_size, unpacked.data.pack_window, unpacked.data.row_patches) == (1024, 1, 0)
  with pytest.raises(ValueError, match='examples_per_row=3 does not divide the batch of 512'):
    recipe.stage_config('configs/eve_v2:size=7b,examples_per_row=3', 'stage3', '/r')


def test_eve_v2_vision_copies_appear_at_the_copy_step():
  parts = {
    s: recipe.stage_config('configs/eve_v2:size=7b', s, '/r').model.moe_part
    for s in recipe.stages('configs/eve_v2')
    if s != 'copy'
  }
  assert parts == {'stage0': '', **{s: 'layernorm-self_attn-mlp' for s in list(parts)[1:]}}


def test_eve_v1_prealign_vision_group_lr_and_tiny_scaling():
  big = recipe.stage_config('configs/eve_v1:size=7b', 'prealign', '/r')
  tiny = recipe.stage_config('configs/eve_v1:size=tiny', 'prealign', '/r')
  assert big.optim.groups.vision.lr == 4e-4
  assert tiny.optim.groups.vision.lr / tiny.optim.lr == pytest.approx(10)
  assert tiny.init_from == ''  # No pretrained tiny LLM: stage 1 starts from random weights.


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="size='13b'"):
    recipe.stage_config('configs/eve_v2:size=13b', 'stage0', '/r')
  with pytest.raises(FileNotFoundError, match="Config 'configs/eve_v3' does not exist"):
    recipe.stages('configs/eve_v3')
  with pytest.raises(ValueError, match='configs/eve_v2/common.py is not a recipe folder'):
    recipe.stages('configs/eve_v2/common.py')
  with pytest.raises(ValueError, match=r'eve_v2/stage2: --config.optim.lrr'):
    recipe.stage_config('configs/eve_v2', 'stage2', '/r', overrides={'optim.lrr': 1.0})
  with pytest.raises(ValueError, match='root=/elsewhere is not the recipe workdir /r'):
    recipe.stage_config('configs/eve_v2:root=/elsewhere', 'stage2', '/r')
  assert recipe.stage_config('configs/eve_v2:root=/r', 'stage2', '/r').init_from == '/r/stage1_1'
  with pytest.raises(ValueError, match=r"Unknown stages \['stage9'\]"):
    recipe.run('configs/eve_v2', '/r', only=('stage9',))


@pytest.mark.parametrize('size', ['7b', 'tiny'])
def test_eve_v1_stages_all_train_with_pal(size):
  """PAL (weight 1) is on in every EVEv1 stage of the reference; the 7B teacher is CLIP-L/14-336
  at the penultimate layer, offline by default, and the data keep the valid-pixel channel."""
  for stage in recipe.stages('configs/eve_v1'):
    config = recipe.stage_config(f'configs/eve_v1:size={size}', stage, '/r')
    model = ModelConfig.from_dict(config.model)
    assert model.pal and model.vision_tokenizer == 'v1', stage
    assert config.pal.weight == 1.0 and config.data.resize == 'eve_v1', stage
    assert config.pal.teacher == ('offline' if size == '7b' else 'online'), stage
    assert model.pal_pool == (2 if (size, stage) == ('7b', 'finetune_hd') else 1), stage
  big = recipe.stage_config(
    'configs/eve_v1:size=7b,teacher=online,clip_weights=/w/clip.safetensors', 'pretrain', '/r'
  )
  assert (big.pal.teacher, big.pal.clip_weights) == ('online', '/w/clip.safetensors')


def test_eve_v1_online_teacher_without_weights_is_a_clear_error():
  with pytest.raises(ValueError, match='clip_weights=<local safetensors'):
    recipe.stage_config('configs/eve_v1:size=7b,teacher=online', 'prealign', '/r')
