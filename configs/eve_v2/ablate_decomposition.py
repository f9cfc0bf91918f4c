"""Ablation sweep (the EVEv2 paper's decomposition study): stage 1.0 with vision copies of the
norms, attention, MLP, all three or none, each from the same stage-0 + copy weights.

  python -m evejax.recipe --config=configs/eve_v2:size=tiny --workdir=DIR --stages=stage0,copy
  python -m evejax.sweep --config=configs/eve_v2/ablate_decomposition.py:root=DIR \
      --workdir=DIR/ablate --mode=run          # then --mode=results for the table
Copies a variant lacks are dropped when its init_from loads (see init_from_report.json).
"""

from configs.eve_v2 import common


def get_config(arg=None):
  return common.stage_config('stage1_0', arg)


def sweep(add):
  for moe_part in ('layernorm-self_attn-mlp', 'self_attn-mlp', 'mlp', 'self_attn', 'layernorm', ''):
    add(**{'model.moe_part': moe_part})
