"""EVEv1 weights out and in: the official key set of EVE_REFERENCE.md §4.1 (with the CLIP teacher
under both prefixes), bit-exact round trips, and evejax logits against an independent PyTorch EVEv1
(the PEL of §2.3 written here, `transformers` Llama for the decoder) that loads the export."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from test_convert import evejax_model, flat, random_params, read_export  # noqa: E402
from test_convert_eve import IDS, MEAN, STD, load_state_dict  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from evejax import batch as bf  # noqa: E402
from evejax import convert  # noqa: E402
from evejax.batch import BatchSpec  # noqa: E402
from evejax.convert import files, importer  # noqa: E402
from evejax.data import encode, images  # noqa: E402
from evejax.models import ModelConfig  # noqa: E402
from evejax.models.presets import PRESETS  # noqa: E402

CFG = ModelConfig(**{**PRESETS['eve_v1_tiny'], 'num_layers': 2})  # PAL taps at 2, 1, 0


def reference_v1_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """EVE_REFERENCE.md §4.1 for any size, without the CLIP teacher: key -> PyTorch shape."""
  d, f, v, c = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.vision_hidden_size
  t, p = cfg.pal_teacher_size, cfg.vision_patch_size
  keys = {
    'model.embed_tokens.weight': (v, d),
    'lm_head.weight': (v, d),
    'model.norm.weight': (d,),
    'model.vision_tower.patch_embedding.weight': (c, 3, p, p),
    'model.vision_tower.class_embedding': (c,),
    'model.vision_tower.split_embedding': (c,),
    'model.mm_projector.0.weight': (d, c),
    'model.mm_projector.0.bias': (d,),
    'model.mm_projector.2.weight': (d, d),
    'model.mm_projector.2.bias': (d,),
  }
  for n in range(cfg.num_layers):
    pre = f'model.layers.{n}.'
    for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      keys[f'{pre}self_attn.{name}.weight'] = (d, d)
    keys[f'{pre}mlp.gate_proj.weight'] = keys[f'{pre}mlp.up_proj.weight'] = (f, d)
    keys[f'{pre}mlp.down_proj.weight'] = (d, f)
    keys[f'{pre}input_layernorm.weight'] = keys[f'{pre}post_attention_layernorm.weight'] = (d,)
  for block in ('local_attention', 'global_attention'):
    pre = f'model.vision_tower.{block}.'
    for name, out in (('q', c), ('kv', 2 * c)):
      keys[f'{pre}{name}.0.weight'] = keys[f'{pre}{name}.0.bias'] = (c,)
      keys[f'{pre}{name}.1.weight'] = (out, c)
    keys[f'{pre}proj.weight'], keys[f'{pre}proj.bias'] = (c, c), (c,)
  pal = 'model.vision_tower_compressor.'
  for j in range(cfg.num_layers // cfg.pal_layer_rate + 1):
    keys[f'{pal}norm_layer.{j}.0.weight'] = keys[f'{pal}norm_layer.{j}.0.bias'] = (d,)
    keys[f'{pal}norm_layer.{j}.1.weight'] = (t, d)
  keys[f'{pal}input_layer.weight'], keys[f'{pal}input_layer.bias'] = (t, d), (t,)
  keys[f'{pal}output_layer.weight'], keys[f'{pal}output_layer.bias'] = (t, t), (t,)
  return keys


@pytest.fixture(scope='module')
def clip_file(tmp_path_factory):
  """A tiny random HF CLIPVisionModel saved as safetensors (the PAL teacher)."""
  config = transformers.CLIPVisionConfig(
    hidden_size=CFG.pal_teacher_size,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
  )
  folder = tmp_path_factory.mktemp('clip')
  transformers.CLIPVisionModel(config).save_pretrained(folder)
  return str(folder / 'model.safetensors')


@pytest.fixture(scope='module')
def exported(tmp_path_factory, clip_file):
  params = random_params(CFG, seed=3)
  folder = str(tmp_path_factory.mktemp('eve_v1'))
  convert.export_eve(
    params,
    CFG,
    folder,
    dtype='float32',
    clip_weights=clip_file,
    max_shard_bytes=200_000,
    progress=False,
  )
  return params, folder


def test_export_has_the_reference_keys_the_teacher_twice_and_the_config(exported, clip_file):
  _, folder = exported
  stored = {k: shape for k, (_, shape) in read_export(folder).items()}
  teacher = files.SafetensorsFile(clip_file)
  clip_keys = {'vision_model.' + k: tuple(teacher.shape(k)) for k in teacher.entries}
  want = dict(reference_v1_keys(CFG))
  for prefix in (
    'model.vision_clip.backbone.',
    'model.vision_tower_compressor.clip_layer.backbone.',
  ):
    want.update({prefix + k: shape for k, shape in clip_keys.items()})
  assert stored == want
  config = json.load(open(f'{folder}/config.json'))
  assert (config['architectures'], config['model_type']) == (['EVELlamaForCausalLM'], 'eve')
  assert config['requires_cliploss'] is True and config['mm_projector_type'] == 'mlp2x_gelu'
  assert config['mm_hidden_size'] == CFG.vision_hidden_size and 'add_moe' not in config
  # The files alone give back the model config (vision and PAL sizes read off the tensors).
  fields = importer.vision_fields(files.CheckpointReader(folder))
  back = importer.model_config_from_hf(config, **fields)
  same = (
    'family',
    'hidden_size',
    'num_layers',
    'vision_tokenizer',
    'vision_hidden_size',
    'vision_patch_size',
    'pal',
    'pal_teacher_size',
    'pal_layer_rate',
    'attention_bias',
  )
  assert {k: getattr(back, k) for k in same} == {k: getattr(CFG, k) for k in same}


def test_import_export_import_is_bit_exact(exported, tmp_path, clip_file):
  params, folder = exported
  back = convert.import_checkpoint(folder, CFG, progress=False)  # the teacher is skipped
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(back)[k], v, err_msg=k)
  convert.export_eve(
    back,
    CFG,
    str(tmp_path / 'again'),
    dtype='float32',
    clip_weights=clip_file,
    max_shard_bytes=200_000,
    progress=False,
  )
  first, second = load_state_dict(folder), load_state_dict(str(tmp_path / 'again'))
  assert first.keys() == second.keys()
  assert all(torch.equal(first[k], second[k]) for k in first)


def test_inference_export_has_no_pal_and_needs_pal_off(tmp_path):
  params = random_params(CFG, seed=4)
  convert.export_eve(params, CFG, str(tmp_path / 'infer'), dtype='float32', progress=False)
  stored = read_export(tmp_path / 'infer')
  assert not [k for k in stored if 'compressor' in k or 'clip' in k]
  assert json.load(open(tmp_path / 'infer' / 'config.json'))['requires_cliploss'] is False
  with pytest.raises(convert.CheckpointMismatchError, match='set model.pal=False'):
    convert.import_checkpoint(str(tmp_path / 'infer'), CFG, progress=False)
  no_pal = dataclasses.replace(CFG, pal=False)
  back = flat(convert.import_checkpoint(str(tmp_path / 'infer'), no_pal, progress=False))
  assert back.keys() == {k for k in flat(params) if not k.startswith("['pal']")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, flat(params)[k], err_msg=k)


def test_llm_import_initialises_the_vision_side(tmp_path):
  """Stage 0 from Vicuna: LLM read, PEL + projector + PAL fresh."""
  params = random_params(CFG, seed=5)
  convert.export_hf_llm(params, CFG, str(tmp_path / 'llm'), dtype='float32', progress=False)
  back = flat(convert.import_checkpoint(str(tmp_path / 'llm'), CFG, seed=7, progress=False))
  assert back.keys() == flat(params).keys()
  for k, v in flat(params).items():
    fresh = k.startswith(("['vision_tower']", "['pal']"))
    assert np.array_equal(back[k], v) != fresh or not v.any(), k


class PooledAttention(nn.Module):
  """§2.3: LayerNorm -> Linear query and key/values, C**-0.5 logits, heads of C/heads."""

  def __init__(self, c, heads):
    super().__init__()
    self.q = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c, bias=False))
    self.kv = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c, bias=False))
    self.proj = nn.Linear(c, c)
    self.c, self.heads = c, heads

  def forward(self, queries, keys):  # (n, C), (n, k, C) -> (n, C)
    n, k = keys.shape[:2]
    q = self.q(queries).view(n, self.heads, -1)
    key, value = self.kv(keys).view(n, k, 2, self.heads, -1).unbind(2)
    weights = (torch.einsum('nhd,nkhd->nhk', q, key) * self.c**-0.5).softmax(-1)
    return self.proj(torch.einsum('nhk,nkhd->nhd', weights, value).reshape(n, self.c))


class VisionTokenizer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    c, p = cfg.vision_hidden_size, cfg.vision_patch_size
    self.patch_embedding = nn.Conv2d(3, c, p, stride=p, bias=False)
    self.class_embedding, self.split_embedding = (
      nn.Parameter(torch.zeros(c)),
      nn.Parameter(torch.zeros(c)),
    )
    self.local_attention = PooledAttention(c, cfg.vision_heads)
    self.global_attention = PooledAttention(c, cfg.vision_heads)

  def forward(self, rgb):  # (3, H, W) normalised, all pixels valid -> (1 + h (w + 1), C)
    f = self.patch_embedding(rgb[None])[0]
    c, h, w = f.shape[0], f.shape[1] // 2, f.shape[2] // 2
    pooled = F.avg_pool2d(f[None], 2)[0].flatten(1).T
    windows = f.view(c, h, 2, w, 2).permute(1, 3, 2, 4, 0).reshape(h * w, 4, c)
    local = pooled + self.local_attention(pooled, windows)
    cls = self.class_embedding + self.global_attention(self.class_embedding[None], local[None])[0]
    rows = torch.cat([local.view(h, w, c), self.split_embedding.expand(h, 1, c)], 1)
    return torch.cat([cls[None], rows.reshape(-1, c)])


class TorchEVEv1(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.vision_tower = VisionTokenizer(cfg)
    self.mm_projector = nn.Sequential(
      nn.Linear(cfg.vision_hidden_size, cfg.hidden_size),
      nn.GELU(),
      nn.Linear(cfg.hidden_size, cfg.hidden_size),
    )
    self.llm = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
      )
    )

  def load(self, state):
    take = lambda prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    self.vision_tower.load_state_dict(take('model.vision_tower.'), strict=True)
    self.mm_projector.load_state_dict(take('model.mm_projector.'), strict=True)
    llm = {
      k: v for k, v in state.items() if not k.startswith(('model.vision', 'model.mm_projector'))
    }
    self.llm.load_state_dict(llm, strict=True)

  def forward(self, ids, pixels):
    x = torch.as_tensor(pixels, dtype=torch.float32) / 255.0
    visual = self.mm_projector(self.vision_tower(((x - MEAN) / STD).permute(2, 0, 1)))
    at = ids.index(bf.IMAGE_TOKEN_INDEX)
    embed = self.llm.model.embed_tokens
    x = torch.cat([embed(torch.tensor(ids[:at])), visual, embed(torch.tensor(ids[at + 1 :]))])
    return self.llm(inputs_embeds=x[None]).logits[0]


def test_evejax_matches_independent_torch_eve_v1_with_image(exported):
  params, folder = exported
  pixels = np.random.default_rng(0).integers(0, 256, (2 * 28, 3 * 28, 3), dtype=np.uint8)
  model = TorchEVEv1(CFG)
  model.load(load_state_dict(folder))
  with torch.no_grad():
    want = model(IDS, pixels).numpy()
  groups, grid = images.patchify(images.with_valid_channel(pixels, 28), 14, 2)
  example = encode.encode_example(IDS, [True] * len(IDS), [(groups, grid)])
  row = encode.pack_row(
    [example], BatchSpec.for_model(CFG, seq_len=len(example['tokens']), patch_slots=len(groups))
  )
  got = np.asarray(evejax_model(CFG, params)({k: v[None] for k, v in row.items()}))[0]
  assert got.shape == want.shape == (len(IDS) - 1 + 1 + 2 * 4, CFG.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
