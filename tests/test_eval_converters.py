"""The EVEv2-table converters on small files in their releases' layouts, scored end to end."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from evejax.evaluation import converters_v2, harness, metrics
from evejax.evaluation.records import read_jsonl, write_jsonl


def _png(color=(200, 30, 30)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', (8, 8), color).save(buffer, format='PNG')
  return buffer.getvalue()


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
