"""EVEv1 stage 3 HD, SFT (EVE-7B-HD) from pretrain: 2e-5, 1344 px, 4096 tokens.

  python -m evejax.train --config=configs/eve_v1/finetune_hd.py:size=tiny,root=DIR \
      --workdir=DIR/finetune_hd
Arguments and the stage table: configs/eve_v1/common.py.
"""

from configs.eve_v1 import common


def get_config(arg=None):
  return common.stage_config('finetune_hd', arg)
