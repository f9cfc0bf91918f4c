"""EVEv2 stage 3, instruction tuning: every parameter trains.

  python -m evejax.train --config=configs/eve_v2/stage3.py:size=tiny,root=DIR \
      --workdir=DIR/stage3
Arguments and the stage table: configs/eve_v2/common.py.
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage3', arg)
