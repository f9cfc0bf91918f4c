"""EVEv2 stage 0, PEL pre-alignment: only the vision tokenizer trains (LLM without vision copies).

  python -m evejax.train --config=configs/eve_v2/stage0.py:size=tiny,root=DIR \
      --workdir=DIR/stage0
Arguments and the stage table: configs/eve_v2/common.py.
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage0', arg)
