"""CPU demo: a tiny EVEv2 learns to describe coloured shapes (the embedded dataset).

  python -m evejax.train --config=configs/demo.py --workdir=/tmp/evejax_demo
  python -m evejax.train --config=configs/demo.py:blank=True --workdir=/tmp/evejax_blind
"""
import ml_collections

from evejax.config_utils import parse_arg
from evejax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, model='eve_v2_tiny', blank=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  # routing: 'select' (reference) or 'sorted' (FLOP-exact); scan_layers / remat ('none', 'full',
  # 'minimal', 'save_dots'): see evejax/models/stack.py.
  config.model = dict(model_preset(arg.model), routing='select', scan_layers=False, remat='none')

  config.data = dict(
      # 20k examples: more than the demo's 1000 steps read (~19k), written to ArrayRecord once.
      source='shapes', num_train=20_000, num_eval=512, seed=0,
      # source='records': a dataset converted by data_pipelines/; 'tfds': a prepared TFDS one.
      path='', train_split='train', eval_split='eval',
      tfds=dict(name='', data_dir='', train_split='train', eval_split='validation'),
      tokenizer='',  # '' = train the demo BPE on the dataset's corpus; else a tokenizer.json path.
      template='chat', seq_len=256, max_size=96, resize='eve_v2_train',
      blank_images=arg.blank,  # Ablation: same layout, no pixels.
      # Packing: first-fit over windows of 128 examples, ~5 per row, >= 90% of positions used;
      # pack_window=1 is one example per row. row_patches: patch-group slots per row.
      pack_window=128, row_patches=96,
      num_threads=2, num_workers=0, prefetch=4,  # Workers need parsed absl flags (the CLI does).
      cache_dir='',  # The demo data is written to ArrayRecord here once; '' = ~/.cache/evejax.
      bad_records=dict(max_fraction=0.01, min_records=1000),  # See {workdir}/quarantine.jsonl
      shapes=dict(cell=32, min_cells=1, max_cells=3, max_shapes=3, turns=3,
                  question_kinds='caption,color,shape,count,top'),
  )
  config.batch_size = 4  # Packed rows (global): ~19 examples (56 questions) per step, 92% non-pad.
  config.total_steps = 1000
  # lr 5e-4: 95.5% held-out exact match; 1e-3 90.4%, 2e-3 81.4% (README, Generation and evaluation).
  config.optim = dict(lr=5e-4, warmup_steps=50, end_lr_ratio=0.05, weight_decay=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, grad_clip=1.0,
                      # Regexes over parameter paths (evejax/train/optim.py): all trainable here.
                      trainable='.*', frozen='', groups={})
  config.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the rest; dcn=dict(data=2): multi-slice
  config.sharding_rules = ()  # (logical axis, mesh axes) overrides of sharding.DEFAULT_RULES
  config.sharding_tolerance = 0.02  # max. fraction of parameter bytes replicated over fsdp/tensor
  config.microbatches = 1  # gradient accumulation inside the step
  # Multi-process: these or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; or auto.
  config.distributed = dict(coordinator_address='', num_processes=0, process_id=-1, auto=False)
  config.log_every = 25
  config.eval_every = 200
  # Checkpoints in {workdir}/checkpoints (async); the same command resumes from the newest.
  config.checkpoint = dict(every=200, keep_last=2, keep_every=0, async_save=True)
  config.init_from = ''  # A workdir or checkpoint to take the weights (only) from.
  # Generation on a benchmark file (python -m evejax.evaluation.convert writes one); '' = off.
  config.benchmark = dict(file='', every=0, limit=0, batch_size=16, max_new_tokens=32)
  config.guard = dict(nonfinite='stop', max_skipped=10)  # Or 'skip': skip and count bad steps.
  config.metrics = dict(peak_flops=0.0)  # Per device; 0 looks up the device kind (flops.py).
  config.profile_steps = 0  # >0: trace this many steps from profile_first_step to {workdir}/profile.
  config.profile_first_step = 10
  return config
