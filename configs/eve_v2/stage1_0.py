"""EVEv2 stage 1.0: vision tokenizer + vision copies (moe_*) at res800, from the copy step.

  python -m evejax.train --config=configs/eve_v2/stage1_0.py:size=tiny,root=DIR \
      --workdir=DIR/stage1_0
Arguments and the stage table: configs/eve_v2/common.py.
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage1_0', arg)
