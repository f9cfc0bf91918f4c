"""Metrics on hand-computed cases, the JSONL format, converters, the harness's bad-input policy."""

import base64
import io
import json
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from evejax.config import BenchmarkConfig, TrainConfig
from evejax.data import pipeline
from evejax.data.shapes import ShapesDataset
from evejax.data.tokenizer import train_bpe
from evejax.evaluation import converters, harness, metrics, submission
from evejax.evaluation.periodic import PeriodicBenchmark
from evejax.evaluation.records import read_jsonl, write_jsonl
from evejax.inference import SamplingConfig
from evejax.inference.assistant import Assistant
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from evejax.train.cadence import itstime


@pytest.mark.parametrize(
  'raw, normalized',
  [
    ('Two dogs.', '2 dogs'),
    ("The cat's toy", "cat 's toy"),
    ('yes!', 'yes'),
    ('3,000', '3000'),
    ('dont', "don't"),
    ('black-and-white', 'black and white'),
    ('left - right', 'left right'),
    ('1.5 meters', '1.5 meters'),
    ('An apple\n', 'apple'),
    ('none', '0'),
  ],
)
def test_vqa_normalization(raw, normalized):
  assert metrics.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_three_of_ten():
  two_yes = ['yes'] * 2 + ['no'] * 8
  # Leaving out one of the 2 "yes": 1 match -> 1/3 (2 subsets); leaving out a "no": 2/3 (8 subsets).
  assert metrics.vqa_score('Yes.', two_yes) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
  three_yes = ['yes'] * 3 + ['no'] * 7
  assert metrics.vqa_score('yes', three_yes) == pytest.approx((3 * 2 / 3 + 7) / 10)
  assert metrics.vqa_score('yes', ['yes'] * 4 + ['no'] * 6) == 1.0
  assert metrics.vqa_score('maybe', two_yes) == 0.0
  assert metrics.vqa_accuracy(['yes', 'no'], [three_yes, three_yes])['accuracy'] == pytest.approx(
    (0.9 + 1.0) / 2
  )


def test_exact_match_and_choice_parsing():
  assert metrics.exact_match(
    ['Red.', 'a blue square', 'green'], [['red.'], ['a blue square.'], ['red']]
  )['accuracy'] == pytest.approx(2 / 3)
  choices = ['red', 'blue', 'green']
  for text, letter in [
    ('B', 'B'),
    ('B.', 'B'),
    ('(C) green', 'C'),
    ('A. red', 'A'),
    ('The answer is C.', 'C'),
    ('blue', 'B'),
    ('D', None),
    ('purple', None),
  ]:
    assert metrics.parse_choice(text, choices) == letter, text
  out = metrics.multiple_choice(['B', 'purple', 'A'], [['B'], ['A'], ['C']], [choices] * 3)
  assert out == {'accuracy': pytest.approx(1 / 3), 'unparsed': pytest.approx(1 / 3)}


def test_circular_choice_needs_every_rotation_right():
  choices = [
    ['red', 'blue', 'green'],
    ['blue', 'green', 'red'],
    ['green', 'red', 'blue'],
    ['yes', 'no'],
    ['no', 'yes'],
  ]
  answers = [['A'], ['C'], ['B'], ['A'], ['B']]
  # Question 1: right in 2 of 3 rotations -> wrong; question 2: right in both -> right.
  out = metrics.multiple_choice(
    ['A', 'red', 'C', 'yes', 'B'], answers, choices, ['q1', 'q1', 'q1', 'q2', 'q2']
  )
  assert out['accuracy'] == pytest.approx(4 / 5) and out['circular_accuracy'] == 0.5
  assert 'circular_accuracy' not in metrics.multiple_choice(['A'], [['A']], [['x', 'y']])


def test_vqav2_submission_normalises_and_fills_test_std(tmp_path):
  records = [{'id': '101', 'answers': []}, {'id': '7', 'answers': []}]
  predictions = [{'id': '101', 'prediction': 'Two.'}, {'id': '7', 'prediction': 'a dog'}]
  questions = tmp_path / 'test2015.json'
  questions.write_text(json.dumps({'questions': [{'question_id': q} for q in (7, 101, 55)]}))
  path = str(tmp_path / 'sub.json')
  assert submission.write('vqav2', path, records, predictions, str(questions)) == 3
  assert json.load(open(path)) == [
    {'question_id': 101, 'answer': '2'},
    {'question_id': 7, 'answer': 'dog'},
    {'question_id': 55, 'answer': ''},
  ]
  with pytest.raises(ValueError, match="prediction '7' is not for record '101'"):
    submission.vqav2(records, predictions[::-1])


def test_pope_counts():
  preds = ['Yes, there is.', 'No.', 'There is not a dog.', 'yes', 'No, it is not.', 'Yes']
  labels = [['yes'], ['yes'], ['no'], ['no'], ['no'], ['yes']]
  # pred yes/yes: 0, 5 -> TP=2; yes/no: 3 -> FP=1; no/no: 2, 4 -> TN=2; no/yes: 1 -> FN=1.
  out = metrics.pope(preds, labels)
  precision, recall = 2 / 3, 2 / 3
  assert out == pytest.approx(
    {
      'accuracy': 4 / 6,
      'precision': precision,
      'recall': recall,
      'f1': 2 * precision * recall / (precision + recall),
      'yes_ratio': 3 / 6,
    }
  )


def test_mme_pair_scoring():
  preds = ['Yes', 'No', 'Yes', 'yes, it is', 'No', 'maybe', 'Yes', 'No']
  answers = [['Yes'], ['No'], ['Yes'], ['No'], ['No'], ['Yes'], ['Yes'], ['No']]
  tasks = ['color'] * 4 + ['OCR'] * 2 + ['code_reasoning'] * 2
  groups = ['c1', 'c1', 'c2', 'c2', 'o1', 'o1', 'k1', 'k1']
  out = metrics.mme(preds, answers, tasks, groups)
  # color: 3/4 questions right, 1/2 images fully right -> 75 + 50; OCR: 1/2, 0/1 -> 50;
  # code_reasoning: 2/2, 1/1 -> 200.
  assert out['color'] == pytest.approx(125) and out['OCR'] == pytest.approx(50)
  assert out['perception'] == pytest.approx(175) and out['cognition'] == pytest.approx(200)
  with pytest.raises(ValueError, match='Unknown MME subtasks'):
    metrics.mme(['yes'], [['yes']], ['colour'], ['x'])


def test_cider_orders_captions():
  refs = [
    ['a red circle on a dark background', 'a red circle'],
    ['two blue squares', 'a pair of blue squares'],
  ]
  perfect = metrics.cider(['a red circle', 'two blue squares'], refs)['cider']
  partial = metrics.cider(['a red square', 'two green squares'], refs)['cider']
  disjoint = metrics.cider(['xyz', 'qqq'], refs)['cider']
  assert perfect > partial > disjoint == 0.0
  assert metrics._caption_tokens('A Red, circle!') == 'a red circle'


def test_cider_without_the_eval_extra_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pycocoevalcap.cider.cider', None)  # As if not installed.
  with pytest.raises(ImportError, match=r"needs pycocoevalcap: pip install 'evejax\[eval\]'"):
    metrics.cider(['a red circle'], [['a red circle']])


def test_read_jsonl_resolves_images_and_names_bad_lines(tmp_path):
  path = tmp_path / 'bench.jsonl'
  good = {'id': 'a', 'question': 'q?', 'metric': 'exact', 'answers': ['x'], 'image': 'img/a.png'}
  path.write_text(json.dumps(good) + '\n\n' + json.dumps({**good, 'id': 'b', 'image': None}) + '\n')
  records = read_jsonl(str(path))
  assert records[0]['image'] == str(tmp_path / 'img' / 'a.png') and records[1]['image'] is None
  for bad, message in [
    ({**good, 'metric': 'bleu'}, 'unknown metric'),
    ({k: v for k, v in good.items() if k != 'answers'}, 'missing field'),
    ({**good, 'metric': 'choice'}, 'choices'),
    ({**good, 'history': [['q?']]}, 'question, answer'),
  ]:
    path.write_text(json.dumps(good) + '\n' + json.dumps({**bad, 'id': 'z'}) + '\n')
    with pytest.raises(ValueError, match=f'bench.jsonl:2: .*{message}'):
      read_jsonl(str(path))
  path.write_text(json.dumps(good) + '\n' + json.dumps(good) + '\n')
  with pytest.raises(ValueError, match='duplicate id'):
    read_jsonl(str(path))


def _png(color=(200, 30, 30), size=(32, 32)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, color).save(buffer, format='PNG')
  return buffer.getvalue()


def test_converters(tmp_path):
  def dump(name, data):
    (tmp_path / name).write_text(json.dumps(data))
    return str(tmp_path / name)

  vqa = list(
    converters.vqav2(
      dump(
        'q.json',
        {
          'data_subtype': 'val2014',
          'questions': [{'image_id': 42, 'question': 'What?', 'question_id': 420}],
        },
      ),
      'coco',
      dump(
        'a.json',
        {
          'annotations': [
            {'question_id': 420, 'answer_type': 'other', 'answers': [{'answer': 'cat'}] * 10}
          ]
        },
      ),
    )
  )
  assert vqa[0]['image'].endswith('coco/COCO_val2014_000000000042.jpg')
  assert vqa[0]['answers'] == ['cat'] * 10 and vqa[0]['prompt'].endswith(converters.SHORT_ANSWER)

  gqa = list(
    converters.gqa(
      dump('g.json', {'201': {'imageId': 'n1', 'question': 'Is it?', 'answer': 'no'}}), 'gqa'
    )
  )
  assert (gqa[0]['id'], gqa[0]['answers'], gqa[0]['metric']) == ('201', ['no'], 'exact')

  tvqa = list(
    converters.textvqa(
      dump(
        't.json',
        {
          'data': [
            {'question_id': 7, 'image_id': 'abc', 'question': 'Brand?', 'answers': ['nike'] * 10}
          ]
        },
      ),
      'tv',
    )
  )
  assert tvqa[0]['image'].endswith('tv/abc.jpg') and tvqa[0]['metric'] == 'vqa'

  sqa = list(
    converters.scienceqa_img(
      dump(
        'p.json',
        {
          '1': {
            'question': 'Which is north?',
            'choices': ['WV', 'LA'],
            'answer': 1,
            'hint': 'A map.',
            'image': 'image.png',
            'split': 'test',
            'subject': 'social science',
          },
          '2': {
            'question': 'Text only?',
            'choices': ['a', 'b'],
            'answer': 0,
            'hint': '',
            'image': None,
            'split': 'test',
          },
          '3': {
            'question': 'Train?',
            'choices': ['a', 'b'],
            'answer': 0,
            'image': 'image.png',
            'split': 'train',
          },
        },
      ),
      'sqa',
    )
  )
  assert len(sqa) == 1 and sqa[0]['answers'] == ['B']
  assert sqa[0]['image'].endswith('sqa/test/1/image.png')
  assert sqa[0]['prompt'] == (
    'Context: A map.\nWhich is north?\nA. WV\nB. LA\n'
    "Answer with the option's letter from the given choices directly."
  )

  (tmp_path / 'coco_pope_adversarial.json').write_text(
    json.dumps({'question_id': 1, 'image': 'x.jpg', 'text': 'Is there a dog?', 'label': 'no'})
    + '\n'
  )
  pope = list(converters.pope(str(tmp_path / 'coco_pope_adversarial.json'), 'coco'))
  assert pope[0]['category'] == 'adversarial' and pope[0]['answers'] == ['no']

  for task, nested in (('color', False), ('OCR', True)):
    qa = tmp_path / 'mme' / task / ('questions_answers_YN' if nested else '')
    images = tmp_path / 'mme' / task / ('images' if nested else '')
    qa.mkdir(parents=True, exist_ok=True), images.mkdir(parents=True, exist_ok=True)
    (images / 'im1.png').write_bytes(_png())
    (qa / 'im1.txt').write_text(
      'Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n'
    )
  mme = list(converters.mme(str(tmp_path / 'mme')))
  assert [(r['category'], r['group'], r['answers']) for r in mme] == [
    ('OCR', 'OCR/im1', ['Yes']),
    ('OCR', 'OCR/im1', ['No']),
    ('color', 'color/im1', ['Yes']),
    ('color', 'color/im1', ['No']),
  ]

  image = base64.b64encode(_png()).decode()
  (tmp_path / 'mmb.tsv').write_text(
    'index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n'
    f'5\tWhat colour?\tnan\tred\tblue\tnan\t\tA\tcolor\t{image}\n'
  )
  mmb = list(converters.mmbench(str(tmp_path / 'mmb.tsv'), str(tmp_path / 'mmb_images')))
  # Circular: one item per rotation of the 2 options; the right letter follows its option.
  assert [(r['id'], r['choices'], r['answers'], r['group']) for r in mmb] == [
    ('5', ['red', 'blue'], ['A'], '5'),
    ('5-r1', ['blue', 'red'], ['B'], '5'),
  ]
  assert 'A. blue\nB. red' in mmb[1]['prompt']
  with open(mmb[0]['image'], 'rb') as f:
    assert f.read() == _png()
  single = list(
    converters.mmbench(str(tmp_path / 'mmb.tsv'), str(tmp_path / 'mmb_images'), circular=False)
  )
  assert len(single) == 1 and 'group' not in single[0]
  write_jsonl(str(tmp_path / 'all.jsonl'), vqa + gqa + tvqa + sqa + pope + mme + mmb)
  assert len(read_jsonl(str(tmp_path / 'all.jsonl'))) == 11


def test_shapes_converter_keeps_questions_and_answers(tmp_path):
  source = ShapesDataset(4, seed=5, turns=2)
  records = list(converters.shapes(source, str(tmp_path / 'images')))
  assert len(records) == 8
  for record, (index, turn) in zip(records, [(i, t) for i in range(4) for t in range(2)]):
    original = source[index]
    human, gpt = original['conversations'][2 * turn : 2 * turn + 2]
    assert record['id'] == f'{original["id"]}-{turn}'
    assert record['question'] == human['value'].replace('<image>\n', '')
    assert record['answers'] == [gpt['value']]
    with open(record['image'], 'rb') as f:
      assert f.read() == original['image']
    assert record['category'] in ('caption', 'color', 'shape', 'count', 'top')
  with_history = list(converters.shapes(source, str(tmp_path / 'images'), history=True))
  assert [r['history'] for r in with_history[:2]] == [
    [],
    [[records[0]['question'], records[0]['answers'][0]]],
  ]
  assert [{k: v for k, v in r.items() if k != 'history'} for r in with_history] == records


@pytest.fixture(scope='module')
def tiny_run():
  """(config, graphdef, params, tokenizer) of an untrained one-layer demo model."""
  from configs.demo import get_config

  config = get_config()
  config.model = dict(
    model_preset('eve_v2_tiny'), num_layers=1, hidden_size=64, intermediate_size=128
  )
  config.data.seq_len = 64
  tokenizer = train_bpe(ShapesDataset(1, 0).corpus(), pipeline.DEMO_TOKENIZER_VOCAB)
  graphdef, params = nnx.split(
    EVE(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(0)), nnx.Param
  )
  return config, graphdef, nnx.to_pure_dict(params), tokenizer


@pytest.fixture(scope='module')
def tiny_assistant(tiny_run):
  return Assistant.from_params(*tiny_run)


def test_harness_records_bad_items_and_continues(tiny_assistant, tmp_path):
  (tmp_path / 'ok.png').write_bytes(_png())
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n not really')
  base = {'metric': 'exact', 'answers': ['red.']}
  records = [
    {
      **base,
      'id': 'ok',
      'question': 'what color is the square?',
      'image': str(tmp_path / 'ok.png'),
    },
    {**base, 'id': 'missing', 'question': 'what?', 'image': str(tmp_path / 'nope.png')},
    {**base, 'id': 'broken', 'question': 'what?', 'image': str(tmp_path / 'broken.png')},
    {**base, 'id': 'long', 'question': 'what is ' * 60, 'image': None},
    {**base, 'id': 'text', 'question': 'describe the image.', 'image': None},
  ]
  results = harness.run(
    tiny_assistant, records, SamplingConfig(max_new_tokens=3), str(tmp_path / 'out'), batch_size=4
  )
  with open(tmp_path / 'out' / 'predictions.jsonl') as f:
    predictions = {p['id']: p for p in map(json.loads, f)}
  assert 'error' not in predictions['ok'] and 'error' not in predictions['text']
  assert 'FileNotFoundError' in predictions['missing']['error']
  assert 'undecodable image' in predictions['broken']['error']
  assert 'max_length' in predictions['long']['error']
  assert results['items'] == 5 and results['failed'] == 3
  # The failures count as wrong answers: the score's denominator is the whole benchmark.
  scored = [metrics.exact_score(predictions[r['id']]['prediction'], r['answers']) for r in records]
  assert results['exact/accuracy'] == pytest.approx(np.mean(scored))
  with open(tmp_path / 'out' / 'metrics.json') as f:
    assert json.load(f) == results
  # The results table names the run by its folder; no categories here, so no chart.
  assert '| out | exact/accuracy |' in (tmp_path / 'out' / 'results.md').read_text()
  assert (tmp_path / 'out' / 'results.csv').exists()
  assert not (tmp_path / 'out' / 'categories.png').exists()


def test_assistant_answers_match_generator_tokens(tiny_assistant):
  prompt = tiny_assistant.encode('what color is the square?', _png())
  sampling = SamplingConfig(max_new_tokens=4, stop_tokens=(tiny_assistant.tokenizer.eos_id,))
  tokens = tiny_assistant.generator.generate([prompt], sampling)[0]
  decoded = tiny_assistant.tokenizer.decode(tokens).strip()
  assert tiny_assistant.answer([prompt], sampling) == [decoded]
  assert tiny_assistant.stop_tokens == (tiny_assistant.tokenizer.eos_id,)
  # The prompt is the training template up to the answer: 'USER: <image>\n... ASSISTANT:'.
  text_ids = [t for t, k in zip(prompt['tokens'], prompt['token_kind']) if k == 0]
  assert tiny_assistant.tokenizer.decode(text_ids).endswith('what color is the square? ASSISTANT:')


def test_harness_asks_after_the_history(tiny_assistant, tmp_path):
  (tmp_path / 'ok.png').write_bytes(_png())
  history = [['what color is the square?', 'red.']]
  record = {
    'id': 'follow-up',
    'question': 'how many shapes are there?',
    'metric': 'exact',
    'answers': ['one.'],
    'image': str(tmp_path / 'ok.png'),
    'history': history,
  }
  sampling = SamplingConfig(max_new_tokens=4)
  prompt = tiny_assistant.encode(record['question'], _png(), history=history)
  assert len(prompt['tokens']) > len(tiny_assistant.encode(record['question'], _png())['tokens'])
  [prediction] = harness.predict(tiny_assistant, [record], sampling)
  assert prediction == {
    'id': 'follow-up',
    'prediction': tiny_assistant.answer([prompt], sampling)[0],
  }
  # A history that fills the context fails that item (proof that the history is in the prompt).
  long = {**record, 'id': 'long', 'history': [['what is ' * 60, 'red.']]}
  _, failed = harness.predict(tiny_assistant, [record, long], sampling)
  assert 'max_length' in failed['error']


def test_periodic_benchmark_scores_the_current_params(tiny_run, tiny_assistant, tmp_path):
  config, graphdef, params, tokenizer = tiny_run
  records = list(converters.shapes(ShapesDataset(3, seed=9), str(tmp_path / 'images')))
  write_jsonl(str(tmp_path / 'bench.jsonl'), records)
  bench_cfg = BenchmarkConfig(
    file=str(tmp_path / 'bench.jsonl'), every=50, limit=2, batch_size=2, max_new_tokens=3
  )
  periodic = PeriodicBenchmark(bench_cfg, TrainConfig.parse(config), graphdef, params, tokenizer)
  # The trainer runs it when due: every `every` steps and at the last one.
  assert [itstime(s, bench_cfg.every, 120) for s in (49, 50, 100, 119, 120)] == [
    False,
    True,
    True,
    False,
    True,
  ]
  sampling = SamplingConfig(max_new_tokens=3)
  expected = harness.score(records[:2], harness.predict(tiny_assistant, records[:2], sampling))
  assert periodic(params) == {f'bench/{k}': v for k, v in expected.items()}
  # Later calls reuse the compiled generator with the parameters they are given.
  compiled = periodic.assistant.generator
  changed = dict(params, norm={'scale': params['norm']['scale'] * 2})
  periodic(changed)
  assert periodic.assistant.generator is compiled and compiled.params is changed


def test_scanned_model_generates_with_unrolled_layers(tiny_run):
  """A `model.scan_layers` run: its stacked parameters answer through the unrolled cached path,
  and the first answer token is the scanned training forward's argmax at the prompt's end."""
  import jax

  from evejax.data import encode

  config, _, _, tokenizer = tiny_run
  config = config.copy_and_resolve_references()
  config.model.scan_layers = True
  config.model.num_layers = 2
  scanned = EVE(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(scanned, nnx.Param)
  assistant = Assistant.from_params(config, graphdef, nnx.to_pure_dict(params), tokenizer)
  prompt = assistant.encode('what color is the square?', _png())
  first = assistant.generator.generate([prompt], SamplingConfig(max_new_tokens=1))[0][0]
  preprocess = assistant.preprocess
  row = encode.pack_row([prompt], preprocess.spec)
  logits = scanned({k: jax.numpy.asarray(v[None]) for k, v in row.items()})
  assert first == int(np.argmax(logits[0, len(prompt['tokens']) - 1]))


def test_streaming_predictions_match_one_item_at_a_time(tiny_assistant, tmp_path):
  """Windows of encoded items, batches of similar length: the same answers as asking each item on
  its own, in the records' order (test_eval_streaming.py: the memory bound and progress lines)."""
  questions = ['what color is the square?', 'describe the image.', 'what shape is it?']
  records = []
  for i in range(5):
    path = tmp_path / f'{i}.png'
    path.write_bytes(_png((60 * i, 200 - 40 * i, 90)))
    records.append(
      {
        'id': str(i),
        'question': questions[i % 3] + ' now' * (i % 2),  # Lengths differ: sorted in a window.
        'metric': 'exact',
        'answers': ['red.'],
        'image': str(path) if i != 3 else None,
      }
    )
  sampling = SamplingConfig(max_new_tokens=4)
  streamed = harness.predict(tiny_assistant, records, sampling, batch_size=2)
  alone = [
    tiny_assistant.answer([tiny_assistant.encode(r['question'], harness._load_image(r))], sampling)[
      0
    ]
    for r in records
  ]
  assert [p['id'] for p in streamed] == [r['id'] for r in records]
  assert [p['prediction'] for p in streamed] == alone
