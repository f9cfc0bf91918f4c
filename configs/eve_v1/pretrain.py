"""EVEv1 stage 2, generative pretraining: everything trains at 4e-5.

  python -m evejax.train --config=configs/eve_v1/pretrain.py:size=tiny,root=DIR \
      --workdir=DIR/pretrain
Arguments and the stage table: configs/eve_v1/common.py.
"""
import os
import runpy

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))


def get_config(arg=None):
  return _COMMON['stage_config']('pretrain', arg)
