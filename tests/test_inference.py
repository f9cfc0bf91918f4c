"""KV-cache generation against full recomputation, sampling against Hugging Face's processors."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.data import encode, images, templates
from evejax.data.shapes import ShapesDataset
from evejax.data.tokenizer import train_bpe
from evejax.inference import Generator, SamplingConfig
from evejax.inference import prompts as prompt_lib
from evejax.inference.sampling import apply_repetition_penalty, filter_logits
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from tests.conftest import TINY
from tests.fake_devices import run_with_devices


def prompt_spec(cfg: ModelConfig) -> BatchSpec:
  """The model's batch format for prompts (the generator sets rows and slots per batch)."""
  return BatchSpec.for_model(cfg, seq_len=0, patch_slots=0)


def make_prompt(rng, text_before, text_after, image_hw):
  """A prompt of random token ids around an optional random image of `image_hw` pixels."""
  ids = list(rng.integers(3, TINY['vocab_size'], text_before))
  groups = []
  if image_hw:
    pixels = rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    groups = [images.patchify(pixels, TINY['vision_patch_size'], TINY['vision_merge'])]
    ids.append(bf.IMAGE_TOKEN_INDEX)
  ids += list(rng.integers(3, TINY['vocab_size'], text_after))
  return encode.encode_example(ids, [False] * len(ids), groups)


@jax.jit
def _training_forward(graphdef, params, batch):
  return nnx.merge(graphdef, params)(batch)


def uncached_greedy(model, prompt, steps, seq_len=64, max_patches=32):
  """Reference: recompute the whole sequence through the training path for every new token."""
  spec = BatchSpec.for_model(model.cfg, seq_len=seq_len, patch_slots=max_patches)
  graphdef, params = nnx.split(model)
  generated = []
  for _ in range(steps):
    n_new = len(generated)
    example = dict(prompt)
    example['tokens'] = np.concatenate([prompt['tokens'], generated]).astype(np.int32)
    for key in ('token_kind', 'patch_index', 'targets', 'loss_weights'):
      example[key] = np.concatenate([prompt[key], np.zeros(n_new, prompt[key].dtype)])
    row = encode.pack_row([example], spec)
    logits = _training_forward(graphdef, params, {k: v[None] for k, v in row.items()})
    generated.append(int(np.argmax(logits[0, len(example['tokens']) - 1])))
  return generated


@pytest.fixture(scope='module')
def model():
  return EVE(ModelConfig(**TINY), rngs=nnx.Rngs(0))


def generator_for(model, **kw):
  graphdef, params = nnx.split(model, nnx.Param)
  return Generator(
    graphdef,
    nnx.to_pure_dict(params),
    spec=prompt_spec(model.cfg),
    pad_id=0,
    length_multiple=8,
    **kw,
  )


@pytest.fixture(scope='module')
def generator(model):
  """Shared so that its compiled programs are reused across tests."""
  return generator_for(model)


@pytest.fixture(scope='module')
def prompts():
  rng = np.random.default_rng(0)
  # Different text lengths and image sizes (16x24 -> 2x3 tokens, 32x16 -> 4x2), one without image.
  return [
    make_prompt(rng, 3, 5, (16, 24)),
    make_prompt(rng, 1, 2, (32, 16)),
    make_prompt(rng, 6, 1, None),
  ]


def test_cached_greedy_equals_uncached_recomputation(model, generator, prompts):
  steps = 6
  cached = generator.generate(prompts, SamplingConfig(max_new_tokens=steps))
  for prompt, tokens in zip(prompts, cached):
    assert tokens == uncached_greedy(model, prompt, steps)
  # Batching must not change a row's result.
  assert generator.generate(prompts[1:2], SamplingConfig(max_new_tokens=steps)) == [cached[1]]


def test_cached_equals_uncached_for_a_dense_llama_decoder(prompts):
  """EVEv1's decoder layout (Llama: no biases, no vision copies) on the same cached path."""
  dense = EVE(
    ModelConfig(**{**TINY, 'family': 'llama', 'moe_part': '', 'attention_bias': False}),
    rngs=nnx.Rngs(1),
  )
  cached = generator_for(dense).generate(prompts[:2], SamplingConfig(max_new_tokens=5))
  assert cached == [uncached_greedy(dense, p, 5) for p in prompts[:2]]


def test_sorted_routing_generates_the_same_tokens(model, generator, prompts):
  """The FLOP-exact 'sorted' routing (gather by modality) on the cached path: same parameters,
  same tokens as the reference 'select' routing."""
  sorted_model = EVE(ModelConfig(**TINY, routing='sorted'), rngs=nnx.Rngs(0))
  nnx.update(sorted_model, nnx.state(model, nnx.Param))
  cfg = SamplingConfig(max_new_tokens=6)
  assert generator_for(sorted_model).generate(prompts, cfg) == generator.generate(prompts, cfg)


def test_decode_uses_text_weights(model, prompts):
  """Scaling every vision copy (moe_*) must leave a text-only prompt's tokens unchanged: decode
  steps, and text tokens at prefill, use the text weights only."""
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)

  def scaled_vision_copies(tree, path=()):
    if isinstance(tree, dict):
      return {k: scaled_vision_copies(v, path + (str(k),)) for k, v in tree.items()}
    return tree * 3.0 if any(p.startswith('moe_') for p in path) else tree

  batch = [make_prompt(np.random.default_rng(1), 5, 0, None), prompts[0]]
  cfg = SamplingConfig(max_new_tokens=5)
  spec = prompt_spec(model.cfg)
  base = Generator(graphdef, params, spec=spec, pad_id=0).generate(batch, cfg)
  changed = Generator(graphdef, scaled_vision_copies(params), spec=spec, pad_id=0).generate(
    batch, cfg
  )
  assert base[0] == changed[0]  # No visual token anywhere: the vision copies are never used.
  assert base[1] != changed[1]  # The image's tokens went through them at prefill.


def test_stop_tokens_max_length_and_streaming(model, generator, prompts):
  free = generator.generate(prompts[:1], SamplingConfig(max_new_tokens=6))[0]
  stop = free[2]
  first_stop = free.index(stop)
  stopped = generator.generate(prompts[:1], SamplingConfig(max_new_tokens=6, stop_tokens=(stop,)))[
    0
  ]
  assert stopped == free[:first_stop]

  prompt_len = len(prompts[0]['tokens'])
  capped = generator_for(model, max_length=prompt_len + 3).generate(
    prompts[:1], SamplingConfig(max_new_tokens=6)
  )[0]
  assert capped == free[:3]

  seen = []
  streamed = generator.generate(
    prompts[:1], SamplingConfig(max_new_tokens=6), on_step=lambda rows: seen.append(rows[0])
  )
  assert streamed[0] == free
  assert [len(s) for s in seen[:5]] == [1, 2, 3, 4, 5] and seen[-1] == free


def test_sampling_is_seeded_and_top_k_1_is_greedy(generator, prompts):
  greedy = generator.generate(prompts, SamplingConfig(max_new_tokens=6))
  sample = SamplingConfig(max_new_tokens=6, temperature=1.5, top_k=1)
  assert generator.generate(prompts, sample, seed=3) == greedy
  hot = SamplingConfig(max_new_tokens=6, temperature=5.0)
  a = generator.generate(prompts, hot, seed=1)
  assert a == generator.generate(prompts, hot, seed=1)
  assert a != generator.generate(prompts, hot, seed=2)


def test_logit_processors_match_transformers():
  torch = pytest.importorskip('torch')
  from transformers.generation import logits_process as lp

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
  seen_ids = rng.integers(0, 50, (3, 7))
  seen = np.zeros((3, 50), bool)
  np.put_along_axis(seen, seen_ids, True, axis=1)
  ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
  theirs = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen_ids), torch.tensor(logits))
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)

  for top_k, top_p in ((5, 1.0), (0, 0.6), (10, 0.3), (0, 0.999)):
    cfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), cfg))
    expected = lp.TemperatureLogitsWarper(0.7)(None, torch.tensor(logits))
    if top_k:
      expected = lp.TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
      expected = lp.TopPLogitsWarper(top_p)(None, expected)
    expected = expected.numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_image_seen_id_counts_for_the_repetition_penalty(model, prompts):
  """Official EVEv2: id 0 stands in for the image in what the penalty sees; text-only rows keep it
  unseen unless their text has it."""
  cfg = SamplingConfig(max_new_tokens=1)
  plain = generator_for(model).prefill(prompts, cfg).seen
  marked = generator_for(model, image_seen_id=0).prefill(prompts, cfg).seen
  has_image = [p['patches'] is not None for p in prompts]
  np.testing.assert_array_equal(np.asarray(marked[:, 0]), np.asarray(plain[:, 0]) | has_image)
  np.testing.assert_array_equal(np.asarray(marked[:, 1:]), np.asarray(plain[:, 1:]))


def test_sampling_config_rejects_bad_values():
  for bad in (
    dict(temperature=-1),
    dict(top_p=0),
    dict(top_k=-2),
    dict(max_new_tokens=0),
    dict(repetition_penalty=0),
  ):
    with pytest.raises(ValueError, match=next(iter(bad))):
      SamplingConfig(**bad)


@pytest.fixture(scope='module')
def shapes_tokenizer():
  return train_bpe(ShapesDataset(50, seed=1).corpus(), 384)


@pytest.mark.parametrize('template', ['chat', 'qwen2', 'vicuna_v1'])
def test_multi_turn_prompt_is_the_training_layout(template, shapes_tokenizer):
  """Turn k's prompt is the training tokenisation of the conversation up to answer k."""
  tokenizer = shapes_tokenizer
  turns = [
    ('what color is the circle?', 'red.'),
    ('how many shapes are there?', 'two.'),
    ('what shape is at the top?', 'a circle.'),
  ]
  conversation = [
    {'from': role, 'value': text} for turn in turns for role, text in zip(('human', 'gpt'), turn)
  ]
  conversation[0]['value'] = '<image>\n' + conversation[0]['value']
  ids, supervised = templates.tokenize_conversation(
    conversation, tokenizer, templates.get_template(template)
  )
  answer_starts = [i for i in range(1, len(ids)) if supervised[i] and not supervised[i - 1]]
  assert len(answer_starts) == len(turns)
  for k, (question, _) in enumerate(turns):
    prompt = prompt_lib.prompt_ids(
      question, tokenizer, templates.get_template(template), with_image=True, history=turns[:k]
    )
    assert prompt == ids[: answer_starts[k]]
    assert prompt.count(bf.IMAGE_TOKEN_INDEX) == 1
  with pytest.raises(ValueError, match='no image was given'):
    prompt_lib.prompt_ids(
      'and now?',
      tokenizer,
      templates.get_template(template),
      with_image=False,
      history=[('<image>\nwhat is it?', 'a circle.')],
    )


def test_left_padded_batch_right_aligns_prompts(prompts):
  batch = prompt_lib.left_padded_batch(
    prompts, BatchSpec.for_model(ModelConfig(**TINY), seq_len=24, patch_slots=16)
  )
  for row, prompt in enumerate(prompts):
    n = len(prompt['tokens'])
    np.testing.assert_array_equal(batch['tokens'][row, -n:], prompt['tokens'])
    np.testing.assert_array_equal(batch['positions'][row, -n:], np.arange(n))
    assert (batch['segment_ids'][row, : 24 - n] == 0).all()
    assert (batch['segment_ids'][row, -n:] == 1).all()


SHARDED_SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from flax import nnx
    from evejax import sharding
    from evejax.inference import Generator, SamplingConfig
    from evejax.models import EVE, ModelConfig
    from tests.conftest import TINY
    from tests.test_inference import make_prompt, prompt_spec
    assert jax.device_count() == 8
    cfg = ModelConfig(**TINY)
    rng = np.random.default_rng(0)
    prompts = [make_prompt(rng, 3, 5, (16, 24)), make_prompt(rng, 1, 2, (32, 16)),
               make_prompt(rng, 6, 1, None)]
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    graphdef, params = sharding.init_sharded(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh)
    kernel = params['layers'][0]['self_attn']['q_proj']['kernel']
    assert len(kernel.sharding.device_set) == 8, kernel.sharding
    sampling = SamplingConfig(max_new_tokens=5)
    spec = prompt_spec(cfg)
    sharded = Generator(graphdef, params, spec=spec, pad_id=0, mesh=mesh).generate(prompts,
                                                                                   sampling)
    local = jax.device_get(params)
    single = Generator(graphdef, local, spec=spec, pad_id=0).generate(prompts, sampling)
    assert sharded == single, (sharded, single)
    print('OK', sharded)
""")


def test_sharded_generation_matches_single_device():
  assert 'OK' in run_with_devices(['-c', SHARDED_SCRIPT], devices=8)


def test_cached_equals_uncached_for_eve_v1():
  """EVEv1 (Llama decoder, local/global-attention PEL with a valid-pixel channel; PAL is training
  only): cached greedy decoding equals full recomputation, prompts of different lengths and
  image sizes in one batch."""
  cfg = ModelConfig(**{**model_preset('eve_v1_tiny'), 'num_layers': 2, 'vocab_size': 97})
  model = EVE(cfg, rngs=nnx.Rngs(2))
  token = cfg.vision_patch_size * cfg.vision_merge
  rng = np.random.default_rng(4)

  def v1_prompt(before, after, image_hw):
    pixels = images.with_valid_channel(rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8), token)
    ids = [*rng.integers(3, 97, before), bf.IMAGE_TOKEN_INDEX, *rng.integers(3, 97, after)]
    groups = [images.patchify(pixels, cfg.vision_patch_size, cfg.vision_merge)]
    return encode.encode_example(ids, [False] * len(ids), groups)

  v1_prompts = [v1_prompt(3, 4, (56, 84)), v1_prompt(1, 2, (50, 28))]  # 2x3 and 2x1 tokens
  cached = generator_for(model).generate(v1_prompts, SamplingConfig(max_new_tokens=4))
  assert cached == [uncached_greedy(model, p, 4) for p in v1_prompts]
