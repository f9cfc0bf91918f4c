"""EVEv1 stage 3, SFT (EVE-7B): everything at 2e-5, vicuna_v1 template, 672 px.

  python -m evejax.train --config=configs/eve_v1/finetune.py:size=tiny,root=DIR \
      --workdir=DIR/finetune
Arguments and the stage table: configs/eve_v1/common.py.
"""

from configs.eve_v1 import common


def get_config(arg=None):
  return common.stage_config('finetune', arg)
