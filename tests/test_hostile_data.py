"""Hostile data: every Pillow mode decodes to the RGB the file shows (checked against NumPy) or is
a bad image; malformed conversations are counted `bad_conversation` records, never a crash or a
coercion; bad held-out records never fail a run; an over-budget image says what helps."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from evejax.batch import BatchSpec
from evejax.config import DataConfig
from evejax.data import bad_records, images, pipeline, templates
from evejax.data.tokenizer import train_bpe

RNG = np.random.default_rng(0)
SIDE = 16


def encoded(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def decoded(image: Image.Image, fmt: str = 'PNG') -> np.ndarray:
  """What the loader sees of `image` saved as `fmt`: [H, W, 3] uint8."""
  rgb = images.decode_image(encoded(image, fmt))
  assert rgb.mode == 'RGB'
  return np.asarray(rgb)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=-1)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Alpha compositing over a white page, in floating point."""
  a = alpha[..., None].astype(np.float64) / 255
  return rgb.astype(np.float64) * a + 255 * (1 - a)


def test_16_bit_greyscale_png_keeps_its_brightness():
  """The issue's case: a 16-bit PNG of mean ~129 (8-bit scale) decoded to white."""
  grey = RNG.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
  image = Image.fromarray(grey)
  assert Image.open(io.BytesIO(encoded(image, 'PNG'))).mode == 'I;16'
  np.testing.assert_array_equal(decoded(image), grey_to_rgb(grey / 257))


def test_32_bit_integer_and_float_greyscale_are_scaled_by_their_range():
  grey = RNG.integers(0, 65536, (SIDE, SIDE)).astype(np.int32)
  np.testing.assert_array_equal(decoded(Image.fromarray(grey), 'TIFF'), grey_to_rgb(grey / 257))
  unit = RNG.random((SIDE, SIDE)).astype(np.float32)
  np.testing.assert_array_equal(decoded(Image.fromarray(unit), 'TIFF'), grey_to_rgb(unit * 255))


@pytest.mark.parametrize(
  'values', [np.full((4, 4), 70000, np.int32), np.full((4, 4), -1, np.int32), np.full((4, 4), 2.5)]
)
def test_greyscale_outside_its_range_is_unsupported(values):
  image = Image.fromarray(values.astype(np.float32) if values.dtype.kind == 'f' else values)
  with pytest.raises(ValueError, match=f'unsupported image mode {image.mode}: values'):
    images.decode_image(encoded(image, 'TIFF'))


def test_alpha_is_composited_over_white():
  grey = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
  alpha = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
  la = Image.fromarray(np.stack([grey, alpha], -1), 'LA')
  want = over_white(np.repeat(grey[..., None], 3, -1), alpha)
  np.testing.assert_allclose(decoded(la), want, atol=1)
  rgb = RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), 'RGBA')
  np.testing.assert_allclose(decoded(rgba), over_white(rgb, alpha), atol=1)


def test_palette_with_a_transparent_entry_is_composited():
  palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
  index = RNG.integers(0, 4, (SIDE, SIDE), dtype=np.uint8)
  image = Image.fromarray(index, 'P')
  image.putpalette(palette.ravel().tolist())
  image.info['transparency'] = 2  # Palette entry 2 is fully transparent.
  data = encoded(image, 'PNG')
  assert 'transparency' in Image.open(io.BytesIO(data)).info
  want = palette[index].copy()
  want[index == 2] = 255
  np.testing.assert_array_equal(np.asarray(images.decode_image(data)), want)
  # Without transparency a palette image is its colours.
  plain = Image.fromarray(index, 'P')
  plain.putpalette(palette.ravel().tolist())
  np.testing.assert_array_equal(decoded(plain), palette[index])


def test_cmyk_ycbcr_and_bilevel_match_their_definitions():
  cmyk = RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
  c = cmyk.astype(np.float64) / 255
  want = 255 * (1 - c[..., :3]) * (1 - c[..., 3:])
  np.testing.assert_allclose(decoded(Image.fromarray(cmyk, 'CMYK'), 'TIFF'), want, atol=0.5)
  ycc = RNG.integers(16, 240, (SIDE, SIDE, 3), dtype=np.uint8)
  y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
  want = np.stack(  # JFIF (full range), as JPEG files store it.
    [
      y + 1.402 * (cr - 128),
      y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
      y + 1.772 * (cb - 128),
    ],
    -1,
  )
  got = np.asarray(images.to_rgb(Image.fromarray(ycc, 'YCbCr')))
  np.testing.assert_allclose(got, np.clip(want, 0, 255), atol=1.5)
  bits = RNG.random((SIDE, SIDE)) > 0.5
  np.testing.assert_array_equal(decoded(Image.fromarray(bits)), grey_to_rgb(bits * 255.0))


@pytest.fixture(scope='module')
def tokenizer():
  return train_bpe(['USER: <image>\nwhat? ASSISTANT: a red square.<|im_end|>'] * 20, 300)


@pytest.fixture(scope='module')
def pre(tokenizer):
  spec = BatchSpec(seq_len=64, patch_slots=24, patch_size=4, merge=2, max_size=24)
  return pipeline.Preprocessor(tokenizer, templates.get_template('chat'), spec)


def record(image=None, conversations=None):
  image = image if image is not None else encoded(Image.new('RGB', (16, 16), 'red'), 'PNG')
  default = [{'from': 'human', 'value': '<image>\nwhat?'}, {'from': 'gpt', 'value': 'a square.'}]
  return {'image': image, 'conversations': default if conversations is None else conversations}


def test_unsupported_mode_is_a_bad_image(pre):
  lab = encoded(Image.new('LAB', (16, 16)), 'TIFF')
  result = pre.encode(record(lab))
  assert isinstance(result, pipeline.Rejected) and result.kind == 'bad_image'
  assert 'unsupported image mode LAB' in result.reason


HUMAN = {'from': 'human', 'value': '<image>\nwhat?'}
BAD_CONVERSATIONS = {
  'null answer': ([HUMAN, {'from': 'gpt', 'value': None}], 'turn 1 .* has no text'),
  'string turn': ([HUMAN, 'a square.'], 'turn 1 must be a'),
  'empty answer': ([HUMAN, {'from': 'gpt', 'value': '  '}], 'turn 1 .* has no text'),
  'unknown role': ([HUMAN, {'from': 'bot', 'value': 'x'}], "from 'bot'"),
  'two humans': ([HUMAN, HUMAN], "alternate 'human' and 'gpt'"),
  'odd turns': ([HUMAN], 'pairs, got 1 turns'),
  'not a list': ('<image> a square', 'must be a list of turns, got str'),
  'number value': ([HUMAN, {'from': 'gpt', 'value': 3}], 'turn 1 .* has no text'),
}


@pytest.mark.parametrize('name', BAD_CONVERSATIONS)
def test_malformed_conversation_is_a_bad_conversation(pre, name):
  conversation, reason = BAD_CONVERSATIONS[name]
  with pytest.raises(templates.BadConversation, match=reason):
    templates.conversation_pairs(conversation)
  result = pre.encode(record(conversations=conversation))
  assert isinstance(result, pipeline.Rejected) and result.kind == 'bad_conversation', result


def test_loader_counts_malformed_conversations_and_trains_on_the_rest(pre, tokenizer, tmp_path):
  source = [record()] * 6 + [record(conversations=c) for c, _ in BAD_CONVERSATIONS.values()]
  quarantine = str(tmp_path / 'quarantine.jsonl')
  ds = pipeline.make_dataset(
    source,
    pre,
    2,
    seed=0,
    shuffle=False,
    num_epochs=1,
    policy=bad_records.Policy(max_fraction=0.9, min_records=1, quarantine=quarantine),
  )
  iterator = iter(ds)
  batches = list(iterator)
  assert sum(int((b['loss_weights'] > 0).any(-1).sum()) for b in batches) == 6
  answers = {
    tokenizer.decode(b['targets'][r][b['loss_weights'][r] > 0].tolist())
    for b in batches
    for r in range(2)
  }
  assert not any('None' in a for a in answers)
  quarantined = bad_records.read_quarantine(quarantine)
  assert sorted(e['index'] for e in quarantined) == list(range(6, len(source)))


def test_bad_held_out_records_are_counted_not_fatal(pre, tmp_path):
  """Evaluation may run after all the training: its bad records never end the run."""
  source = [record(), record(b'not an image'), record()]
  batches = pipeline.eval_batches(DataConfig(), source, pre, 2, workdir=str(tmp_path))
  rows = sum(int((b['loss_weights'] > 0).any(-1).sum()) for b in batches)
  assert rows == 2
  (entry,) = bad_records.read_quarantine(str(tmp_path / 'quarantine.jsonl'))
  assert entry['index'] == 1 and entry['kind'] == 'bad_image'


def test_over_budget_message_says_what_helps(pre):
  """10000x20 px under eve_v2_train: each side keeps one token, so it cannot fit the budget."""
  strip = encoded(Image.new('RGB', (10000, 20), 'blue'), 'PNG')
  result = pre.encode(record(strip))
  assert isinstance(result, pipeline.Rejected) and result.kind == 'bad_image'
  assert 'resize it with' not in result.reason  # eve_v2_train is already the policy.
  assert 'aspect ratio of 67:1 is too extreme' in result.reason
  assert 'a larger data.max_size keeps such images' in result.reason
  kept_size = dataclasses.replace(pre, spec=pre.spec.replace(resize='none'))
  square = encoded(Image.new('RGB', (80, 80), 'blue'), 'PNG')  # Kept at 80 px: 100 tokens.
  assert "resize it with data.resize='eve_v2_train'" in kept_size.encode(record(square)).reason


def test_only_a_generation_prompt_leaves_its_last_answer_empty():
  """Inference leaves the last answer open for generation; data never has an empty answer."""
  open_last = [HUMAN, {'from': 'gpt', 'value': ''}]
  assert templates.conversation_pairs(open_last, open_answer=True) == [(HUMAN['value'], '')]
  with pytest.raises(templates.BadConversation, match='has no text'):
    templates.conversation_pairs(open_last)
  with pytest.raises(templates.BadConversation, match='turn 1 .* has no text'):
    templates.conversation_pairs(
      open_last + [HUMAN, {'from': 'gpt', 'value': ''}], open_answer=True
    )
