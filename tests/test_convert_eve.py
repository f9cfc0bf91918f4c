"""EVEv2 with images: evejax logits against an independent PyTorch EVEv2 written here from
EVE_REFERENCE.md §3.3-3.4, which loads the exported official state dict with strict key checks."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from safetensors.torch import load_file  # noqa: E402
from test_convert import evejax_model, random_params, tiny_eve_cfg  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from evejax import batch as bf  # noqa: E402
from evejax import convert  # noqa: E402
from evejax.batch import BatchSpec  # noqa: E402
from evejax.convert import torch_reference  # noqa: E402
from evejax.data import encode, images  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
IDS = [5, 6, bf.IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11]


class RMSNorm(nn.Module):
  def __init__(self, d, eps):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

  def forward(self, x):
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Attention(nn.Module):
  """q/k/v/o with vision copies; one causal attention over all tokens (GQA, rotate-half RoPE)."""

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for prefix in ('', 'moe_'):
      setattr(self, f'{prefix}q_proj', nn.Linear(d, q))
      setattr(self, f'{prefix}k_proj', nn.Linear(d, kv))
      setattr(self, f'{prefix}v_proj', nn.Linear(d, kv))
      setattr(self, f'{prefix}o_proj', nn.Linear(q, d, bias=False))

  def rope(self, x):  # (heads, L, hd)
    hd, length = x.shape[-1], x.shape[1]
    inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin

  def forward(self, h, m):
    cfg, length = self.cfg, h.shape[0]
    blend = lambda name, x: getattr(self, name)(x) * (1 - m) + getattr(self, 'moe_' + name)(x) * m
    q = blend('q_proj', h).view(length, cfg.num_heads, -1).transpose(0, 1)
    k = blend('k_proj', h).view(length, cfg.num_kv_heads, -1).transpose(0, 1)
    v = blend('v_proj', h).view(length, cfg.num_kv_heads, -1).transpose(0, 1)
    q, k = self.rope(q), self.rope(k)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(cfg.head_dim)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attn = scores.masked_fill(~causal, float('-inf')).softmax(-1) @ v
    return blend('o_proj', attn.transpose(0, 1).reshape(length, -1))


class MLP(nn.Module):
  def __init__(self, d, f):
    super().__init__()
    self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.self_attn = Attention(cfg)
    self.mlp, self.moe_mlp = MLP(d, cfg.intermediate_size), MLP(d, cfg.intermediate_size)
    self.input_layernorm, self.moe_input_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
    self.post_attention_layernorm = RMSNorm(d, eps)
    self.moe_post_attention_layernorm = RMSNorm(d, eps)

  def forward(self, x, m):
    blend = lambda a, b, h: a(h) * (1 - m) + b(h) * m  # the reference's dense blend routing
    x = x + self.self_attn(blend(self.input_layernorm, self.moe_input_layernorm, x), m)
    h = blend(self.post_attention_layernorm, self.moe_post_attention_layernorm, x)
    return x + blend(self.mlp, self.moe_mlp, h)


class VisionTokenizer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    c, d = cfg.vision_hidden_size, cfg.hidden_size
    self.patch_embedding = nn.Sequential(
      nn.Conv2d(3, c, cfg.vision_patch_size, stride=cfg.vision_patch_size),
      nn.GELU(),
      nn.Conv2d(c, d, cfg.vision_merge, stride=cfg.vision_merge),
    )
    self.class_embedding, self.split_embedding = (
      nn.Parameter(torch.randn(d)),
      nn.Parameter(torch.randn(d)),
    )

  def forward(self, pixels):  # (3, H, W) normalised
    x = self.patch_embedding(pixels[None])[0]
    split = self.split_embedding[:, None, None].repeat(1, x.shape[1], 1)
    x = torch.cat([x, split], -1).flatten(1).transpose(0, 1)
    return torch.cat([self.class_embedding[None], x])


class Body(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.vision_tower = VisionTokenizer(cfg)


class TorchEVEv2(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.model = Body(cfg)
    self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

  def forward(self, ids, pixels):
    """ids with one -200 placeholder; pixels (H, W, 3) uint8."""
    x = torch.as_tensor(pixels, dtype=torch.float32) / 255.0
    visual = self.model.vision_tower(((x - MEAN) / STD).permute(2, 0, 1))
    at = ids.index(bf.IMAGE_TOKEN_INDEX)
    embed = self.model.embed_tokens
    x = torch.cat([embed(torch.tensor(ids[:at])), visual, embed(torch.tensor(ids[at + 1 :]))])
    m = torch.zeros(x.shape[0], 1)
    m[at : at + len(visual)] = 1
    for layer in self.model.layers:
      x = layer(x, m)
    return self.lm_head(self.model.norm(x))


def evejax_inputs(cfg, pixels):
  groups, grid = images.patchify(pixels, cfg.vision_patch_size, cfg.vision_merge)
  example = encode.encode_example(IDS, [True] * len(IDS), [(groups, grid)])
  row = encode.pack_row(
    [example], BatchSpec.for_model(cfg, seq_len=len(example['tokens']), patch_slots=len(groups))
  )
  return {k: jnp.asarray(v)[None] for k, v in row.items()}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  cfg = tiny_eve_cfg()
  params = random_params(cfg, seed=1)
  folder = str(tmp_path_factory.mktemp('eve'))
  convert.export_eve(params, cfg, folder, dtype='float32', max_shard_bytes=30_000, progress=False)
  t = cfg.vision_patch_size * cfg.vision_merge  # One visual token, in pixels.
  pixels = np.random.default_rng(0).integers(0, 256, (2 * t, 3 * t, 3), dtype=np.uint8)
  return cfg, params, folder, pixels


def load_state_dict(folder):
  state = {}
  for path in convert.files.checkpoint_files(folder):
    state.update(load_file(path))
  return state


def test_evejax_matches_independent_torch_eve_v2_with_image(exported):
  cfg, params, folder, pixels = exported
  model = TorchEVEv2(cfg)
  state = load_state_dict(folder)
  model.load_state_dict(state, strict=True)  # exact official key set
  with torch.no_grad():
    want = model(IDS, pixels).numpy()
  got = np.asarray(evejax_model(cfg, params)(evejax_inputs(cfg, pixels)))[0]
  assert got.shape == want.shape == (len(IDS) - 1 + 1 + 2 * 4, cfg.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The vision copies matter: with text weights in their place the logits move.
  model.load_state_dict({k: state[k.replace('moe_', '')] for k in state})
  with torch.no_grad():
    assert np.abs(model(IDS, pixels).numpy() - got).max() > 1e-2


def test_packaged_torch_reference_matches_the_test_model(exported):
  """The PyTorch forward the parity CLI uses (evejax.convert.torch_reference) agrees too."""
  cfg, _, folder, pixels = exported
  model = TorchEVEv2(cfg)
  model.load_state_dict(load_state_dict(folder), strict=True)
  reference = torch_reference.TorchEVE.from_folder(folder)
  with torch.no_grad():
    want = model(IDS, pixels).numpy()
    got = reference.logits(IDS, [pixels]).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
