"""EVEv2 stage 2, full alignment: every parameter trains (qwen2 template).

  python -m evejax.train --config=configs/eve_v2/stage2.py:size=tiny,root=DIR \
      --workdir=DIR/stage2
Arguments and the stage table: configs/eve_v2/common.py.
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage2', arg)
