"""EVEv2 stage 1.1: vision tokenizer + vision copies at res1600.

  python -m evejax.train --config=configs/eve_v2/stage1_1.py:size=tiny,root=DIR \
      --workdir=DIR/stage1_1
Arguments and the stage table: configs/eve_v2/common.py.
"""
import os
import runpy

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))


def get_config(arg=None):
  return _COMMON['stage_config']('stage1_1', arg)
