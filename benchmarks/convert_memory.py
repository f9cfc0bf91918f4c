"""Peak host memory of converting a >= 1B-parameter model each way (HF -> evejax -> official EVE).

  python benchmarks/convert_memory.py [--workdir=/tmp/convert_bench] [--preset=qwen2_1b|qwen2_3b]

Writes a random bf16 HF Qwen2 checkpoint (sharded safetensors + index), then runs, each in a fresh
process so the peak RSS is its own: `import` (safetensors -> evejax params in bf16 -> Orbax
checkpoint) and `export` (Orbax checkpoint -> official EVEv2 safetensors shards). The target is a
peak below 1.3x the stored size (never two full copies). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ~1.1B parameters (TinyLlama-like widths, Qwen2 layout with q/k/v biases).
PRESETS = {
  'qwen2_1b': dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
  ),
  # ~2.7B parameters, a 32k vocabulary (Llama-like widths, Qwen2 layout).
  'qwen2_3b': dict(
    vocab_size=32000,
    hidden_size=2560,
    intermediate_size=6912,
    num_hidden_layers=32,
    num_attention_heads=20,
    num_key_value_heads=4,
  ),
  'qwen2_tiny': dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
}


def peak_rss_bytes() -> int:
  """This process's RSS high-water mark. (getrusage's ru_maxrss would include the parent's RSS at
  fork time, which survives exec.)"""
  with open('/proc/self/status') as f:
    line = next(row for row in f if row.startswith('VmHWM:'))
  return int(line.split()[1]) * 1024  # kB


def write_random_hf(folder: str, dims: dict) -> int:
  """A random bf16 HF Qwen2 checkpoint written tensor by tensor; returns its parameter count."""
  from evejax.convert import importer, keymap  # pylint: disable=import-outside-toplevel
  from evejax.convert.files import PlannedTensor, ShardedSafetensorsWriter  # noqa

  hf = dict(
    architectures=['Qwen2ForCausalLM'],
    model_type='qwen2',
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    hidden_act='silu',
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    torch_dtype='bfloat16',
    **dims,
  )
  cfg = importer.model_config_from_hf(hf)
  specs = [s for s in keymap.tensor_specs(cfg) if s.is_llm]
  plan = [PlannedTensor(s.key, s.shape, np.dtype('bfloat16')) for s in specs]
  writer = ShardedSafetensorsWriter(folder, plan, max_shard_bytes=500 * 10**6)
  rng = np.random.default_rng(0)
  for tensor in plan:
    writer.write(tensor.key, rng.standard_normal(tensor.shape, np.float32) * 0.02)
  writer.close()
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return sum(int(np.prod(t.shape)) for t in plan)


def child(direction: str, workdir: str) -> None:
  """One conversion in this (fresh) process; prints a JSON line with its peak RSS."""
  # pylint: disable=import-outside-toplevel
  from evejax.convert import checkpoints, exporter, importer
  from evejax.convert.files import CheckpointReader  # pylint: disable=import-outside-toplevel

  baseline = peak_rss_bytes()
  start = time.perf_counter()
  if direction == 'import':
    hf_dir = os.path.join(workdir, 'hf')
    cfg = importer.model_config_from_hf(
      importer.read_hf_config(hf_dir), param_dtype='bfloat16', dtype='bfloat16'
    )
    params = importer.import_checkpoint(hf_dir, cfg, progress=False)
    checkpoints.save_params(os.path.join(workdir, 'evejax'), params, cfg, source=hf_dir)
  else:
    params, cfg = checkpoints.lazy_params(os.path.join(workdir, 'evejax'))
    out = os.path.join(workdir, 'eve')
    exporter.export_eve(params, cfg, out, progress=False, max_shard_bytes=2 * 10**9)
    CheckpointReader(out)  # the export is complete and indexed
  print(
    json.dumps(
      {'peak': peak_rss_bytes(), 'baseline': baseline, 'seconds': time.perf_counter() - start}
    )
  )


def folder_bytes(folder: str) -> int:
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(folder)
    for f in fs
    if f.endswith('.safetensors')
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/convert_bench')
  parser.add_argument('--preset', default='qwen2_1b', choices=sorted(PRESETS))
  parser.add_argument('--reuse', action='store_true', help='keep an existing random checkpoint')
  parser.add_argument('--child', choices=['import', 'export'], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.workdir)
    return
  hf_dir = os.path.join(args.workdir, 'hf')
  if not (args.reuse and os.path.exists(os.path.join(hf_dir, 'config.json'))):
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    count = write_random_hf(hf_dir, PRESETS[args.preset])
    print(f'wrote {count / 1e9:.3f}B random bf16 parameters in {time.perf_counter() - start:.0f} s')
  for output in ('evejax', 'eve'):
    shutil.rmtree(os.path.join(args.workdir, output), ignore_errors=True)
  rows = []
  for direction in ('import', 'export'):
    result = subprocess.run(
      [
        sys.executable,
        __file__,
        f'--workdir={args.workdir}',
        f'--preset={args.preset}',
        f'--child={direction}',
      ],
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
    )
    rows.append((direction, json.loads(result.stdout.strip().splitlines()[-1])))
  stored = folder_bytes(os.path.join(args.workdir, 'hf'))
  exported = folder_bytes(os.path.join(args.workdir, 'eve'))
  print(
    f'\nstored LLM (bf16): {stored / 1e9:.3f} GB; exported EVEv2 (bf16, with the vision '
    f'tower): {exported / 1e9:.3f} GB\n'
  )
  print(
    f'{"direction":<10}{"peak RSS GB":>12}{"/ stored":>10}{"baseline GB":>13}'
    f'{"above base / stored":>21}{"seconds":>9}'
  )
  for direction, r in rows:
    size = stored if direction == 'import' else exported
    print(
      f'{direction:<10}{r["peak"] / 1e9:>12.3f}{r["peak"] / size:>10.3f}'
      f'{r["baseline"] / 1e9:>13.3f}{(r["peak"] - r["baseline"]) / size:>21.3f}'
      f'{r["seconds"]:>9.1f}'
    )


if __name__ == '__main__':
  main()
