"""The tiny text-only LLM that the tiny recipes and their ablations start from (`text_llm=True`):
the demo's decoder (`model=eve_v2_tiny`, without vision copies, or `eve_v1_tiny`), trained on the
embedded shapes data as text (no image; the scene's description in the prompt where the image
would be, data.shapes.text_only), so that it has a language ability to keep, measured as the
held-out text-only loss before and after vision training (eval_text/*).

  python -m evejax.train --config=configs/text_llm.py --workdir=DIR/llm
  python -m evejax.recipe --config=configs/eve_v2:size=tiny,text_llm=True --workdir=DIR \
      --stages=stage0,copy
"""

from configs import demo
from evejax.config_utils import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, steps=400, model='eve_v2_tiny')
  config = demo.get_config(f'model={arg.model}')
  config.model.moe_part = ''  # A plain LLM: the recipe's copy step adds the vision copies.
  config.data.shapes.text_only = True
  config.data.num_train = 10_000  # More than `steps` reads at ~5 examples a row.
  config.total_steps = arg.steps
  config.optim.update(lr=1e-3, warmup_steps=max(1, arg.steps // 20))
  config.eval_every = max(1, arg.steps // 4)
  config.checkpoint.every = arg.steps  # Only the final weights: the recipe's {root}/llm.
  return config
