"""CPU demo: a tiny EVEv2 learns to describe coloured shapes (the embedded dataset).

  python -m evejax.train --config=configs/demo.py --workdir=/tmp/evejax_demo
  python -m evejax.train --config=configs/demo.py:blank=True --workdir=/tmp/evejax_blind

Starts from `evejax.config.default_config()` (every knob, with its default and meaning in
evejax/config.py) and sets what the demo changes; any field can be overridden with --config.x=y.
"""

from evejax.config import default_config
from evejax.config_utils import parse_arg
from evejax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, model='eve_v2_tiny', blank=False)
  config = default_config()
  # routing 'select' (the reference: both branches on every token; 'sorted' is FLOP-exact), layers
  # unrolled, no rematerialisation: the ModelConfig defaults (evejax/models/config.py).
  config.model.update(model_preset(arg.model))

  # The embedded shapes data (evejax/data/shapes.py), written to ArrayRecord once: 20k examples,
  # more than the demo's 1000 steps read (~19k); a held-out split of 512 images.
  config.data.update(
    source='shapes',
    num_train=20_000,
    num_eval=512,
    template='chat',
    seq_len=256,
    max_size=96,
    blank_images=arg.blank,
  )
  # Packing: first-fit over windows of 128 examples, ~5 per row, >= 90% of positions used.
  config.data.update(pack_window=128, row_patches=96)
  config.data.shapes.update(cell=32, min_cells=1, max_cells=3, max_shapes=3, turns=3)

  config.batch_size = 4  # Packed rows (global): ~19 examples (56 questions) per step, 92% non-pad.
  config.total_steps = 1000
  # lr 5e-4: 95.5% held-out exact match; 1e-3 90.4%, 2e-3 81.4% (README, Generation and evaluation).
  config.optim.update(lr=5e-4, warmup_steps=50, end_lr_ratio=0.05, grad_clip=1.0)
  config.log_every = 25
  config.eval_every = 200
  # Checkpoints in {workdir}/checkpoints (async); the same command resumes from the newest.
  config.checkpoint.update(every=200, keep_last=2)
  return config
