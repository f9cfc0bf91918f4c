"""Every attention implementation against the XLA oracle (a masked softmax written here in NumPy
checks the oracle itself): packed rows with several segments and padding, values and gradients.
On CPU the Pallas kernels (TPU splash, GPU Triton flash) run in interpret mode; on a GPU the same
tests run cuDNN and the compiled Triton kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.models import attention
from tests.fake_devices import run_with_devices

ON_GPU = jax.default_backend() == 'gpu'
# (name, function); bf16 for cuDNN, which has no fp32 flash kernel.
KERNELS = [
  ('pallas-tpu', lambda *a: attention.flash_attention(*a, kernel='tpu', interpret=True)),
  ('pallas-gpu', lambda *a: attention.flash_attention(*a, kernel='gpu', interpret=not ON_GPU)),
]
if ON_GPU:
  KERNELS = KERNELS[1:] + [('cudnn', lambda *a: attention.self_attention(*a, 'cudnn'))]


def packed_inputs(seed=0, rows=2, length=256, heads=4, kv_heads=2, head_dim=64):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(rows, length, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(rows, length, kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(rows, length, kv_heads, head_dim)).astype(np.float32)
  segments = np.zeros((rows, length), np.int32)
  segments[0, :100], segments[0, 100:190], segments[0, 190:250] = 1, 2, 3  # three + padding
  segments[-1, : length - 31] = 1  # one segment + padding
  return q, k, v, segments


def numpy_attention(q, k, v, segments):
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  allowed = np.tril(np.ones((t, t), bool)) & (segments[:, :, None] == segments[:, None, :])
  scores = np.where(allowed[:, None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bnqk,bknh->bqnh', weights, v)


def test_xla_oracle_matches_numpy():
  q, k, v, seg = packed_inputs()
  got = attention.self_attention(*map(jnp.asarray, (q, k, v, seg)), 'xla')
  np.testing.assert_allclose(got, numpy_attention(q, k, v, seg), atol=1e-5)


@pytest.mark.parametrize('name,kernel', KERNELS, ids=[n for n, _ in KERNELS])
def test_fused_kernels_match_xla_values_and_gradients(name, kernel):
  q, k, v, seg = packed_inputs(seed=1)
  dtype = jnp.bfloat16 if name == 'cudnn' else jnp.float32
  tol = {'cudnn': 2e-2, 'pallas-gpu': 2e-3 if ON_GPU else 1e-5}.get(name, 1e-5)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  seg = jnp.asarray(seg)
  real = np.asarray(seg > 0)[:, :, None, None]  # padding outputs carry no loss: not compared
  probe = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), dtype) * real

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v, seg).astype(jnp.float32) * probe).sum()

  oracle = lambda q, k, v, s: attention.self_attention(q, k, v, s, 'xla')
  want = np.asarray(oracle(q, k, v, seg), np.float32)
  got = np.asarray(jax.jit(kernel)(q, k, v, seg), np.float32)
  np.testing.assert_allclose(got * real, want * real, atol=tol, rtol=tol)
  grads_want = jax.grad(loss(oracle), argnums=(0, 1, 2))(q, k, v)
  grads_got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(grads_got, grads_want):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol * 4, rtol=tol * 4
    )


def test_segment_runs_are_cudnn_ragged_layout():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  offsets, lengths = attention.segment_runs(seg, max_runs=4)
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 3, 2, -1], [7, -1, -1, -1]])


def test_cache_attention_is_self_attention_of_the_written_slots():
  """A decode step over a cache (left-padded prompt, never-written slots at -1) equals the last
  row of self-attention over the whole sequence."""
  q, k, v, _ = packed_inputs(seed=3, rows=1, length=16)
  seg = np.ones((1, 16), np.int32)
  seg[0, :5] = 0  # left padding
  full = attention.self_attention(*map(jnp.asarray, (q, k, v, seg)), 'xla')
  cache_k = np.zeros((1, 24, *k.shape[2:]), np.float32)
  cache_v = np.zeros_like(cache_k)
  cache_k[:, :16], cache_v[:, :16] = k, v
  cache_seg = np.full((1, 24), -1, np.int32)
  cache_seg[:, :16] = seg
  got = attention.cache_attention(
    *map(jnp.asarray, (q[:, -1:], cache_k, cache_v, seg[:, -1:], cache_seg))
  )
  np.testing.assert_allclose(got[:, 0], full[:, -1], atol=1e-5)


def test_unsupported_combinations_are_clear_errors():
  if not ON_GPU:
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
      attention.resolve('cudnn')
  q, k, v, seg = packed_inputs(length=100)
  with pytest.raises(ValueError, match='multiple of 128'):
    attention.flash_attention(*map(jnp.asarray, (q, k, v, seg)), kernel='tpu', interpret=True)


def test_model_with_fused_attention_matches_xla_logits_and_gradients():
  """A tiny EVEv2 on packed rows (several segments, padding): the Pallas kernel in the model
  gives the XLA path's logits and parameter gradients."""
  import dataclasses  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415

  from evejax.batch import BatchSpec  # noqa: PLC0415
  from evejax.models import EVE, ModelConfig  # noqa: PLC0415
  from evejax.models.presets import model_preset  # noqa: PLC0415
  from evejax.sharding.synthetic import random_batch  # noqa: PLC0415

  cfg = dataclasses.replace(ModelConfig(**model_preset('eve_v2_tiny')), num_layers=2)
  spec = BatchSpec.for_model(cfg, seq_len=128, patch_slots=16)
  batch = random_batch(spec, 2, cfg.vocab_size, seed=3)
  batch['segment_ids'][0, 60:] = np.where(batch['segment_ids'][0, 60:] > 0, 2, 0)  # pack a second
  batch['positions'][0, 60:] -= 60
  batch = jax.tree.map(jnp.asarray, batch)
  real = (batch['segment_ids'] > 0)[..., None]

  def logits_and_grads(implementation):
    model = EVE(dataclasses.replace(cfg, attention=implementation), rngs=nnx.Rngs(0))
    loss = lambda m: ((m(batch) * real) ** 2).mean()
    return model(batch) * real, nnx.grad(loss)(model)

  want, grads_want = logits_and_grads('xla')
  got, grads_got = logits_and_grads('pallas')
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, w in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


# Run in a process of its own with 4 CPU devices (tests/test_attention.py as a script).
PER_DEVICE = """
import jax, jax.numpy as jnp, numpy as np
from evejax import sharding
from evejax.models import attention
from tests.test_attention import numpy_attention, packed_inputs

q, k, v, seg = packed_inputs(seed=4, rows=4)
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
fn = jax.jit(lambda *a: attention.self_attention(*a, 'pallas'))
with jax.set_mesh(mesh):
  args = [jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh)) for x in (q, k, v, seg)]
  assert 'shard_map' in str(jax.make_jaxpr(fn)(*args))  # the kernel runs on each device's shard
  got = np.asarray(fn(*args))
real = (seg > 0)[:, :, None, None]
np.testing.assert_allclose(got * real, numpy_attention(q, k, v, seg) * real, atol=1e-5)
"""


def test_pallas_attention_runs_per_device_under_a_mesh():
  """GSPMD cannot partition a Pallas (Mosaic) kernel: under a mesh it runs on each device's rows
  (fsdp) and heads (tensor), and equals the NumPy oracle."""
  run_with_devices(['-c', PER_DEVICE], devices=4)
