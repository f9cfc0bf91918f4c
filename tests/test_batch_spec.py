"""The batch contract shared by training and generation: an EVE-HD model (model.pal_pool=2) sees the
same visual-token grid for an image in a training step and when it answers about that image."""

import io

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import demo_v1
from evejax import batch as bf
from evejax.config import TrainConfig
from evejax.data import images, pipeline, records
from evejax.inference import SamplingConfig
from evejax.inference.assistant import Assistant
from evejax.models import EVE
from evejax.train import optim
from evejax.train import pal as pal_lib
from evejax.train.step import TrainState, make_train_step

WIDTH, HEIGHT, MAX_SIZE = 1000, 520, 336  # The 1000x520 image at a CPU-sized budget.


def grid(token_kind: np.ndarray) -> tuple[int, int]:
  """(rows, cols) of the one image in a sequence: a SPLIT token ends every row."""
  rows = int((token_kind == bf.SPLIT).sum())
  return rows, int((token_kind == bf.PATCH).sum()) // rows


def image_bytes() -> bytes:
  pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def hd_config(path: str) -> TrainConfig:
  """The tiny EVEv1 with HD PAL: 2x2 token blocks, offline teacher features, resize 'eve_v1'."""
  config = demo_v1.get_config()
  config.model.pal_pool = 2
  config.pal.teacher = 'offline'
  config.data.update(
    source='records',
    path=path,
    eval_split='',
    max_size=MAX_SIZE,
    resize='eve_v1',
    template='chat',
    seq_len=160,
  )
  return TrainConfig.parse(config)


@pytest.fixture(scope='module')
def hd_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('hd'))
  cfg = hd_config(path)
  # Sides round to whole 2x2 blocks of 28 px tokens (56 px): 336 x 224, 12 x 8 tokens, 6 x 4 blocks.
  assert images.target_size(WIDTH, HEIGHT, MAX_SIZE, 56, 'eve_v1') == (336, 224)
  assert images.target_size(WIDTH, HEIGHT, MAX_SIZE, 28, 'eve_v1') == (336, 196)  # Not HD: 7 rows.
  features = np.random.default_rng(1).normal(size=(4 * 6, cfg.model.pal_teacher_size))
  record = {
    'image': image_bytes(),
    'extras': {'teacher_features': features.astype(np.float32)},
    'conversations': [
      {'from': 'human', 'value': '<image>\nwhat is it?'},
      {'from': 'gpt', 'value': 'a square.'},
    ],
  }
  records.write_dataset(
    [0], lambda _: record, path, 'train', info={'corpus': ['what is it? a square.']}
  )
  source = records.RecordSource(path, 'train')
  tokenizer = pipeline.load_tokenizer(cfg.data, source)
  graphdef, params = nnx.split(EVE(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
  return cfg, source, tokenizer, graphdef, nnx.to_pure_dict(params)


def test_hd_training_step_and_generation_see_the_same_visual_token_grid(hd_run):
  cfg, source, tokenizer, graphdef, params = hd_run
  spec = cfg.batch_spec()
  assert (spec.pal_pool, spec.resize_multiple, spec.teacher_size) == (2, 56, 64)

  # Training: record -> loader -> batch -> one step of the loss with HD PAL (offline teacher).
  preprocess = pipeline.make_preprocessor(cfg.data, tokenizer, spec)
  batch = next(
    iter(pipeline.make_dataset(source, preprocess, 1, seed=0, shuffle=False, num_epochs=1))
  )
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps)
  step = make_train_step(
    graphdef,
    tx,
    optim.learning_rate_schedule(cfg.optim, cfg.total_steps),
    pal=pal_lib.objective_from_config(cfg.pal, cfg.model),
  )
  state = TrainState.create(jax.tree.map(jax.numpy.copy, params), tx.init(params))  # Donated.
  _, (loss_metrics, _) = step(state, jax.tree.map(jax.numpy.asarray, batch))
  assert np.isfinite(float(loss_metrics[0].loss.compute()))
  assert 0.0 < float(loss_metrics[1].pal_loss.compute()) < 2.0  # The HD PAL term ran.
  trained_grid = grid(batch['token_kind'][0])

  # Generation: the same image through the assistant built from the same config.
  assistant = Assistant.from_params(cfg, graphdef, params, tokenizer)
  assert assistant.preprocess.spec.resize_multiple == 56
  prompt = assistant.encode('what is it?', source[0]['image'])
  assert len(assistant.answer([prompt], SamplingConfig(max_new_tokens=2))) == 1
  assert grid(prompt['token_kind']) == trained_grid == (8, 12)
  np.testing.assert_array_equal(prompt['patches'], batch['patches'][0, : 8 * 12])
