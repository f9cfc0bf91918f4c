"""The EVEv2-table metrics on hand-computed cases, their converters on small files in the
releases' layouts, the submission files, and the results tables and chart."""

import io
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evejax.evaluation import converters_v2, harness, metrics, mmmu, submission, tables
from evejax.evaluation.records import read_jsonl, write_jsonl


def _png(color=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', (8, 8), color).save(buffer, format='PNG')
  return buffer.getvalue()


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


def _parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def test_converters_v2_and_scores(tmp_path):
  def dump(name, data):
    (tmp_path / name).write_text(json.dumps(data))
    return str(tmp_path / name)

  image = {'bytes': _png(), 'path': None}
  vizwiz = list(
    converters_v2.vizwiz(
      dump(
        'val.json',
        [
          {
            'image': 'VizWiz_val_00000001.jpg',
            'question': 'What is this?',
            'answers': [{'answer': 'unanswerable', 'answer_confidence': 'yes'}] * 10,
            'answer_type': 'unanswerable',
          }
        ],
      ),
      'vz',
    )
  )
  assert vizwiz[0]['id'] == 'VizWiz_val_00000001.jpg' and vizwiz[0]['image'].endswith(
    'vz/' + vizwiz[0]['id']
  )
  assert "respond with 'Unanswerable'" in vizwiz[0]['prompt']

  seed = list(
    converters_v2.seed_bench(
      dump(
        'seed.json',
        {
          'question_type': {'Scene Understanding': 1, 'Instance Counting': 5},
          'questions': [
            {
              'question_id': '101',
              'data_id': '1_2.jpg',
              'data_type': 'image',
              'question': 'How many?',
              **{f'choice_{x}': x for x in 'abcd'},
              'answer': 'C',
              'question_type_id': 5,
            },
            {'question_id': '9', 'data_type': 'video', 'question_type_id': 10},
          ],
        },
      ),
      'seed',
    )
  )
  assert len(seed) == 1 and seed[0]['category'] == 'Instance Counting'
  assert seed[0]['choices'] == list('abcd') and seed[0]['answers'] == ['C']

  (tmp_path / 'MMMU' / 'Art').mkdir(parents=True)
  _parquet(
    tmp_path / 'MMMU' / 'Art' / 'validation-00000-of-00001.parquet',
    [
      {
        'id': 'validation_Art_Theory_1',
        'question': 'Which style? <image 1>',
        'options': "['Baroque', 'Gothic']",
        'answer': 'B',
        'question_type': 'multiple-choice',
        'image_1': image,
      },
      {
        'id': 'validation_Art_Theory_2',
        'question': 'Year?',
        'options': '[]',
        'answer': "['1500', '1501']",
        'question_type': 'open',
        'image_1': image,
      },
    ],
  )
  mmmu_records = list(converters_v2.mmmu(str(tmp_path / 'MMMU'), str(tmp_path / 'mmmu_img')))
  assert mmmu_records[0]['prompt'] == (
    "Which style? <image 1>\n(A) Baroque\n(B) Gothic\n\nAnswer with the option's letter from the "
    'given choices directly.'
  )
  assert [r['answers'] for r in mmmu_records] == [['B'], ['1500', '1501']]
  assert mmmu_records[1]['choices'] == [] and mmmu_records[0]['category'] == 'Art_Theory'
  with open(mmmu_records[0]['image'], 'rb') as f:
    assert f.read() == _png()

  (tmp_path / 'chartqa').mkdir()
  (tmp_path / 'chartqa' / 'test_human.json').write_text(
    json.dumps([{'imgname': 'a.png', 'query': 'Max?', 'label': 12}])
  )
  (tmp_path / 'chartqa' / 'test_augmented.json').write_text(
    json.dumps([{'imgname': 'b.png', 'query': 'Min?', 'label': 'Asia'}])
  )
  chart = list(converters_v2.chartqa(str(tmp_path / 'chartqa')))
  assert [(r['category'], r['answers']) for r in chart] == [
    ('human', ['12']),
    ('augmented', ['Asia']),
  ]
  assert chart[0]['image'] == str(tmp_path / 'chartqa' / 'png' / 'a.png')

  ai2d = list(
    converters_v2.ai2d(
      _parquet(
        tmp_path / 'ai2d.parquet',
        [
          {
            'question': 'Which eats?',
            'options': ['sun', 'frog', 'fly'],
            'answer': '1',
            'image': image,
          }
        ],
      ),
      str(tmp_path / 'ai2d_img'),
    )
  )
  assert ai2d[0]['answers'] == ['B'] and ai2d[0]['choices'] == ['sun', 'frog', 'fly']

  rwqa = list(
    converters_v2.realworldqa(
      _parquet(
        tmp_path / 'rwqa.parquet',
        [
          {
            'question': 'Where is the car?\nA. left\nB. right\nPlease answer with the letter.',
            'answer': 'B',
            'image': image,
          },
          {'question': 'How many lanes? Answer with a number.', 'answer': '3', 'image': image},
        ],
      ),
      str(tmp_path / 'rwqa_img'),
    )
  )
  assert [(r['metric'], r.get('choices')) for r in rwqa] == [
    ('choice', ['left', 'right']),
    ('exact', None),
  ]

  ocr = list(
    converters_v2.ocrbench(
      dump(
        'OCRBench.json',
        [
          {
            'dataset_name': 'IIIT5K',
            'id': 0,
            'image_path': 'IIIT5K/1.png',
            'question': 'what is written in the image?',
            'answers': 'STOP',
            'type': 'Regular Text Recognition',
          },
          {
            'dataset_name': 'HME100k',
            'id': 1,
            'image_path': 'HME100k/2.jpg',
            'question': 'Write out the formula in the image in LaTeX.',
            'answers': ['x^{2}'],
            'type': metrics.OCRBENCH_HME,
          },
        ],
      ),
      'OCRBench_Images',
    )
  )
  assert ocr[0]['answers'] == ['STOP'] and ocr[1]['image'].endswith('OCRBench_Images/HME100k/2.jpg')

  mmvet = list(
    converters_v2.mmvet(
      dump(
        'mm-vet.json',
        {
          'v1_0': {
            'imagename': 'v1_0.png',
            'question': 'What?',
            'answer': 'x',
            'capability': ['ocr', 'math'],
          }
        },
      ),
      'mmvet',
    )
  )
  assert mmvet[0]['metric'] == 'judge'

  records = vizwiz + seed + mmmu_records + chart + ai2d + rwqa + ocr + mmvet
  write_jsonl(str(tmp_path / 'all.jsonl'), records)
  assert len(read_jsonl(str(tmp_path / 'all.jsonl'))) == len(records) == 12

  answers = {
    'VizWiz_val_00000001.jpg': 'Unanswerable',
    '101': 'C',
    'validation_Art_Theory_1': '(A)',  # wrong
    'validation_Art_Theory_2': 'It was made in 1501.',
    'human-0': '12.3',
    'augmented-0': 'asia',
    'ai2d-0': 'B',
    'realworldqa-0': 'B.',
    'realworldqa-1': 'three',  # wrong: exact match
    '0': 'The word is stop.',
    '1': 'x ^ {2}',
    'v1_0': 'ignored',
  }
  predictions = [{'id': r['id'], 'prediction': answers[r['id']]} for r in records]
  scores = harness.score(records, predictions)
  assert scores['judge'] == 1 and scores['mmmu/accuracy'] == 0.5
  assert scores['vqa/accuracy'] == 1.0 and scores['relaxed/accuracy'] == 1.0
  assert scores['ocrbench/score'] == 2 and scores['exact/accuracy'] == 0.0
  assert scores['choice/accuracy'] == 1.0  # SEED, AI2D and the RealWorldQA letter question


def test_ids_of_ai2d_and_realworldqa_are_prefixed(tmp_path):
  """Item ids name their benchmark, so predictions of several benchmarks can be told apart."""
  image = {'bytes': _png(), 'path': None}
  path = _parquet(
    tmp_path / 'x.parquet',
    [{'question': 'q', 'options': ['a', 'b'], 'answer': '0', 'image': image}],
  )
  assert next(converters_v2.ai2d(path, str(tmp_path / 'i')))['id'] == 'ai2d-0'


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
