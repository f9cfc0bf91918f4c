"""Any checkpoint in, answers out: an evejax run, its official-format export and that export's
`convert import` output answer with identical token ids; `kinds.locate` tells them apart; an
official folder gets the official inference protocol (template, image rule, generation_config)."""

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import nnx
from PIL import Image, ImageDraw

from evejax.checkpoint import CheckpointError, kinds, store
from evejax.config import TrainConfig
from evejax.convert import checkpoints, exporter, importer
from evejax.data import images, templates
from evejax.data.shapes import ShapesDataset
from evejax.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_bpe
from evejax.inference import SamplingConfig, cli_flags, official
from evejax.inference.assistant import Assistant
from evejax.models import EVE, ModelConfig
from tests.conftest import TINY, train_sentencepiece

REPO = __file__.rsplit('/tests/', 1)[0]


def run_cli(*args):
  result = subprocess.run(
    [sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _hf_folder(path, model_type='eve-qwen2', **fields):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps({'model_type': model_type, **fields}))
  (path / 'model.safetensors').write_bytes(b'')  # locate looks at names only
  return path


def test_locate_tells_the_kinds_apart(tmp_path):
  official_dir = _hf_folder(tmp_path / 'official')
  assert kinds.locate(str(official_dir)) == kinds.Located(kinds.OFFICIAL, str(official_dir))
  params = {'w': np.zeros(2, np.float32)}
  store.write_params_folder(str(tmp_path / 'import'), params, {'model': {}}, converted_from='x')
  assert kinds.locate(str(tmp_path / 'import')).kind == kinds.IMPORT
  step = store.step_dir(store.checkpoints_dir(str(tmp_path / 'run')), 3)
  store.write_params_folder(step, params, {'model': {}, 'data': {}})
  assert kinds.locate(str(tmp_path / 'run')) == kinds.Located(kinds.RUN, step)

  # A workdir's config.json is the run's config (no model_type); without weights it is no HF
  # folder either: each failure is one line naming the path and the three kinds.
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text('{"model": {}}')
  for bad in ('empty', 'missing'):
    with pytest.raises(CheckpointError) as error:
      kinds.locate(str(tmp_path / bad))
    message = str(error.value)
    assert '\n' not in message and bad in message and 'convert import' in message
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  (no_weights / 'config.json').write_text('{"model_type": "qwen2"}')
  with pytest.raises(CheckpointError, match='official EVE/HF folder'):
    kinds.locate(str(no_weights))


def test_official_protocol_of_a_folder(tmp_path):
  v2 = _hf_folder(
    tmp_path / 'v2',
    mm_vision_tower='openai/eve-anyratio-res1600-patch16',
    max_position_embeddings=32768,
  )
  model = ModelConfig(vision_patch_size=16, vision_merge=2)
  cfg = official.train_config(str(v2), model)
  assert (cfg.data.template, cfg.data.resize, cfg.data.max_size, cfg.data.seq_len) == (
    'qwen2',
    'eve_v2_infer',
    1600,
    32768,
  )
  # EVE_REFERENCE.md §3.2: a 640x480 image is upscaled to 1856x1408 -> 1 + 44 * (58 + 1) tokens.
  spec = cfg.batch_spec()
  groups, grid = official_patches(spec, 640, 480)
  assert grid == (44, 58) and len(groups) <= spec.image_budget
  # An elongated photo needs more than a square's grid: the inference rule never rejects it.
  assert official_patches(spec, 4332, 1000)[1] == (25, 105)
  assert official.train_config(str(v2), model, max_size=800, template='chat').data.max_size == 800

  v1 = _hf_folder(tmp_path / 'v1', 'eve', mm_vision_tower='openai/eve-patch14-anypixel-1344')
  llama = ModelConfig(family='llama', vision_tokenizer='v1', vision_patch_size=14, pal_pool=2)
  cfg = official.train_config(str(v1), llama)
  assert (cfg.data.template, cfg.data.resize, cfg.data.max_size) == ('vicuna_v1', 'eve_v1', 1344)
  # EVE-7B-HD: image sides in whole 2x2 token blocks (56 px), as PAL pools them.
  hd = {'mm_vision_tower': 'openai/eve-patch14-anypixel-1344'}
  assert official.pal_pool(str(v1), hd) == 2 and cfg.batch_spec().resize_multiple == 56
  # A processor folder beside the weights wins over the name.
  (v1 / 'preprocessor_config.json').write_text('{"image_size": 672}')
  assert official.processor_max_size(str(v1), {'mm_vision_tower': 'x/y'}, 'v1') == 672
  with pytest.raises(ValueError, match='pass --max_size'):
    official.processor_max_size(str(v2), {'mm_vision_tower': 'custom'}, 'v2')


def official_patches(spec, width, height):
  size = images.target_size(width, height, spec.max_size, spec.resize_multiple, spec.resize)
  pixels = np.zeros((size[1], size[0], 3), np.uint8)
  return images.patch_groups(pixels, spec)


def test_generation_config_as_hf_generate_reads_it(tmp_path, shapes_tokenizer):
  folder = tmp_path / 'gen'
  folder.mkdir()
  # Qwen2.5-7B-Instruct's generation_config.json.
  qwen = {
    'bos_token_id': 151643,
    'pad_token_id': 151643,
    'do_sample': True,
    'eos_token_id': [151645, 151643],
    'repetition_penalty': 1.05,
    'temperature': 0.7,
    'top_p': 0.8,
    'top_k': 20,
  }
  (folder / 'generation_config.json').write_text(json.dumps(qwen))
  got = official.sampling(str(folder), shapes_tokenizer)
  assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.7, 0.8, 20, 1.05)
  assert set(got.stop_tokens) == {151645, 151643, shapes_tokenizer.eos_id}
  # Greedy without do_sample, the repetition penalty still applies (the benchmark loaders).
  (folder / 'generation_config.json').write_text(json.dumps({**qwen, 'do_sample': False}))
  got = official.sampling(str(folder), shapes_tokenizer)
  assert got.greedy and (got.top_k, got.top_p, got.repetition_penalty) == (0, 1.0, 1.05)
  (folder / 'generation_config.json').unlink()
  assert official.sampling(str(folder), shapes_tokenizer) == SamplingConfig(
    stop_tokens=(shapes_tokenizer.eos_id,)
  )


def test_sampling_flags_given_replace_the_checkpoint_settings():
  defaults = SamplingConfig(temperature=0.7, top_p=0.8, repetition_penalty=1.05, stop_tokens=(5,))
  parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:
    assert cli_flags.sampling_config(defaults) == defaults
    with flagsaver.as_parsed((cli_flags.TEMPERATURE, '0'), (cli_flags.MAX_NEW_TOKENS, '7')):
      assert cli_flags.sampling_config(defaults) == dataclasses.replace(
        defaults, temperature=0.0, max_new_tokens=7
      )
      assert cli_flags.sampling_config() == SamplingConfig(max_new_tokens=7)
  finally:
    if not parsed:
      flags.FLAGS.unparse_flags()


@pytest.fixture
def shapes_tokenizer():
  return train_bpe(ShapesDataset(20, seed=1).corpus(), 300)


# EVEv2 with a byte-level BPE; EVEv1 (Llama, PEL with local/global attention, 4-channel pixels)
# with a SentencePiece tokenizer.model, as the releases.
VERSIONS = {
  'v2': (dict(vocab_size=320), dict(template='chat', resize='eve_v2_train', max_size=32)),
  'v1': (
    dict(
      vocab_size=320,
      family='llama',
      attention_bias=False,
      moe_part='',
      vision_tokenizer='v1',
      vision_hidden_size=16,
    ),
    dict(template='vicuna_v1', resize='eve_v1', max_size=32),
  ),
}


def _save_tokenizer(version: str, workdir) -> None:
  """What the trainer saves in the workdir: tokenizer.json (BPE) or tokenizer.model."""
  corpus = ShapesDataset(20, seed=1).corpus()
  if version == 'v2':
    train_bpe(corpus, 300).save(str(workdir))
    return
  workdir.mkdir(parents=True)
  text = [line.replace('\n', ' ') for line in corpus]
  (workdir / 'tokenizer.model').write_bytes(train_sentencepiece(text, 300))
  assert isinstance(Tokenizer.load(str(workdir)), SentencePieceTokenizer)


@pytest.mark.parametrize('version', sorted(VERSIONS))
def test_one_model_answers_identically_from_all_three_kinds(tmp_path, version):
  """In process (the default suite): one tiny model saved as a run's step, exported to the
  official format and imported back gives the same prompt and the same greedy ids from each."""
  fields, protocol = VERSIONS[version]
  model_cfg = ModelConfig(**{**TINY, **fields})
  params = nnx.to_pure_dict(nnx.state(EVE(model_cfg, rngs=nnx.Rngs(3)), nnx.Param))
  workdir, export, imported = tmp_path / 'run', tmp_path / 'export', tmp_path / 'import'
  _save_tokenizer(version, workdir)
  config = TrainConfig.parse(
    {'model': dataclasses.asdict(model_cfg), 'data': {**protocol, 'seq_len': 512}}
  )
  step = store.step_dir(store.checkpoints_dir(str(workdir)), 1)
  store.write_params_folder(step, params, config.to_dict())
  exporter.export_eve(
    params, model_cfg, str(export), tokenizer_dir=str(workdir), dtype='float32', progress=False
  )
  hf_cfg = official.model_config(str(export), importer.read_hf_config(str(export)))
  imported_params = importer.import_checkpoint(str(export), hf_cfg, progress=False)
  checkpoints.save_params(str(imported), imported_params, hf_cfg, str(export))

  image = io.BytesIO()
  Image.new('RGB', (32, 24), 'red').save(image, format='PNG')
  results = []
  for path, overrides in ((workdir, {}), (export, protocol), (imported, protocol)):
    assistant = Assistant.from_checkpoint(str(path), max_length=512, **overrides)
    prompt = assistant.encode('what is it?', image.getvalue())
    ids = assistant.generator.generate([prompt], SamplingConfig(max_new_tokens=6))[0]
    results.append((prompt['tokens'].tolist(), ids))
  assert len(results[0][1]) == 6 and results[0] == results[1] == results[2]


@pytest.fixture(scope='module')
def three_checkpoints(tmp_path_factory):
  """A two-step demo run, its official-format export (float32, so nothing is rounded) and the
  `convert import` output of that export."""
  root = tmp_path_factory.mktemp('released')
  run, export, imported = root / 'run', root / 'export', root / 'import'
  run_cli(
    'evejax.train',
    '--config=configs/demo.py',
    f'--workdir={run}',
    '--config.total_steps=2',
    '--config.data.num_train=64',
    '--config.data.num_eval=0',
    '--config.model.num_layers=1',
    f'--config.data.cache_dir={root / "cache"}',
  )
  run_cli(
    'evejax.convert',
    'export',
    f'--params={run}',
    f'--out={export}',
    f'--tokenizer_dir={run}',
    '--dtype=float32',
  )
  run_cli('evejax.convert', 'import', f'--hf_dir={export}', f'--out={imported}')
  image = Image.new('RGB', (96, 64), 'white')
  ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill='red')
  image.save(root / 'image.png')
  return run, export, imported, root / 'image.png'


# The demo run's protocol, which an official folder does not carry: given explicitly.
RUN_PROTOCOL = dict(template='chat', resize='eve_v2_train', max_size=96, max_length=256)


@pytest.mark.slow
def test_run_export_and_import_answer_identically(three_checkpoints):
  run, export, imported, image = three_checkpoints
  assert [kinds.locate(str(p)).kind for p in (run, export, imported)] == [
    kinds.RUN,
    kinds.OFFICIAL,
    kinds.IMPORT,
  ]
  question, sampling = 'what shapes are there?', SamplingConfig(max_new_tokens=12)
  results = []
  for path, protocol in ((run, {}), (export, RUN_PROTOCOL), (imported, RUN_PROTOCOL)):
    assistant = Assistant.from_checkpoint(str(path), **protocol)
    prompt = assistant.encode(question, image.read_bytes())
    ids = assistant.generator.generate([prompt], sampling)[0]
    results.append((prompt['tokens'].tolist(), ids))
  assert len(results[0][1]) == 12
  assert results[0] == results[1] == results[2]

  # Without the overrides an official folder answers with the official protocol: the qwen2
  # template (system prompt) and the inference resize to the processor's 1600 px budget.
  official_assistant = Assistant.from_checkpoint(str(export))
  assert official_assistant.preprocess.template == templates.get_template('qwen2')
  assert official_assistant.preprocess.spec.max_size == 1600
  assert official_assistant.preprocess.spec.resize == 'eve_v2_infer'
  assert official_assistant.generator.image_seen_id == 0  # EVEv2's placeholder id for the penalty
  assert official_assistant.sampling.greedy  # the export's generation_config has no do_sample
  assert official_assistant.tokenizer.encode(question) == Tokenizer.load(str(run)).encode(question)


@pytest.mark.slow
def test_generate_cli_on_an_export_matches_the_run(three_checkpoints):
  run, export, _, image = three_checkpoints
  common = [f'--image={image}', '--prompt=what shapes are there?', '--max_new_tokens=6']
  from_run = run_cli('evejax.generate', f'--checkpoint={run}', *common)
  flags = [f'--{k}={v}' for k, v in RUN_PROTOCOL.items()]
  from_export = run_cli('evejax.generate', f'--checkpoint={export}', *common, *flags)
  assert from_run.stdout == from_export.stdout and from_run.stdout.strip()
