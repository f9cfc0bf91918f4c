"""The EVEv2-table metrics on hand-computed cases, the submission files, and the results tables and
chart."""

import json
import sys

import pytest

from evejax.evaluation import harness, metrics, mmmu, submission, tables


def test_vizwiz_unanswerable_is_vqa_accuracy():
  four = ['unanswerable'] * 4 + ['a dog'] * 6
  assert metrics.vqa_score('Unanswerable.', four) == 1.0  # >= 3 matches in every 9-subset.
  two = ['unanswerable'] * 2 + ['dog'] * 8
  # Leaving out one of the 2: 1 match -> 1/3 (2 subsets); leaving out a "dog": 2/3 (8 subsets).
  assert metrics.vqa_score('unanswerable', two) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
  assert metrics.vqa_score('Dog', two) == 1.0


@pytest.mark.parametrize(
  'prediction, answer, right',
  [
    ('12.4', '12', True),  # 0.4 / 12 = 3.3%
    ('12.7', '12', False),  # 5.8%
    (' 57 ', '60', True),  # 5% exactly, prediction stripped
    ('50%', '0.5', True),  # percentages are fractions
    ('0.12', '12%', True),
    ('12', '12%', False),  # ... on both sides: 12 is not 0.12
    ('0.0', '0', False),  # a zero answer is compared as text (pix2struct's `if target_float`)
    ('Yes', 'yes', True),
    ('Asia', 'Europe', False),
    ('12', 'twelve', False),
  ],
)
def test_chartqa_relaxed_accuracy(prediction, answer, right):
  assert metrics.relaxed_score(prediction, [answer]) == float(right)


def test_chartqa_accuracy_averages_items():
  out = metrics.relaxed_accuracy(['12.4', 'b', '3'], [['12'], ['B'], ['4']])
  assert out == {'accuracy': pytest.approx(2 / 3)}


def test_ocrbench_substring_rules():
  hme = metrics.OCRBENCH_HME
  cases = [
    ('The sign says STOP here', ['stop'], 'Regular Text Recognition', 1),
    ('sto p', ['stop'], 'Regular Text Recognition', 0),  # spaces matter outside formulas
    ('x ^ { 2 } + 1', ['x^{2}+1'], hme, 1),  # formulas: every space removed
    ('X^{2}+1', ['x^{2}+1'], hme, 0),  # ... and case kept, as the official scorer does
    ('line one\nline two', ['one line'], 'Doc-oriented VQA', 1),
    ('nothing', ['a', 'thin'], 'Scene Text-centric VQA', 1),  # any answer
  ]
  for prediction, answers, category, right in cases:
    assert metrics.ocrbench_score(prediction, answers, category) == right, prediction
  out = metrics.ocrbench(*zip(*[c[:3] for c in cases]))
  assert out == {'score': 4, 'accuracy': pytest.approx(4 / 6), 'text_recognition': 1}


@pytest.mark.parametrize(
  'response, letter',
  [
    ('B', 'B'),
    ('(C) because of the shadow', 'C'),
    ('The answer is D.', 'D'),
    ('B.', 'B'),  # trailing punctuation stripped
    ('(B).', 'B'),
    ('A or B? I would say B', 'B'),  # several letters: the last one named
    ('(A) is wrong, (B) is right', 'B'),  # brackets: the last bracketed
    ('I think it shows a beautiful red apple on the table', 'A'),  # > 5 words: an option's text
    ('Neither red apple nor the green pear is in this image', 'B'),  # the text named last
  ],
)
def test_mmmu_choice_parsing(response, letter):
  assert mmmu.parse_choice(response, 'ABCD', ['red apple', 'green pear', 'cat', 'dog'], 'x') == (
    letter
  )


def test_mmmu_unparsable_choice_is_a_seeded_random_letter():
  picks = {mmmu.parse_choice('no idea', 'ABCD', ['1', '2', '3', '4'], f'id{i}') for i in range(40)}
  assert picks == set('ABCD')
  assert mmmu.parse_choice('hmm', 'ABCD', list('wxyz'), 'id7') == mmmu.parse_choice(
    'hmm', 'ABCD', list('wxyz'), 'id7'
  )


def test_mmmu_open_answers():
  assert mmmu.parse_open('The answer is 3.50') == [3.5]
  # A number glued to a word is no number (the official `\d+\b`): only the text can match.
  assert mmmu.parse_open('the mass is 12kg') == ['12kg']
  assert not mmmu.open_correct('the mass is 12kg', ['12'])
  assert mmmu.open_correct('the mass is 12 kg', ['12'])
  assert mmmu.open_correct('so the total is 12,000 dollars.', ['12000'])
  assert mmmu.open_correct('x = 2.004', ['2'])  # numbers round to 2 decimals
  assert not mmmu.open_correct('x = 2.006', ['2'])
  assert mmmu.open_correct('The capital is Paris', ['paris'])
  assert not mmmu.open_correct('The capital is Rome', ['paris'])
  # One-letter answers need a space beside them in the candidate: not inside a word.
  assert mmmu.normalize('C') == [' c', 'c ']
  assert mmmu.open_correct('so it is c', ['C']) and not mmmu.open_correct('abc', ['C'])
  assert mmmu.gold_answers("['1/2', '0.5']") == ['1/2', '0.5']
  assert mmmu.gold_answers('[1, 2] is a list') == ['[1, 2] is a list']
  out = mmmu.score(
    ['(B)', 'it is 7', 'A'],
    [['B'], ['7'], ['B']],
    [['x', 'y'], [], ['x', 'y']],
    ['v_Art_1', 'v_Math_2', 'v_Art_3'],
  )
  assert out == {'accuracy': pytest.approx(2 / 3)}


def test_per_category_scores_as_the_official_scorers_report_them():
  """OCRBench: right answers counted per type (its official table); SEED-Bench: accuracy per
  question type; VizWiz: VQA accuracy per answer type; every headline over all items."""

  def item(i, metric, category, answers, choices=None):
    return {'id': str(i), 'metric': metric, 'category': category, 'answers': answers} | (
      {'choices': choices} if choices else {}
    )

  regular, kie = 'Regular Text Recognition', 'Key Information Extraction'
  unanswerable = ['unanswerable'] * 10
  cases = [  # (record, prediction)
    (item(0, 'ocrbench', regular, ['stop']), 'STOP'),
    (item(1, 'ocrbench', regular, ['exit']), 'EXIT 3'),
    (item(2, 'ocrbench', regular, ['go']), 'no'),
    (item(3, 'ocrbench', kie, ['$12.00']), 'total: $12.00'),
    (item(4, 'choice', 'Scene Understanding', ['B'], ['cat', 'dog']), '(B) dog'),
    (item(5, 'choice', 'Scene Understanding', ['A'], ['cat', 'dog']), 'dog'),
    (item(6, 'choice', 'Instance Counting', ['A'], ['2', '3']), 'A'),
    (item(7, 'vqa', 'unanswerable', unanswerable), 'Unanswerable'),
    (item(8, 'vqa', 'unanswerable', unanswerable), 'a can'),
    (item(9, 'vqa', 'other', ['soup'] * 2 + ['can'] * 8), 'soup'),  # 0.6 = (2 * 1/3 + 8 * 2/3) / 10
  ]
  records = [r for r, _ in cases]
  predictions = [{'id': r['id'], 'prediction': p} for r, p in cases]
  scores = harness.score(records, predictions)
  assert scores['ocrbench/score'] == 3 and scores['ocrbench/text_recognition'] == 2
  assert scores[f'ocrbench/{regular}/score'] == 2 and scores[f'ocrbench/{kie}/score'] == 1
  assert scores['choice/accuracy'] == pytest.approx(2 / 3)
  assert scores['choice/Scene Understanding/accuracy'] == 0.5
  assert scores['choice/Instance Counting/accuracy'] == 1.0
  assert scores['vqa/unanswerable/accuracy'] == 0.5
  assert scores['vqa/other/accuracy'] == pytest.approx(0.6)
  assert scores['vqa/accuracy'] == pytest.approx(1.6 / 3)
  by_category = tables.categories(scores)
  assert by_category['ocrbench'] == {regular: 2, kie: 1}
  assert by_category['choice'] == {'Scene Understanding': 0.5, 'Instance Counting': 1.0}


def test_submissions_for_vizwiz_and_mmvet(tmp_path):
  records = [{'id': 'VizWiz_test_00000000.jpg'}, {'id': 'VizWiz_test_00000001.jpg'}]
  predictions = [
    {'id': 'VizWiz_test_00000000.jpg', 'prediction': 'Unanswerable.'},
    {'id': 'VizWiz_test_00000001.jpg', 'prediction': 'Two cans'},
  ]
  path = str(tmp_path / 'vizwiz.json')
  assert submission.write('vizwiz', path, records, predictions) == 2
  assert json.load(open(path)) == [
    {'image': 'VizWiz_test_00000000.jpg', 'answer': 'unanswerable'},
    {'image': 'VizWiz_test_00000001.jpg', 'answer': '2 cans'},
  ]
  path = str(tmp_path / 'mmvet.json')
  submission.write('mmvet', path, [{'id': 'v1_0'}], [{'id': 'v1_0', 'prediction': 'A cat, 3.'}])
  assert json.load(open(path)) == {'v1_0': 'A cat, 3.'}


RESULTS = {
  'items': 6.0,
  'failed': 1.0,
  'unlabelled': 0.0,
  'choice/accuracy': 0.5,
  'choice/unparsed': 0.0,
  'choice/Scene/accuracy': 0.25,
  'choice/Scene/unparsed': 0.0,
  'choice/Count/accuracy': 0.75,
  'choice/Count/unparsed': 0.0,
  'mme/perception': 150.0,
  'mme/cognition': 50.0,
  'mme/OCR': 150.0,
  'mme/code_reasoning': 50.0,
}


def test_results_tables_and_chart(tmp_path):
  assert tables.headlines(RESULTS) == {'choice': ('accuracy', 0.5), 'mme': ('total', 200.0)}
  assert tables.categories(RESULTS) == {
    'choice': {'Scene': 0.25, 'Count': 0.75},
    'mme': {'OCR': 150.0, 'code_reasoning': 50.0},
  }
  runs = {
    'seed': RESULTS,
    'mmb': {'items': 2.0, 'failed': 0.0, 'choice/accuracy': 1.0, 'choice/circular_accuracy': 0.5},
  }
  assert tables.write(runs, str(tmp_path))
  md = (tmp_path / 'results.md').read_text()
  assert (
    '| seed | choice/accuracy | 50.0 | 6 | 1 |' in md and '| seed | mme/total | 200 | 6 | 1 |' in md
  )
  assert '| mmb | choice/circular_accuracy | 50.0 | 2 | 0 |' in md and '| Count | 75.0 |' in md
  rows = (tmp_path / 'results.csv').read_text().splitlines()
  assert (
    rows[0] == 'benchmark,metric,category,name,value' and 'seed,choice,Scene,accuracy,0.25' in rows
  )
  assert (tmp_path / 'categories.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_chart_without_matplotlib_says_so(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # As if the plots extra were missing.
  assert not tables.write({'seed': RESULTS}, str(tmp_path))
  assert (tmp_path / 'results.md').exists() and not (tmp_path / 'categories.png').exists()
  assert "needs matplotlib (pip install 'evejax[plots]')" in caplog.text
