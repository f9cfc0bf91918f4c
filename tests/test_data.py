"""Embedded dataset, tokenizer, templates, resize policies, patchify and row encoding."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.data import encode, images, pipeline, templates
from evejax.data.shapes import COLORS, SHAPES, ShapesDataset
from evejax.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope='module')
def shapes():
  return ShapesDataset(200, seed=3)


@pytest.fixture(scope='module')
def tokenizer(shapes):
  return train_bpe(shapes.corpus(), 512)


def test_shapes_are_deterministic_and_varied(shapes):
  again = ShapesDataset(200, seed=3)
  assert shapes[17] == again[17]
  assert ShapesDataset(200, seed=4)[17]['image'] != shapes[17]['image']
  sizes = {Image.open(io.BytesIO(shapes[i]['image'])).size for i in range(50)}
  ratios = {round(w / h, 1) for w, h in sizes}
  assert len(sizes) > 10 and min(ratios) < 0.8 and max(ratios) > 1.25
  assert all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)  # Grids of 32 px cells.


def test_captions_describe_the_pixels(shapes):
  """Each shape's colour is at its centre, inside one 32 px cell; shapes are listed top to bottom,
  one per cell row."""
  for i in range(40):
    image, drawn, _ = shapes.scene(i)
    pixels = np.asarray(image)
    for shape in drawn:
      x, y = shape.center
      if shape.kind == 'triangle':
        y = (shape.box[1] + 3 * shape.box[3]) // 4  # The centroid side of a triangle.
      np.testing.assert_array_equal(pixels[y, x], COLORS[shape.color])
    rows = [s.box[1] // 32 for s in drawn]
    assert rows == sorted(set(rows))
    assert all(s.box[0] // 32 == s.box[2] // 32 and s.box[1] // 32 == s.box[3] // 32 for s in drawn)
    assert len({s.kind for s in drawn}) == len(drawn) and {s.kind for s in drawn} <= set(SHAPES)
  record = shapes[0]
  answer = record['conversations'][1]['value']
  assert record['conversations'][0]['value'].startswith('<image>\n') and answer.endswith('.')


def test_multi_turn_conversations_ask_distinct_questions():
  record = ShapesDataset(10, seed=3, turns=3)[4]
  turns = record['conversations']
  assert [t['from'] for t in turns] == ['human', 'gpt'] * 3
  assert turns[0]['value'].startswith('<image>\n') and '<image>' not in turns[2]['value']
  assert len({t['value'] for t in turns[::2]}) == 3
  with pytest.raises(ValueError, match='turns must be in'):
    ShapesDataset(10, seed=3, turns=6)


def test_answers_need_the_image(shapes):
  """The same question gets different answers across images: text alone cannot answer."""
  answers = {}
  for i in range(len(shapes)):
    question, answer = (t['value'] for t in shapes[i]['conversations'])
    answers.setdefault(question, set()).add(answer)
  assert all(len(a) > 1 for q, a in answers.items() if q.endswith('the image.'))
  assert len(answers['<image>\nhow many shapes are there?']) == 3


def test_tokenizer_round_trip_and_reload(tokenizer, tmp_path):
  text = ' a red circle, a blue square and a green triangle.<|im_end|>'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert ids[-1] == tokenizer.eos_id and len(ids) == 13  # Whole words are single tokens.
  tokenizer.save(str(tmp_path))
  loaded = Tokenizer.load(str(tmp_path))
  assert loaded.encode(text) == ids and loaded.pad_id == tokenizer.pad_id
  assert train_bpe(ShapesDataset(5, 0).corpus(), 512).backend.to_str() == tokenizer.backend.to_str()
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    Tokenizer.load(str(tmp_path / 'missing'))


def test_chat_template_masks_all_but_answers(tokenizer):
  conv = [
    {'from': 'human', 'value': 'what color is the circle? <image>'},
    {'from': 'gpt', 'value': 'red.'},
    {'from': 'human', 'value': 'how many shapes are there?'},
    {'from': 'gpt', 'value': 'two.'},
  ]
  ids, sup = templates.tokenize_conversation(conv, tokenizer, templates.get_template('chat'))
  assert ids.count(bf.IMAGE_TOKEN_INDEX) == 1
  supervised_text = tokenizer.decode([i for i, s in zip(ids, sup) if s])
  assert supervised_text == ' red.<|im_end|> two.<|im_end|>'
  text = tokenizer.decode([i for i in ids if i != bf.IMAGE_TOKEN_INDEX])
  # The image moved to the start of its turn, followed by a newline (as in the reference).
  assert text == (
    'USER: \nwhat color is the circle? ASSISTANT: red.<|im_end|>'
    'USER: how many shapes are there? ASSISTANT: two.<|im_end|>'
  )
  assert ids.index(bf.IMAGE_TOKEN_INDEX) == len(tokenizer.encode('USER: '))


def test_plain_template_supervises_caption_and_newline(tokenizer):
  conv = [
    {'from': 'human', 'value': '<image>\ndescribe the image.'},
    {'from': 'gpt', 'value': ' a red circle. '},
  ]
  ids, sup = templates.tokenize_conversation(conv, tokenizer, templates.get_template('plain'))
  assert ids[0] == bf.IMAGE_TOKEN_INDEX and not sup[0] and all(sup[1:])
  assert tokenizer.decode(ids[1:]) == 'a red circle.\n'


@pytest.mark.parametrize(
  'size,policy,want',
  [
    ((1024, 1024), 'eve_v2_train', (800, 800)),
    ((640, 480), 'eve_v2_train', (640, 480)),
    ((4000, 3000), 'eve_v2_train', (928, 704)),
    ((300, 200), 'eve_v2_train', (288, 192)),
    ((1024, 1024), 'eve_v2_infer', (800, 800)),
    ((300, 200), 'eve_v2_infer', (992, 672)),
  ],
)
def test_resize_policies_match_reference_table(size, policy, want):
  # Table of EVE_REFERENCE.md section 3.2 at max_size 800 (the 1600 column scales the same way).
  assert images.target_size(*size, max_size=800, multiple=32, policy=policy) == want


def test_reference_token_counts_at_1600():
  for size, want_tokens in [((1024, 1024), 1057), ((4000, 3000), 2538), ((300, 200), 61)]:
    w, h = images.target_size(*size, max_size=1600, multiple=32, policy='eve_v2_train')
    assert 1 + (h // 32) * (w // 32 + 1) == want_tokens
  w, h = images.target_size(640, 480, max_size=1600, multiple=32, policy='eve_v2_infer')
  assert 1 + (h // 32) * (w // 32 + 1) == 2597


def test_patchify_groups_are_conv_windows():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
  groups, grid = images.patchify(pixels, patch=2, merge=2)
  assert grid == (2, 3) and groups.shape == (6, 4, 12)
  # Group (r=1, c=2), sub-patch (1, 0) is the 2x2 pixel block at y=6, x=8.
  np.testing.assert_array_equal(groups[1 * 3 + 2, 2], pixels[6:8, 8:10].reshape(-1))


def test_placeholder_count_mismatch_is_an_error():
  groups = np.zeros((1, 4, 12), np.uint8)
  with pytest.raises(ValueError, match='2 <image> placeholders but 1 images'):
    encode.encode_example(
      [1, bf.IMAGE_TOKEN_INDEX, bf.IMAGE_TOKEN_INDEX], [False] * 3, [(groups, (1, 1))]
    )
  with pytest.raises(ValueError, match='0 <image> placeholders but 1 images'):
    encode.encode_example([1, 2], [False, True], [(groups, (1, 1))])


def _png(width, height):
  buffer = io.BytesIO()
  Image.new('RGB', (width, height), (10, 20, 30)).save(buffer, format='PNG')
  return buffer.getvalue()


def test_image_over_pixel_budget_is_an_error(tokenizer):
  pre = pipeline.Preprocessor(
    tokenizer,
    templates.get_template('chat'),
    BatchSpec(seq_len=128, patch_slots=81, patch_size=8, merge=2, max_size=64, resize='none'),
  )
  record = {
    'image': _png(128, 128),
    'conversations': [{'from': 'human', 'value': '<image>\nhi'}, {'from': 'gpt', 'value': 'a'}],
  }
  with pytest.raises(ValueError, match='over the budget .* data.max_size=64'):
    pre(record)
  resized = dataclasses.replace(pre, spec=pre.spec.replace(resize='eve_v2_train'))(record)
  assert (resized['token_kind'] == bf.PATCH).sum() == 16  # 64x64 px at 16 px per token


def test_too_long_example_is_an_error(tokenizer, shapes):
  pre = pipeline.Preprocessor(
    tokenizer,
    templates.get_template('chat'),
    BatchSpec(seq_len=20, patch_slots=49, patch_size=8, merge=2, max_size=96),
  )
  with pytest.raises(ValueError, match='too_long: .* do not fit a row of data.seq_len=20'):
    pre(shapes[0])


def test_corrupt_image_is_an_error():
  with pytest.raises(ValueError, match='empty image'):
    images.decode_image(b'')
  with pytest.raises(ValueError, match='undecodable image'):
    images.decode_image(_png(20, 20)[:40])


def test_pipeline_batches_have_static_shapes(tokenizer, shapes):
  pre = pipeline.Preprocessor(
    tokenizer,
    templates.get_template('chat'),
    BatchSpec(seq_len=80, patch_slots=49, patch_size=8, merge=2, max_size=96),
  )
  make = lambda: iter(
    pipeline.make_dataset(shapes, pre, 4, seed=0, shuffle=True, num_epochs=None, num_threads=1)
  )
  it = make()
  first, second = next(it), next(it)
  assert set(first) == set(bf.KEYS)
  assert first['patches'].shape == (4, pre.spec.image_budget, 4, 192) == (4, 49, 4, 192)
  assert all(first[k].shape == (4, 80) for k in bf.KEYS if k != 'patches')
  assert not np.array_equal(first['tokens'], second['tokens'])
  again = next(make())
  np.testing.assert_array_equal(first['tokens'], again['tokens'])
