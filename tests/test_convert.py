"""HF / official-format conversion: logits against `transformers`, round trips, key sets, bad input.

Every model is built from a config written here (no hub access); fp32 throughout.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from evejax import convert  # noqa: E402
from evejax.batch import BatchSpec  # noqa: E402
from evejax.convert import files, importer  # noqa: E402
from evejax.convert.keymap import get_param  # noqa: E402
from evejax.data import encode  # noqa: E402
from evejax.models import EVE, ModelConfig  # noqa: E402
from tests.fake_devices import run_with_devices  # noqa: E402

VISION = dict(vision_patch_size=4, vision_merge=2, vision_hidden_size=16)
DIMS = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-6,
  max_position_embeddings=128,
)
IDS = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]


def hf_model(family: str, tie: bool = False, seed: int = 0):
  """A tiny random HF model; every weight (biases and norms too) is random, so none can be lost."""
  torch.manual_seed(seed)
  if family == 'qwen2':
    config = transformers.Qwen2Config(**DIMS, rope_theta=10000.0, tie_word_embeddings=tie)
    model = transformers.Qwen2ForCausalLM(config)
  else:
    config = transformers.LlamaConfig(**DIMS, head_dim=8, rope_theta=500.0, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(1.0 if 'norm' in name else 0.0, 0.2)
  return model.eval()


def hf_logits(model, ids=IDS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def text_batch(cfg: ModelConfig, ids=IDS) -> dict:
  example = encode.encode_example(ids, [True] * len(ids), [])
  row = encode.pack_row([example], BatchSpec.for_model(cfg, seq_len=len(ids), patch_slots=1))
  return {k: jnp.asarray(v)[None] for k, v in row.items()}


def evejax_model(cfg: ModelConfig, params) -> EVE:
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: EVE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return nnx.merge(graphdef, nnx.State(jax.tree.map(jnp.asarray, params)))


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  model = EVE(cfg, rngs=nnx.Rngs(seed))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  # Norm scales start at 1 and biases at 0: perturb them so a dropped tensor shows.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), params)


def flat(params) -> dict:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def tiny_eve_cfg(**overrides) -> ModelConfig:
  fields = dict(
    family='qwen2',
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    **VISION,
  )
  return ModelConfig(**{**fields, **overrides})


def save_hf(model, folder, **kw) -> str:
  model.save_pretrained(folder, **kw)
  return str(folder)


@pytest.mark.parametrize('family,tie', [('qwen2', False), ('llama', False), ('qwen2', True)])
def test_hf_import_logits_match_transformers(tmp_path, family, tie):
  model = hf_model(family, tie)
  folder = save_hf(model, tmp_path / 'hf', max_shard_size='20KB')  # several shards + index
  assert os.path.exists(os.path.join(folder, files.SAFETENSORS_INDEX))
  cfg = convert.model_config_from_hf(convert.read_hf_config(folder), **VISION)
  assert (cfg.family, cfg.tie_word_embeddings, cfg.moe_part) == (family, tie, '')
  params = convert.import_checkpoint(folder, cfg, progress=False)
  got = np.asarray(evejax_model(cfg, params)(text_batch(cfg)))[0]
  np.testing.assert_allclose(got, hf_logits(model), atol=1e-4, rtol=0)


def test_torch_bin_import_equals_safetensors_import(tmp_path):
  """pytorch_model.bin (weights-only torch.load), in bf16, reads like the safetensors file."""
  model = hf_model('qwen2').to(torch.bfloat16)
  st_dir = save_hf(model, tmp_path / 'st')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  torch.save(model.state_dict(), bin_dir / 'pytorch_model.bin')
  cfg = convert.model_config_from_hf(convert.read_hf_config(st_dir), **VISION)
  a = flat(convert.import_checkpoint(st_dir, cfg, progress=False))
  b = flat(convert.import_checkpoint(str(bin_dir), cfg, progress=False))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  embed = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(a["['embed_tokens']['embedding']"], embed)


def test_text_export_loads_in_transformers(tmp_path):
  cfg = tiny_eve_cfg()
  params = random_params(cfg)
  written = convert.export_hf_llm(
    params, cfg, str(tmp_path / 'llm'), dtype='float32', progress=False
  )
  assert written == ['model.safetensors']
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'llm')).eval()
  assert type(model).__name__ == 'Qwen2ForCausalLM'
  keys = set(model.state_dict())
  assert not any('moe' in k or 'vision' in k for k in keys)
  want = np.asarray(evejax_model(cfg, params)(text_batch(cfg)))[0]
  np.testing.assert_allclose(hf_logits(model), want, atol=1e-4, rtol=0)


def test_llama_text_export_round_trips_through_transformers(tmp_path):
  model = hf_model('llama')
  folder = save_hf(model, tmp_path / 'hf')
  cfg = convert.model_config_from_hf(convert.read_hf_config(folder), **VISION)
  params = convert.import_checkpoint(folder, cfg, progress=False)
  convert.export_hf_llm(
    params, cfg, str(tmp_path / 'out'), source_dir=folder, dtype='float32', progress=False
  )
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  np.testing.assert_allclose(hf_logits(reloaded), hf_logits(model), atol=1e-5, rtol=0)
  config = json.load(open(tmp_path / 'out' / 'config.json'))
  assert config['max_position_embeddings'] == 128  # taken from the source config


def test_import_export_import_is_bit_exact(tmp_path):
  cfg = tiny_eve_cfg()
  params = random_params(cfg)
  # fp32 export -> import returns the very same bits.
  convert.export_eve(params, cfg, str(tmp_path / 'f32'), dtype='float32', progress=False)
  back = flat(convert.import_checkpoint(str(tmp_path / 'f32'), cfg, progress=False))
  for k, v in flat(params).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # bf16 (the release dtype): import -> export -> import is a fixed point, files included.
  convert.export_eve(params, cfg, str(tmp_path / 'a'), progress=False)
  first = convert.import_checkpoint(str(tmp_path / 'a'), cfg, progress=False)
  convert.export_eve(first, cfg, str(tmp_path / 'b'), progress=False)
  second = flat(convert.import_checkpoint(str(tmp_path / 'b'), cfg, progress=False))
  for k, v in flat(first).items():
    np.testing.assert_array_equal(second[k], v, err_msg=k)
  a = (tmp_path / 'a' / 'model.safetensors').read_bytes()
  assert a == (tmp_path / 'b' / 'model.safetensors').read_bytes()


def reference_eve_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """EVE_REFERENCE.md §4.2, written out for any size: key -> PyTorch shape."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv, c = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.vision_hidden_size
  p, m = cfg.vision_patch_size, cfg.vision_merge
  keys = {
    'model.embed_tokens.weight': (v, d),
    'lm_head.weight': (v, d),
    'model.norm.weight': (d,),
    'model.vision_tower.patch_embedding.0.weight': (c, 3, p, p),
    'model.vision_tower.patch_embedding.0.bias': (c,),
    'model.vision_tower.patch_embedding.2.weight': (d, c, m, m),
    'model.vision_tower.patch_embedding.2.bias': (d,),
    'model.vision_tower.class_embedding': (d,),
    'model.vision_tower.split_embedding': (d,),
  }
  for n in range(cfg.num_layers):
    for moe in ('', 'moe_'):
      pre = f'model.layers.{n}.'
      for name, out in (('q_proj', q), ('k_proj', kv), ('v_proj', kv)):
        keys[f'{pre}self_attn.{moe}{name}.weight'] = (out, d)
        keys[f'{pre}self_attn.{moe}{name}.bias'] = (out,)
      keys[f'{pre}self_attn.{moe}o_proj.weight'] = (d, q)
      mlp = 'moe_mlp' if moe else 'mlp'
      keys[f'{pre}{mlp}.gate_proj.weight'] = keys[f'{pre}{mlp}.up_proj.weight'] = (f, d)
      keys[f'{pre}{mlp}.down_proj.weight'] = (d, f)
      keys[f'{pre}{moe}input_layernorm.weight'] = (d,)
      keys[f'{pre}{moe}post_attention_layernorm.weight'] = (d,)
  return keys


def read_export(folder) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Key -> (dtype, shape) from the safetensors headers listed by the index (or the single file)."""
  out = {}
  for path in files.checkpoint_files(str(folder)):
    with open(path, 'rb') as f:
      header = json.loads(f.read(struct.unpack('<Q', f.read(8))[0]))
    header.pop('__metadata__')
    out.update({k: (e['dtype'], tuple(e['shape'])) for k, e in header.items()})
  return out


def test_exported_eve_has_reference_keys_shapes_and_config(tmp_path):
  cfg = tiny_eve_cfg(num_kv_heads=1)
  tokenizer_dir = tmp_path / 'tok'
  tokenizer_dir.mkdir()
  (tokenizer_dir / 'tokenizer.json').write_text('{"fake": 1}')
  (tokenizer_dir / 'tokenizer_config.json').write_text('{}')
  written = convert.export_eve(
    random_params(cfg),
    cfg,
    str(tmp_path / 'eve'),
    tokenizer_dir=str(tokenizer_dir),
    max_shard_bytes=20_000,
    progress=False,
  )
  assert len(written) > 2 and written[0] == f'model-00001-of-{len(written):05d}.safetensors'
  index = json.load(open(tmp_path / 'eve' / files.SAFETENSORS_INDEX))
  assert sorted(set(index['weight_map'].values())) == written
  stored = read_export(tmp_path / 'eve')
  want = reference_eve_keys(cfg)
  assert stored.keys() == want.keys()
  assert {k: s for k, (_, s) in stored.items()} == want
  assert {d for d, _ in stored.values()} == {'BF16'}
  assert index['metadata']['total_size'] == 2 * sum(int(np.prod(s)) for s in want.values())
  config = json.load(open(tmp_path / 'eve' / 'config.json'))
  assert config['architectures'] == ['EVEQwen2ForCausalLM'] and config['model_type'] == 'eve-qwen2'
  assert config['add_moe'] is True and config['moe_part'] == 'layernorm-self_attn-mlp'
  assert config['mm_hidden_size'] == 16 and config['num_key_value_heads'] == 1
  assert os.path.exists(tmp_path / 'eve' / 'generation_config.json')
  assert (tmp_path / 'eve' / 'tokenizer.json').read_text() == '{"fake": 1}'
  # The official config reads back into the same evejax config.
  assert convert.model_config_from_hf(config, **VISION) == cfg


def write_safetensors(path, tensors: dict):
  plan = [files.PlannedTensor(k, v.shape, v.dtype) for k, v in tensors.items()]
  writer = files.ShardedSafetensorsWriter(str(path), plan)
  for k, v in tensors.items():
    writer.write(k, v)
  writer.close()


def test_bad_checkpoint_lists_missing_extra_and_wrong_shape(tmp_path):
  cfg = tiny_eve_cfg()
  convert.export_eve(random_params(cfg), cfg, str(tmp_path / 'good'), progress=False)
  reader = files.CheckpointReader(str(tmp_path / 'good'))
  tensors = {k: reader.read(k) for k in reader.keys()}
  del tensors['model.layers.1.mlp.up_proj.weight']
  tensors['model.layers.0.self_attn.k_proj.weight'] = tensors[
    'model.layers.0.self_attn.k_proj.weight'
  ][:-1]
  tensors['model.layers.0.extra.weight'] = np.zeros(3, ml_dtypes.bfloat16)
  write_safetensors(tmp_path / 'bad', tensors)
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.import_checkpoint(str(tmp_path / 'bad'), cfg, progress=False)
  message = str(error.value)
  assert 'missing (1): model.layers.1.mlp.up_proj.weight' in message
  assert 'unexpected (1): model.layers.0.extra.weight' in message
  assert 'model.layers.0.self_attn.k_proj.weight (15, 32) (expected (16, 32))' in message
  assert str(tmp_path / 'bad') in message
  # A checkpoint with vision copies read into a config without them: named, with the fix.
  with pytest.raises(convert.CheckpointMismatchError, match='set model.moe_part'):
    convert.import_checkpoint(str(tmp_path / 'good'), tiny_eve_cfg(moe_part=''), progress=False)


def test_truncated_file_and_missing_folder_fail_clearly(tmp_path):
  cfg = tiny_eve_cfg()
  convert.export_eve(random_params(cfg), cfg, str(tmp_path / 'eve'), progress=False)
  path = tmp_path / 'eve' / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match='truncated'):
    convert.import_checkpoint(str(tmp_path / 'eve'), cfg, progress=False)
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    convert.import_checkpoint(str(tmp_path), cfg, progress=False)


def test_stage0_import_initialises_vision_tower_and_copies_llm_weights(tmp_path):
  """LLM checkpoint -> EVEv2: vision tower as EVE(cfg) initialises it; moe_* = the LLM weights
  (repeat_moe), or fresh weights with vision_copies='init'."""
  folder = save_hf(hf_model('qwen2'), tmp_path / 'hf')
  cfg = convert.model_config_from_hf(
    convert.read_hf_config(folder), **VISION, moe_part='layernorm-self_attn-mlp'
  )
  params = convert.import_checkpoint(folder, cfg, seed=3, progress=False)
  init = flat(
    jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(EVE(cfg, rngs=nnx.Rngs(3)), nnx.Param)))
  )
  got = flat(params)
  for k in got:
    if "'vision_tower'" in k:  # jitted vs eager sampling may differ in the last bit
      np.testing.assert_allclose(got[k], init[k], rtol=1e-6, atol=1e-7, err_msg=k)
    elif "'moe_" in k:
      np.testing.assert_array_equal(got[k], got[k.replace("'moe_", "'")], err_msg=k)
  layer = params['layers'][1]
  assert not np.array_equal(
    layer['mlp']['up_proj']['kernel'], init["['layers'][1]['mlp']['up_proj']['kernel']"]
  )  # the LLM weights were read, not initialised
  # The in-memory stage transition gives the same tree.
  stage0 = convert.import_checkpoint(
    folder,
    convert.model_config_from_hf(convert.read_hf_config(folder), **VISION),
    seed=3,
    progress=False,
  )
  copied = flat(convert.with_vision_copies(stage0, cfg))
  assert copied.keys() == got.keys()
  for k in got:
    np.testing.assert_array_equal(copied[k], got[k], err_msg=k)
  fresh_copies = flat(
    convert.import_checkpoint(folder, cfg, vision_copies='init', seed=3, progress=False)
  )
  key = "['layers'][0]['moe_mlp']['down_proj']['kernel']"
  np.testing.assert_allclose(fresh_copies[key], init[key], rtol=1e-6, atol=1e-7)


SHARDED_EXPORT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from evejax import convert, sharding
    from evejax.models import EVE, ModelConfig
    cfg = ModelConfig(family='qwen2', vocab_size=96, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vision_patch_size=4,
                      vision_merge=2, vision_hidden_size=16)
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
    _, params = sharding.init_sharded(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh)
    kernel = params['layers'][0]['mlp']['up_proj']['kernel']
    assert len(kernel.sharding.device_set) == 8, kernel.sharding
    convert.export_eve(params, cfg, sys.argv[1] + '/sharded', dtype='float32', progress=False)
    convert.export_eve(jax.tree.map(np.asarray, params), cfg, sys.argv[1] + '/host',
                       dtype='float32', progress=False)
""")


def test_export_of_sharded_params_equals_host_export(tmp_path):
  run_with_devices(['-c', SHARDED_EXPORT, str(tmp_path)], devices=8)
  a = (tmp_path / 'sharded' / 'model.safetensors').read_bytes()
  assert a == (tmp_path / 'host' / 'model.safetensors').read_bytes()


def test_writer_output_reads_with_the_safetensors_library(tmp_path):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  tensors = {
    'a': rng.normal(size=(3, 5)).astype(np.float32),
    'b': rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
    'c': np.arange(6, dtype=np.int64).reshape(2, 3),
  }
  write_safetensors(tmp_path / 'st', tensors)
  with safe_open(str(tmp_path / 'st' / 'model.safetensors'), framework='pt') as f:
    assert f.metadata() == {'format': 'pt'}
    for k, v in tensors.items():
      got = f.get_tensor(k)
      got = got.float().numpy() if got.dtype == torch.bfloat16 else got.numpy()
      np.testing.assert_array_equal(got, v.astype(got.dtype))
  with pytest.raises(ValueError, match='plan order'):
    writer = files.ShardedSafetensorsWriter(
      str(tmp_path / 'x'), [files.PlannedTensor(k, v.shape, v.dtype) for k, v in tensors.items()]
    )
    writer.write('b', tensors['b'])


def test_unsupported_configs_fail_clearly():
  base = transformers.Qwen2Config(**DIMS).to_dict()
  with pytest.raises(ValueError, match='model_type'):
    convert.model_config_from_hf({**base, 'model_type': 'mistral'})
  with pytest.raises(ValueError, match='RoPE scaling'):
    convert.model_config_from_hf({**base, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}})
  with pytest.raises(ValueError, match='sliding-window'):
    convert.model_config_from_hf({**base, 'use_sliding_window': True})
  assert importer.rope_theta({'rope_theta': 5.0}) == 5.0


def run_cli(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, '-m', *args],
    cwd=root,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_cli_import_export_check(tmp_path):
  """HF LLM -> `import` (stage 0 + vision copies) -> `export` -> `check` with an image passes."""
  hf = save_hf(hf_model('qwen2'), tmp_path / 'hf')
  (tmp_path / 'hf' / 'tokenizer.json').write_text('{}')
  out = run_cli(
    'evejax.convert',
    'import',
    f'--hf_dir={hf}',
    f'--out={tmp_path}/ckpt',
    '--moe_part=layernorm-self_attn-mlp',
  )
  assert f'--config.init_from={tmp_path}/ckpt' in out
  run_cli(
    'evejax.convert',
    'export',
    f'--params={tmp_path}/ckpt',
    f'--out={tmp_path}/eve',
    f'--source_dir={hf}',
    '--dtype=float32',
    '--max_shard_size=1MB',
  )
  assert (tmp_path / 'eve' / 'tokenizer.json').read_text() == '{}'
  index = json.load(open(tmp_path / 'eve' / files.SAFETENSORS_INDEX))
  assert any('moe_mlp' in k for k in index['weight_map'])
  report = run_cli(
    'evejax.convert.check',
    f'--hf_dir={tmp_path}/eve',
    '--ids=3,5,-200,7,9',
    '--image_max_size=64',
    '--atol=1e-4',
  )
  metrics = dict(line.split() for line in report.splitlines()[3:] if len(line.split()) == 2)
  assert float(metrics['max_abs_diff']) < 1e-4 and float(metrics['top1_agreement']) == 1.0
  assert int(metrics['positions']) == 4 + 1 + 2 * 2  # 4 text ids, a 2x1-token image


CLI_CONFIG = textwrap.dedent("""
    import dataclasses
    import ml_collections
    from evejax.convert import importer

    def get_config(arg=None):  # arg: the moe_part
      cfg = importer.model_config_from_hf(importer.read_hf_config({hf!r}), moe_part=arg or '')
      return ml_collections.ConfigDict(dict(model=dataclasses.asdict(cfg)))
    """)


def test_cli_import_takes_a_config_argument_and_overrides(tmp_path):
  """`--config=FILE:arg --config.model.X=Y`: the override wins over the file's model; an
  unknown field is a clear error."""
  hf = save_hf(hf_model('qwen2'), tmp_path / 'hf')
  config = tmp_path / 'llm.py'
  config.write_text(CLI_CONFIG.format(hf=hf))
  command = [
    'evejax.convert',
    'import',
    f'--hf_dir={hf}',
    f'--out={tmp_path}/ckpt',
    f'--config={config}:mlp',
  ]
  run_cli(*command, '--config.model.moe_part=self_attn-mlp')
  from evejax.convert import checkpoints  # pylint: disable=import-outside-toplevel

  _, cfg = checkpoints.load_params(str(tmp_path / 'ckpt'))
  assert cfg.moe_part == 'self_attn-mlp'
  bad = subprocess.run(
    [sys.executable, '-m', *command, '--config.model.moe_parts=mlp'], capture_output=True, text=True
  )
  assert bad.returncode != 0
  assert (
    "Invalid command line: --config.model.moe_parts: config.model has no key 'moe_parts'"
    in bad.stderr
  )


def test_compare_logits_metrics():
  from evejax.convert.check import compare_logits  # pylint: disable=import-outside-toplevel

  b = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
  same = compare_logits(b, b, top_k=2)
  assert same['max_abs_diff'] == 0 and same['kl_divergence'] == 0
  assert same['top1_agreement'] == 1 and same['top2_overlap'] == 1
  a = b.copy()
  a[1] = [2.0, 3.0, 1.0, 0.0]  # second row: top-1 swapped, top-2 set unchanged
  m = compare_logits(a, b, top_k=2)
  assert m['max_abs_diff'] == 1.0 and m['max_rel_diff'] == 1.0 / 3.0
  assert m['top1_agreement'] == 0.5 and m['top2_overlap'] == 1.0
  p = np.exp(b[1]) / np.exp(b[1]).sum()
  q = np.exp(a[1]) / np.exp(a[1]).sum()
  np.testing.assert_allclose(m['kl_divergence'], (p * np.log(p / q)).sum() / 2, rtol=1e-12)


def test_scanned_layer_layout_maps_to_the_same_official_tensors(tmp_path):
  """Stacked (scan_layers) parameters export to the per-layer keys and import back bit-exactly,
  into either layout."""
  scanned_cfg = tiny_eve_cfg(scan_layers=True)
  scanned = random_params(scanned_cfg)
  assert 'kernel' in scanned['layers']['mlp']['up_proj']  # one stacked array per weight
  convert.export_eve(scanned, scanned_cfg, str(tmp_path / 'eve'), dtype='float32', progress=False)
  assert read_export(tmp_path / 'eve').keys() == reference_eve_keys(scanned_cfg).keys()
  back = flat(convert.import_checkpoint(str(tmp_path / 'eve'), scanned_cfg, progress=False))
  for k, v in flat(scanned).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  unrolled = convert.import_checkpoint(str(tmp_path / 'eve'), tiny_eve_cfg(), progress=False)
  for n in range(scanned_cfg.num_layers):
    np.testing.assert_array_equal(
      unrolled['layers'][n]['self_attn']['moe_k_proj']['bias'],
      scanned['layers']['self_attn']['moe_k_proj']['bias'][n],
    )
    np.testing.assert_array_equal(
      unrolled['layers'][n]['mlp']['down_proj']['kernel'],
      scanned['layers']['mlp']['down_proj']['kernel'][n],
    )


def test_parameters_without_an_official_name_are_refused():
  params = {
    'embed_tokens': {'embedding': jax.ShapeDtypeStruct((4, 2), jnp.float32)},
    'vision_tower': {'resampler': {'proj': {'kernel': jax.ShapeDtypeStruct((2, 2), jnp.float32)}}},
  }
  with pytest.raises(NotImplementedError, match='vision_tower/resampler/proj/kernel'):
    convert.tensor_specs(tiny_eve_cfg(), params)


MULTIHOST_EXPORT = textwrap.dedent("""
    import sys
    import jax
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=process_id)
    from jax.experimental import multihost_utils
    from flax import nnx
    from evejax import convert, sharding
    from evejax.models import EVE, ModelConfig
    cfg = ModelConfig(family='qwen2', vocab_size=96, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vision_patch_size=4,
                      vision_merge=2, vision_hidden_size=16)
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2})
    _, params = sharding.init_sharded(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh)
    assert not params['layers'][0]['mlp']['up_proj']['kernel'].is_fully_addressable
    written = convert.export_eve(params, cfg, out + '/multi', dtype='float32', progress=False)
    assert bool(written) == (process_id == 0)
    gathered = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)
    if process_id == 0:
      convert.export_eve(gathered, cfg, out + '/host', dtype='float32', progress=False)
""")


@pytest.mark.slow  # two JAX processes: ~30 s on 2 shared cores
def test_two_process_export_gathers_each_tensor_to_process_0(tmp_path):
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', MULTIHOST_EXPORT, str(i), str(port), str(tmp_path)],
      env=env,
      cwd=root,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  errors = [p.communicate(timeout=240)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
  a = (tmp_path / 'multi' / 'model.safetensors').read_bytes()
  assert a == (tmp_path / 'host' / 'model.safetensors').read_bytes()


def test_check_tool_transformers_side_on_a_plain_llm(tmp_path):
  """The parity tool's functions on a plain HF folder: transformers vs the imported evejax model."""
  from evejax.convert import check  # pylint: disable=import-outside-toplevel

  folder = save_hf(hf_model('llama'), tmp_path / 'hf')
  reader = files.CheckpointReader(folder)
  cfg = check.model_config(folder, reader, None)
  params = convert.import_checkpoint(folder, cfg, progress=False)
  metrics = check.compare_logits(
    check.evejax_logits(cfg, check.image_spec(cfg, 448), params, IDS, None),
    check.torch_logits(folder, 'transformers', IDS, None),
  )
  assert metrics['max_abs_diff'] < 1e-4 and metrics['top1_agreement'] == 1.0
  assert metrics['kl_divergence'] < 1e-8


def test_evejax_checkpoint_round_trip_full_and_lazy(tmp_path):
  """save_params -> load_params / lazy_params (one tensor at a time) give the same bits and config;
  the output is a `params` item that init_from (evejax.checkpoint) resolves."""
  # pylint: disable=import-outside-toplevel
  from evejax.checkpoint.store import resolve_params_dir
  from evejax.convert import checkpoints

  cfg = tiny_eve_cfg(param_dtype='bfloat16')
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(cfg))
  checkpoints.save_params(str(tmp_path / 'ckpt'), params, cfg, source='test')
  assert resolve_params_dir(str(tmp_path / 'ckpt')) == str(tmp_path / 'ckpt' / 'params')
  loaded, loaded_cfg = checkpoints.load_params(str(tmp_path / 'ckpt'))
  lazy, _ = checkpoints.lazy_params(str(tmp_path / 'ckpt'))
  assert loaded_cfg == cfg
  want = flat(params)
  assert flat(loaded).keys() == want.keys()
  for spec in convert.tensor_specs(cfg):
    key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in spec.path))
    np.testing.assert_array_equal(np.asarray(get_param(lazy, spec)), want[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(get_param(loaded, spec)), want[key], err_msg=key)
