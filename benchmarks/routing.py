"""Cost of EVEv2's modality routing in one decoder layer: compiled FLOPs (XLA cost analysis of the
program compiled here) and step time (forward + backward) of a plain layer, the decomposed layer
with the reference select, and the decomposed layer with FLOP-exact 'sorted' routing.

  python benchmarks/routing.py [--hidden=512 --rows=4 --seq_len=512 --vision=0.4 --repeats=5]
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from evejax.models import ModelConfig
from evejax.models.decoder import DecoderLayer
from evejax.models.routing import Router


def layer_step(cfg: ModelConfig, rows: int, seq_len: int, vision_fraction: float):
  """A jitted forward + backward of one layer, and its arguments."""
  graphdef, state = nnx.split(DecoderLayer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(rows, seq_len, cfg.hidden_size)), cfg.jnp_dtype)
  vision = jnp.asarray(rng.random((rows, seq_len)) < vision_fraction)
  positions = jnp.broadcast_to(jnp.arange(seq_len), (rows, seq_len))
  segment_ids = jnp.ones((rows, seq_len), jnp.int32)

  def loss(state, x):
    router = Router.create(vision, cfg.routing)  # sorts once per forward pass (here: per layer)
    layer = nnx.merge(graphdef, state)
    out = router.leave(layer(router.enter(x), router, positions, segment_ids))
    return jnp.mean(out.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (state, x)


def compile_variant(cfg, args):
  """The compiled step, its arguments and its FLOPs."""
  step, inputs = layer_step(cfg, args.rows, args.seq_len, args.vision)
  compiled = step.lower(*inputs).compile()
  cost = compiled.cost_analysis()
  jax.block_until_ready(compiled(*inputs))  # warm up
  return compiled, inputs, (cost[0] if isinstance(cost, list) else cost)['flops']


def median_times(programs, repeats: int) -> list[float]:
  """Median seconds per call; the programs take turns, so load from other processes on the machine
  hits them alike."""
  times = [[] for _ in programs]
  for _ in range(repeats):
    for (compiled, inputs, _), record in zip(programs, times):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      record.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--rows', type=int, default=4)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--vision', type=float, default=0.4, help='fraction of visual tokens')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  head_dim = 64
  cfg = ModelConfig(
    vocab_size=128,
    hidden_size=args.hidden,
    intermediate_size=3 * args.hidden,
    num_heads=args.hidden // head_dim,
    num_kv_heads=max(1, args.hidden // 256),
    head_dim=head_dim,
    dtype=args.dtype,
    param_dtype='float32',
  )
  variants = {
    'plain layer (no decomposition)': dataclasses.replace(cfg, moe_part=''),
    "decomposed, routing='select'": dataclasses.replace(cfg, routing='select'),
    "decomposed, routing='sorted'": dataclasses.replace(cfg, routing='sorted'),
  }
  print(
    f'{jax.devices()[0].platform}: hidden {args.hidden}, {args.rows} x {args.seq_len} tokens, '
    f'{args.vision:.0%} visual, forward + backward, {args.dtype}\n'
  )
  print(f'| {"layer":<32} | {"GFLOP":>8} | {"x plain":>7} | {"ms/step":>8} | {"x plain":>7} |')
  print(f'| {"---":<32} | {"---:":>8} | {"---:":>7} | {"---:":>8} | {"---:":>7} |')
  programs = [compile_variant(variant, args) for variant in variants.values()]
  seconds = median_times(programs, args.repeats)
  flops = [p[2] for p in programs]
  for name, f, t in zip(variants, flops, seconds):
    print(
      f'| {name:<32} | {f / 1e9:8.2f} | {f / flops[0]:7.3f} | {t * 1e3:8.1f} | '
      f'{t / seconds[0]:7.3f} |'
    )


if __name__ == '__main__':
  main()
