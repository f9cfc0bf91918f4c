"""Text-only shapes data, the held-out text-only loss (eval_text/*) from step 0, and W&B logging."""

import dataclasses
import glob
import os

import pytest

from configs import demo
from evejax.config import ConfigError, DataConfig, TrainConfig
from evejax.data import pipeline, shapes
from evejax.metrics.wandb_writer import run_id
from evejax.metrics.writers import read_jsonl
from evejax.train.trainer import train


def test_text_only_records_carry_the_same_scenes_as_text():
  kw = dict(turns=3, min_cells=1, max_cells=3)
  with_images = shapes.ShapesDataset(6, 3, **kw)
  as_text = shapes.ShapesDataset(6, 3, text_only=True, **kw)
  assert as_text.corpus() == with_images.corpus()  # The same tokenizer for both.
  for index in range(6):
    image_record, text_record = with_images[index], as_text[index]
    assert 'image' not in text_record and image_record['image']
    _, scene, _ = with_images.scene(index)
    named = [f'a {s.color} {s.kind}' for s in scene]
    said = ' and '.join([', '.join(named[:-1]), named[-1]] if len(named) > 1 else named) + '.'
    assert text_record['conversations'][0]['value'].split('\n')[0] == said
    assert image_record['conversations'][0]['value'].startswith('<image>\n')
    assert [t['value'].split('\n')[-1] for t in text_record['conversations']] == [
      t['value'].split('\n')[-1] for t in image_record['conversations']
    ]


def test_text_eval_split_is_checked():
  with pytest.raises(
    ValueError, match="the shapes source has one text-only held-out split, 'text'"
  ):
    DataConfig(text_eval_split='eval')
  with pytest.raises(ValueError, match='needs data.source'):
    DataConfig(source='tfds', text_eval_split='text')
  with pytest.raises(ValueError, match=r"has no such split .*set data.text_eval_split=''"):
    pipeline.text_eval_source(
      DataConfig(source='records', path='/nonexistent', text_eval_split='t')
    )
  with pytest.raises(ConfigError, match='metrics.wandb.mode'):
    TrainConfig.parse({'metrics': {'wandb': {'mode': 'sometimes'}}})


def _tiny(tmp_path, **data):
  config = demo.get_config()
  config.model.num_layers = 1
  config.data.update(num_train=64, num_eval=8, cache_dir=str(tmp_path / 'cache'), **data)
  config.update(total_steps=1, eval_every=1, eval_at_start=True)
  return config


def test_text_only_loss_from_step_zero_equals_a_text_only_runs_loss(tmp_path, monkeypatch):
  """eval_text/* of an image run at step 0 is what a run trained on the text-only data reports
  as its held-out eval/* at step 0 (the same initial weights, scenes and tokenizer): the
  text-only path is the ordinary evaluation, on the scenes as text. The first run also logs to
  W&B, offline."""
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = _tiny(tmp_path, text_eval_split='text')
  config.metrics.wandb.update(project='evejax-test', mode='offline')
  train(config, str(tmp_path / 'image'))
  text_config = _tiny(tmp_path)
  text_config.data.shapes.text_only = True
  train(text_config, str(tmp_path / 'text'))

  image_run = read_jsonl(str(tmp_path / 'image' / 'metrics.jsonl'))
  text_run = read_jsonl(str(tmp_path / 'text' / 'metrics.jsonl'))
  at_start = {k: v for r in image_run if r['step'] == 0 for k, v in r.items()}
  text_at_start = {k: v for r in text_run if r['step'] == 0 for k, v in r.items()}
  assert {'eval/loss', 'eval_text/loss', 'eval_text/accuracy'} <= set(at_start)
  assert at_start['eval_text/loss'] == pytest.approx(text_at_start['eval/loss'], rel=1e-6)
  assert at_start['eval_text/accuracy'] == pytest.approx(text_at_start['eval/accuracy'])
  assert at_start['eval_text/loss'] != pytest.approx(at_start['eval/loss'])
  assert any(r['step'] == 1 and 'eval_text/loss' in r for r in image_run)

  (logged,) = glob.glob(str(tmp_path / 'image' / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
  assert logged.endswith(f'run-{run_id(str(tmp_path / "image"))}.wandb')  # Resumes append.
  with open(logged, 'rb') as f:
    content = f.read()
  assert b'eval_text/loss' in content and b'evejax-test' in content
  assert not os.path.exists(tmp_path / 'text' / 'wandb')


def test_text_eval_source_is_the_held_out_scenes_as_text(tmp_path):
  data = DataConfig(num_train=4, num_eval=3, cache_dir=str(tmp_path), text_eval_split='text')
  text = pipeline.text_eval_source(data)
  held_out = pipeline.make_sources(data)[1]
  as_text = dataclasses.replace(data.shapes, text_only=True)
  expected = shapes.ShapesDataset(3, data.seed + 1_000_003, **as_text.dataset_kwargs())
  assert len(text) == 3
  for index in range(3):
    assert text[index]['conversations'] == expected[index]['conversations']
    assert text[index].get('image') is None and held_out[index]['image']
