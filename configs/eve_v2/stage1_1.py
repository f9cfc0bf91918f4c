"""EVEv2 stage 1.1: vision tokenizer + vision copies at res1600.

  python -m evejax.train --config=configs/eve_v2/stage1_1.py:size=tiny,root=DIR \
      --workdir=DIR/stage1_1
Arguments and the stage table: configs/eve_v2/common.py.
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage1_1', arg)
