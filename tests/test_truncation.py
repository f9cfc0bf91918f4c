"""Length handling as the reference (EVE_REFERENCE §2.4, §3.5, §7.8): text ids cut to
`data.max_text_len` before the image expands; an example still longer than a row loses its text
tail; too-long samples are counted as `truncated`, never as bad records."""

import dataclasses
import io

import grain
import numpy as np
import pytest
from PIL import Image

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.data import bad_records, pipeline, templates
from evejax.data.tokenizer import train_bpe

LONG_ANSWER = ' '.join(f'word{i % 7}' for i in range(60))


def png(side: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def record(side: int = 16, answer: str = LONG_ANSWER) -> dict:
  return {
    'image': png(side),
    'conversations': [
      {'from': 'human', 'value': '<image>\nwhat is it?'},
      {'from': 'gpt', 'value': answer},
    ],
  }


@pytest.fixture(scope='module')
def pre():
  tokenizer = train_bpe([f'USER: what is it? ASSISTANT: {LONG_ANSWER}<|im_end|>'], 300)
  spec = BatchSpec(seq_len=256, patch_slots=16, patch_size=4, merge=2, max_size=32)
  return pipeline.Preprocessor(tokenizer, templates.get_template('chat'), spec)


def reference_ids(pre, rec):
  """The uncut tokenisation (IMAGE_TOKEN_INDEX at the image), computed apart from `encode`."""
  return templates.tokenize_conversation(rec['conversations'], pre.tokenizer, pre.template)


def test_text_is_cut_before_the_image_expands(pre):
  rec = record()
  ids, supervised = reference_ids(pre, rec)
  full = pre.encode(rec)
  assert 'truncated' not in full and len(ids) > 40
  cut = dataclasses.replace(pre, max_text_len=40).encode(rec)
  # The text positions are exactly the first 40 ids without the placeholder; the image is whole.
  text = cut['tokens'][cut['token_kind'] == bf.TEXT]
  np.testing.assert_array_equal(text, [i for i in ids[:40] if i != bf.IMAGE_TOKEN_INDEX])
  visual = (full['token_kind'] != bf.TEXT).sum()
  assert (cut['token_kind'] != bf.TEXT).sum() == visual and len(cut['tokens']) == 39 + visual
  np.testing.assert_array_equal(cut['patches'], full['patches'])
  # Labels: the kept answer ids are supervised, and the last position predicts nothing.
  kept_targets = cut['targets'][cut['loss_weights'] > 0]
  np.testing.assert_array_equal(kept_targets, [i for i, s in zip(ids[1:40], supervised[1:40]) if s])
  assert cut['loss_weights'][-1] == 0 and cut['truncated'].startswith('text cut by')
  assert f'{len(ids) - 40} ids to data.max_text_len=40' in cut['truncated']


def test_an_image_whose_placeholder_is_cut_is_not_shown(pre):
  ids, _ = reference_ids(pre, record())
  at = ids.index(bf.IMAGE_TOKEN_INDEX)
  cut = dataclasses.replace(pre, max_text_len=at).encode(record())
  assert cut['patches'] is None and (cut['token_kind'] == bf.TEXT).all()
  np.testing.assert_array_equal(cut['tokens'], ids[:at])


def test_an_example_longer_than_a_row_loses_its_text_tail(pre):
  full = pre.encode(record())
  short = dataclasses.replace(pre, spec=pre.spec.replace(seq_len=50)).encode(record())
  for key in ('tokens', 'token_kind', 'patch_index'):
    np.testing.assert_array_equal(short[key], full[key][:50], err_msg=key)
  np.testing.assert_array_equal(short['loss_weights'][:-1], full['loss_weights'][:49])
  assert short['loss_weights'][-1] == 0 and short['targets'][-1] == 0
  assert f'{len(full["tokens"])} positions cut to data.seq_len=50' in short['truncated']
  # A row too short for the visual tokens: skipped as too_long (no cut keeps the image whole).
  tiny_row = dataclasses.replace(pre, spec=pre.spec.replace(seq_len=8)).encode(record())
  assert isinstance(tiny_row, pipeline.Rejected) and tiny_row.kind == bad_records.TOO_LONG


def test_truncated_samples_are_counted_apart_from_bad_records(pre, tmp_path):
  row_of_50 = dataclasses.replace(pre, spec=pre.spec.replace(seq_len=50))
  elements = [row_of_50.encode(record()) for _ in range(3)] + [
    bad_records.BadRecord('shard', 7, bad_records.TOO_LONG, 'no cut fits'),
    pre.encode(record(answer='short')),
  ]
  quarantine = str(tmp_path / 'quarantine.jsonl')
  # Any bad record would stop this run (max_fraction 0): too-long samples never count as bad.
  policy = bad_records.Policy(max_fraction=0.0, min_records=1, quarantine=quarantine)
  it = iter(
    bad_records.FilterBadRecords(grain.MapDataset.source(elements).to_iter_dataset(), policy)
  )
  passed = list(it)
  assert len(passed) == 4 and not any('truncated' in ex for ex in passed)
  assert (it.seen, it.bad, it.truncated, it.too_long_skipped) == (5, 0, 4, 1)
  assert [e['index'] for e in bad_records.read_quarantine(quarantine)] == [7]
  state = it.get_state()
  assert (state['truncated'], state['too_long_skipped']) == (4, 1)
  # A state saved before these counters (too_long among the bad kinds) still restores.
  old = dict(state, by_kind={**state['by_kind'], 'too_long': 2})
  del old['truncated'], old['too_long_skipped']
  it.set_state(old)
  assert it.truncated == 0 and 'too_long' not in it.by_kind
