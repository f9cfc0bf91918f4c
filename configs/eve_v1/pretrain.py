"""EVEv1 stage 2, generative pretraining: everything trains at 4e-5.

  python -m evejax.train --config=configs/eve_v1/pretrain.py:size=tiny,root=DIR \
      --workdir=DIR/pretrain
Arguments and the stage table: configs/eve_v1/common.py.
"""

from configs.eve_v1 import common


def get_config(arg=None):
  return common.stage_config('pretrain', arg)
