"""Ablation sweep (the EVEv2 paper's decomposition study): which parts of every decoder layer get
vision copies (none, norms, attention, MLP, attention + MLP, all), each from the same weights: the
text-only LLM (configs/text_llm.py), PEL stage 0 and the copy step. docs/ablations.md runs it:

  python -m evejax.train --config=configs/text_llm.py --workdir=DIR/llm
  python -m evejax.recipe --config=configs/eve_v2:size=tiny,text_llm=True --workdir=DIR \
      --stages=stage0,copy
  python -m evejax.sweep --config=configs/eve_v2/ablate_decomposition.py:root=DIR,steps=300 \
      --workdir=DIR/ablate --seeds=0,1,2 --mode=run        # then --mode=results --plot

Copies a variant lacks are dropped when its init_from loads (see init_from_report.json). The runs
train on the demo's questions (chat template, three turns of every kind), the text LLM's format,
and also evaluate the held-out scenes as text (eval_text/*: the language ability kept), from step 0.

Arguments: those of configs/eve_v2/common.py (root, steps, ...), and
  train  'all' (default): every weight trains, so weights shared by both modalities also learn
         vision and the text-only loss can move; 'copies': the recipe's stage 1.0 rule (vision
         tokenizer and vision copies; the LLM is frozen, so the text-only loss cannot change).
  bench  a benchmark file (python -m evejax.evaluation.convert --format=shapes) answered at the
         end of every run: bench/* (exact match through the evaluation harness).
"""

from configs import demo
from configs.eve_v2 import common
from evejax.config_utils import parse_arg

ARGS = dict(common.ARGS, train='all', bench='')
TRAINABLE = {'all': '.*', 'copies': None}  # None: the stage's own rule.
PARTS = {  # Variant name -> model.moe_part (substring-matched, as the reference).
  'all': 'layernorm-self_attn-mlp',
  'attn+mlp': 'self_attn-mlp',
  'mlp': 'mlp',
  'attn': 'self_attn',
  'norms': 'layernorm',
  'none': '',
}


def get_config(arg=None):
  parsed = parse_arg(arg, **ARGS)
  if parsed.train not in TRAINABLE:
    raise ValueError(f'train={parsed.train!r}; use one of {sorted(TRAINABLE)}')
  config = common.stage_config('stage1_0', arg, ARGS)
  questions = demo.get_config().data
  config.data.update(
    template=questions.template, text_eval_split='text', num_train=10_000, num_eval=256
  )
  config.data.shapes = questions.shapes
  config.optim.trainable = TRAINABLE[parsed.train] or config.optim.trainable
  config.eval_at_start = True  # Step 0: the starting weights' text-only loss.
  config.eval_every = max(1, config.total_steps // 4)
  config.benchmark.update(file=parsed.bench, limit=192)  # 64 held-out images x 3 turns.
  return config


def sweep(add):
  for moe_part in PARTS.values():
    add(**{'model.moe_part': moe_part})
