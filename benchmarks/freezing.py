"""What freezing saves in the real train step (evejax/train/step.py with the optimizer of
evejax/train/optim.py): optimizer-state size, compiled FLOPs and temporary memory (XLA analyses of
the program compiled here) and step time, per EVEv2 stage rule.

  python benchmarks/freezing.py [--layers=4 --hidden=256 --rows=4 --seq_len=256 --repeats=5]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from evejax.batch import BatchSpec
from evejax.config import OptimConfig
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from evejax.sharding.synthetic import random_batch
from evejax.train import optim
from evejax.train.step import TrainState, make_train_step

RULES = {  # configs/eve_v2/common.py
  'stage2 (all trainable)': '.*',
  'stage1 (PEL + copies)': '^vision_tower/|/moe_',
  'stage0 (PEL only)': '^vision_tower/',
}


def measure(
  cfg: ModelConfig, trainable: str, rows: int, seq_len: int, repeats: int, stop: bool
) -> dict:
  """`stop`: frozen parameters enter the loss as constants (the trainer's setting)."""
  optim_cfg = OptimConfig(lr=1e-4, warmup_steps=1, trainable=trainable)
  graphdef, state = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = state.to_pure_dict()
  tx = optim.make_optimizer(optim_cfg, 100)
  opt_state = tx.init(params)
  step = make_train_step(
    graphdef,
    tx,
    optim.learning_rate_schedule(optim_cfg, 100),
    trainable=optim.trainable_mask(optim_cfg, params) if stop else None,
  )
  spec = BatchSpec.for_model(cfg, seq_len=seq_len, patch_slots=seq_len // 4)
  batch = jax.tree.map(jnp.asarray, random_batch(spec, rows, cfg.vocab_size))
  train_state = TrainState.create(params, opt_state)
  compiled = step.lower(train_state, batch).compile()
  flops = compiled.cost_analysis().get('flops', float('nan'))
  temp = compiled.memory_analysis().temp_size_in_bytes
  train_state, _ = step(train_state, batch)
  jax.block_until_ready(train_state)
  start = time.perf_counter()
  for _ in range(repeats):
    train_state, _ = step(train_state, batch)
  jax.block_until_ready(train_state)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(train_state.opt_state))
  return dict(
    flops=flops, temp=temp, opt=opt_bytes, seconds=(time.perf_counter() - start) / repeats
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--rows', type=int, default=4)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  cfg = ModelConfig.from_dict(
    dict(
      model_preset('eve_v2_tiny'),
      num_layers=args.layers,
      hidden_size=args.hidden,
      intermediate_size=3 * args.hidden,
      head_dim=args.hidden // 4,
    )
  )
  print(
    f'{jax.devices()[0].device_kind}: {args.layers} layers, hidden {args.hidden}, '
    f'{args.rows} x {args.seq_len} tokens'
  )
  print(
    f'{"rule":<26}{"frozen grads":>13}{"GFLOP/step":>12}{"temp MiB":>10}'
    f'{"opt state MiB":>15}{"ms/step":>10}'
  )
  for name, rule in RULES.items():
    for stop in [False, True] if rule != '.*' else [True]:
      m = measure(cfg, rule, args.rows, args.seq_len, args.repeats, stop)
      print(
        f'{name:<26}{"skipped" if stop else "computed":>13}{m["flops"] / 1e9:>12.2f}'
        f'{m["temp"] / 2**20:>10.1f}{m["opt"] / 2**20:>15.2f}{1e3 * m["seconds"]:>10.1f}'
      )


if __name__ == '__main__':
  main()
