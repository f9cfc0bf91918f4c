"""Ablation sweep (the EVE paper's patch-aligning study): the tiny EVEv1 (configs/demo_v1.py)
trained with PAL weight 0 and 1 against its small frozen CLIP teacher, both from the same text-only
LLM (configs/text_llm.py:model=eve_v1_tiny), every weight training. docs/ablations.md runs it:

  python -m evejax.train --config=configs/text_llm.py:model=eve_v1_tiny --workdir=DIR/llm
  python -m evejax.sweep --config=configs/eve_v1/ablate_pal.py:root=DIR,steps=300 \
      --workdir=DIR/ablate_pal --seeds=0,1,2 --mode=run    # then --mode=results --plot

The runs also evaluate the held-out scenes as text (eval_text/*) from step 0. Offline teacher
features give the same objective as the online teacher (tests/test_pal.py checks them equal);
`teacher=offline` needs records that carry them (data_pipelines/teacher_features.py).

Arguments: root (the study's root: init_from {root}/llm), steps, bench (a benchmark file answered
at the end of every run, as in configs/eve_v2/ablate_decomposition.py).
"""

import os

from configs import demo_v1
from evejax.config_utils import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, root='', steps=300, bench='')
  config = demo_v1.get_config()
  config.init_from = os.path.join(arg.root, 'llm') if arg.root else ''
  config.data.update(text_eval_split='text', num_train=10_000, num_eval=256)
  config.total_steps = arg.steps
  config.optim.warmup_steps = max(1, arg.steps // 20)
  config.eval_at_start = True  # Step 0: the starting weights' text-only loss.
  config.eval_every = max(1, arg.steps // 4)
  config.checkpoint.every = arg.steps
  config.benchmark.update(file=arg.bench, limit=192)  # 64 held-out images x 3 turns.
  return config


def sweep(add):
  for weight in (0.0, 1.0):
    add(**{'pal.weight': weight})
