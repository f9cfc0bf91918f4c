"""EVEv1 stage 1, pre-alignment: PEL + projector + PAL train at 4e-4, the LLM is frozen.

  python -m evejax.train --config=configs/eve_v1/prealign.py:size=tiny,root=DIR \
      --workdir=DIR/prealign
Arguments and the stage table: configs/eve_v1/common.py.
"""

from configs.eve_v1 import common


def get_config(arg=None):
  return common.stage_config('prealign', arg)
