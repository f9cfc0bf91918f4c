"""Generation throughput of the demo model: prefill and decode tokens/s per batch size.

  python benchmarks/inference.py [--batch_sizes=1,8,32] [--new_tokens=32] [--repeats=3]

Prompts are held-out shapes questions with their images (the demo's data). Times are taken after a
warm-up call that compiles: prefill = `Generator.prefill` (host-side padding and transfer included),
decode = `new_tokens` calls of `Generator.step` (dispatched back to back, as `generate` does)
divided by their number. Prefill tokens count the real prompt tokens (visual tokens included), not
padding.
"""

import time

import jax
from absl import app, flags
from flax import nnx

from evejax.config import TrainConfig
from evejax.config_utils import load_config_file
from evejax.data import pipeline
from evejax.inference import Generator, SamplingConfig, encode_prompt
from evejax.models import EVE

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8', '32'], 'Batch sizes to measure.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Decode steps timed per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement (the best is kept).')


def best_time(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def time_decode(generator: Generator, prompts, sampling: SamplingConfig) -> float:
  """Seconds for the decode steps after one prefill (all of `sampling.max_new_tokens` - 1)."""
  state = generator.prefill(prompts, sampling)
  state.output.block_until_ready()
  start = time.perf_counter()
  for index in range(1, sampling.max_new_tokens):
    state = generator.step(state, index, sampling)
  state.output.block_until_ready()
  return time.perf_counter() - start


def main(argv):
  del argv
  config = TrainConfig.parse(load_config_file('configs/demo.py'))  # Checkout's, or installed.
  train_source, held_out = pipeline.make_sources(config.data)
  preprocess = pipeline.make_preprocessor(
    config.data, pipeline.load_tokenizer(config.data, train_source), config.batch_spec()
  )
  graphdef, params = nnx.split(EVE(config.model, rngs=nnx.Rngs(0)), nnx.Param)
  generator = Generator(
    graphdef, nnx.to_pure_dict(params), spec=preprocess.spec, pad_id=preprocess.tokenizer.pad_id
  )

  def prompt(index):
    record = held_out[index]
    question = record['conversations'][0]['value']
    return encode_prompt(preprocess, question, record['image'])

  device = jax.devices()[0]
  print(
    f'Demo model ({sum(p.size for p in jax.tree.leaves(params)):,} parameters) on '
    f'{device.platform} ({device.device_kind}), {_NEW_TOKENS.value} decode steps, fp32\n'
  )
  print('| batch | prompt tokens (mean) | prefill tokens/s | decode tokens/s | decode ms/step |')
  print('| ---: | ---: | ---: | ---: | ---: |')
  for batch_size in map(int, _BATCH_SIZES.value):
    prompts = [prompt(i) for i in range(batch_size)]
    prompt_tokens = sum(len(p['tokens']) for p in prompts)
    steps = _NEW_TOKENS.value
    sampling = SamplingConfig(max_new_tokens=1 + steps)
    prefill = best_time(
      lambda prompts=prompts, sampling=sampling: generator.prefill(
        prompts, sampling
      ).output.block_until_ready(),
      _REPEATS.value,
    )
    time_decode(generator, prompts, sampling)  # compile
    decode = min(time_decode(generator, prompts, sampling) for _ in range(_REPEATS.value)) / steps
    print(
      f'| {batch_size} | {prompt_tokens / batch_size:.1f} | {prompt_tokens / prefill:,.0f} | '
      f'{batch_size / decode:,.0f} | {1000 * decode:.2f} |',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
