"""EVEv1 stage 3, SFT (EVE-7B): everything at 2e-5, vicuna_v1 template, 672 px.

  python -m evejax.train --config=configs/eve_v1/finetune.py:size=tiny,root=DIR \
      --workdir=DIR/finetune
Arguments and the stage table: configs/eve_v1/common.py.
"""
import os
import runpy

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))


def get_config(arg=None):
  return _COMMON['stage_config']('finetune', arg)
