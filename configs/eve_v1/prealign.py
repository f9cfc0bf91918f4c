"""EVEv1 stage 1, pre-alignment: PEL + projector + PAL train at 4e-4, the LLM is frozen.

  python -m evejax.train --config=configs/eve_v1/prealign.py:size=tiny,root=DIR \
      --workdir=DIR/prealign
Arguments and the stage table: configs/eve_v1/common.py.
"""
import os
import runpy

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))


def get_config(arg=None):
  return _COMMON['stage_config']('prealign', arg)
