"""Training speed of the EVEv2 presets: tokens/s, TFLOP/s per device, MFU and device memory of one
train step (forward + backward + AdamW) on packed rows with ~50% visual tokens, crossing
`model.routing` (select / sorted) with `model.attention` (xla / the platform's fused kernel).

  python benchmarks/train_speed.py                     # GPU/TPU: eve_v2_0.5b and eve_v2_1.5b, bf16
  python benchmarks/train_speed.py --shrink=8 --seq_len=256 --rows=2   # CPU smoke test (CI)

MFU counts useful FLOPs only: one branch per token (what `sorted` computes), causal attention as
half of the L x L scores, no rematerialisation; peak FLOP/s from evejax/metrics/flops.py (or
--peak).
Memory: the compiled step's arguments + temporaries (XLA's memory analysis: parameters, optimizer
state, batch, activations).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.metrics import flops
from evejax.models import EVE, ModelConfig
from evejax.models.attention import resolve
from evejax.models.presets import model_preset
from evejax.train.step import TrainState, make_train_step


def packed_batch(
  spec: BatchSpec, rows: int, vocab: int, vision: float, examples: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """`rows` rows of `examples` packed examples each (a question, one image, an answer), about
  `vision` of the positions visual tokens, a little padding at the end of each row."""
  rng = np.random.default_rng(seed)
  batch = spec.zeros(rows)
  batch['patches'] = rng.integers(0, 256, batch['patches'].shape, dtype=np.uint8)
  per_example = (spec.seq_len - 8) // examples
  num_patches = min(int(per_example * vision), spec.patch_slots // examples)
  for r in range(rows):
    start = 0
    for e in range(examples):
      text = per_example - num_patches - 2
      question = text // 2
      kind = np.full(per_example, bf.TEXT, np.int32)
      kind[question] = bf.CLASS
      kind[question + 1 : question + 1 + num_patches] = bf.PATCH
      kind[question + 1 + num_patches] = bf.SPLIT
      span = slice(start, start + per_example)
      patch = kind == bf.PATCH
      batch['token_kind'][r, span] = kind
      batch['patch_index'][r, span][patch] = e * num_patches + np.arange(num_patches)
      batch['tokens'][r, span] = np.where(patch, 0, rng.integers(1, vocab, per_example))
      batch['positions'][r, span] = np.arange(per_example)
      batch['segment_ids'][r, span] = e + 1
      batch['targets'][r, span] = rng.integers(0, vocab, per_example)
      batch['loss_weights'][r, span] = np.arange(per_example) > question + num_patches
      start += per_example
  return batch


def useful_flops(cfg: ModelConfig, spec: BatchSpec, rows: int) -> float:
  """One branch per token, causal attention (half the scores), forward + backward."""
  forward = flops.forward_flops(dataclasses.replace(cfg, routing='sorted'), spec, rows)
  forward['attention'] /= 2
  return 3 * sum(forward.values()) - forward['vision_patch']


def kernel_profile(run, top: int = 12) -> str:
  """Device time by kernel name over `run()` (a jax.profiler trace, read from its Perfetto JSON):
  what limits the step."""
  import collections  # noqa: PLC0415
  import glob  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  import json  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      run()
    (path,) = glob.glob(f'{folder}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  names = {
    e['pid']: e['args']['name']
    for e in trace['traceEvents']
    if e.get('ph') == 'M' and e.get('name') == 'process_name'
  }
  device_pids = {pid for pid, name in names.items() if '/device:' in name}
  if not device_pids:
    return f'no device lanes in the trace (processes: {sorted(names.values())})'
  totals = collections.Counter()
  for e in trace['traceEvents']:
    if e.get('ph') == 'X' and e.get('pid') in device_pids:
      totals[e['name'][:60]] += e.get('dur', 0)
  whole = sum(totals.values()) or 1
  lines = [f'{us / 1e3:9.1f} ms {us / whole:6.1%}  {name}' for name, us in totals.most_common(top)]
  return f'device time by kernel ({whole / 1e3:.1f} ms in all):\n' + '\n'.join(lines)


def measure(cfg: ModelConfig, args, batch: dict, spec: BatchSpec) -> dict:
  """Compiles and times one train step of `cfg`; returns the table row's numbers."""
  graphdef, params = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  tx = optax.adamw(1e-5)
  state = TrainState.create(params, tx.init(params))
  step = make_train_step(graphdef, tx, optax.constant_schedule(1e-5), loss_chunk=args.loss_chunk)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  compiled_gib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  loss = float(metrics[0][0].compute()['loss'])  # also waits for the last step
  seconds = (time.perf_counter() - start) / args.steps
  if args.profile:
    args.profile = False  # the first variant only

    def two_steps():
      nonlocal state, metrics
      for _ in range(2):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)

    try:
      print(kernel_profile(two_steps), file=sys.stderr, flush=True)
    except Exception as error:  # noqa: BLE001 - the profile is extra; the timing stands
      print(f'profile failed: {error!r}', file=sys.stderr)
  peak = flops.peak_flops_per_device(flops.device_kind(), args.peak)
  achieved = useful_flops(cfg, spec, args.rows) / seconds
  return {
    'tokens_s': args.rows * args.seq_len / seconds,
    'tflops': achieved / 1e12,
    'mfu': achieved / peak if peak else None,
    'ms': seconds * 1e3,
    'compiled_gib': compiled_gib,
    'compile_s': compile_s,
    'loss': loss,
  }


def shrunk(cfg: ModelConfig, factor: int) -> ModelConfig:
  """The preset with widths and depth divided by `factor` (CPU smoke tests)."""
  if factor <= 1:
    return cfg
  heads = max(cfg.num_heads // factor, cfg.num_kv_heads)
  return dataclasses.replace(
    cfg,
    vocab_size=cfg.vocab_size // factor,
    hidden_size=heads * 64,
    intermediate_size=heads * 64 * 3,
    num_layers=max(2, cfg.num_layers // factor),
    num_heads=heads,
    head_dim=64,
    vision_hidden_size=cfg.vision_hidden_size // factor,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='eve_v2_1.5b,eve_v2_0.5b')
  parser.add_argument('--routing', default='sorted,select')
  parser.add_argument('--attention', default='fused,xla', help="'fused': the platform's kernel")
  parser.add_argument('--seq_len', type=int, default=4096)
  parser.add_argument('--rows', type=int, default=4, help='rows per step (global batch)')
  parser.add_argument('--examples', type=int, default=4, help='packed examples per row')
  parser.add_argument('--vision', type=float, default=0.5, help='fraction of visual tokens')
  parser.add_argument('--remat', default='minimal')
  parser.add_argument('--loss_chunk', type=int, default=512)
  parser.add_argument('--shrink', type=int, default=1, help='divide widths/depth (CPU smoke)')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak', type=float, default=0.0, help='peak FLOP/s per device override')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--profile', action='store_true', help='kernel times of the first variant')
  parser.add_argument('--time_budget', type=float, default=0, help='s; later variants skipped')
  args = parser.parse_args(argv)
  started = time.perf_counter()
  fused = resolve('auto')
  fused = 'pallas' if fused == 'xla' else fused  # CPU: the Pallas kernel in interpret mode
  print(
    f'{flops.device_kind()} ({jax.default_backend()}), jax {jax.__version__}: {args.rows} x '
    f'{args.seq_len} positions a step ({args.examples} packed examples a row, {args.vision:.0%} '
    f'visual), {args.dtype}, remat={args.remat}, scanned layers, AdamW',
    flush=True,
  )
  header = (
    '| preset | routing | attention | tokens/s | TFLOP/s/device | MFU | ms/step '
    '| memory GiB | compile s |'
  )
  rows = [header, '|' + '---|' * 9]
  for preset in args.presets.split(','):
    base = shrunk(ModelConfig(**model_preset(preset)), args.shrink)
    base = dataclasses.replace(
      base, dtype=args.dtype, scan_layers=True, remat=args.remat, max_segments=args.examples + 1
    )
    spec = BatchSpec.for_model(
      base, seq_len=args.seq_len, patch_slots=int(args.seq_len * args.vision)
    )
    batch = {
      k: jnp.asarray(v)
      for k, v in packed_batch(spec, args.rows, base.vocab_size, args.vision, args.examples).items()
    }
    for routing in args.routing.split(','):
      for attention in args.attention.split(','):
        implementation = fused if attention == 'fused' else attention
        cfg = dataclasses.replace(base, routing=routing, attention=implementation)
        if args.time_budget and time.perf_counter() - started > args.time_budget:
          line = f'| {preset} | {routing} | {implementation} | skipped: --time_budget spent |'
          rows.append(line)
          continue
        try:
          r = measure(cfg, args, batch, spec)
        except Exception as error:  # noqa: BLE001 - one failed variant must not hide the others
          line = f'| {preset} | {routing} | {implementation} | failed: {error!r:.200} |'
        else:
          print(f'  loss {r["loss"]:.3f}', file=sys.stderr)
          mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else '-'
          line = (
            f'| {preset} | {routing} | {implementation} | {r["tokens_s"]:,.0f} | '
            f'{r["tflops"]:.1f} | {mfu} | {r["ms"]:.1f} | {r["compiled_gib"]:.1f} | '
            f'{r["compile_s"]:.0f} |'
          )
        print(line, file=sys.stderr, flush=True)  # progress; the table comes last
        rows.append(line)
  print('\n'.join(rows))
  stats = jax.devices()[0].memory_stats()
  if stats:  # the largest variant's, as the process's peak covers all of them
    print(
      f'\nDevice peak bytes in use over all variants: {stats["peak_bytes_in_use"] / 2**30:.1f} GiB'
    )


if __name__ == '__main__':
  sys.exit(main())
