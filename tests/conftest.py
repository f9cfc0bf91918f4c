import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # noqa: E402

from evejax.models import ModelConfig  # noqa: E402

TINY = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10000.0,
  vision_patch_size=4,
  vision_merge=2,
  vision_hidden_size=12,
)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
  return ModelConfig(**TINY)
