"""Analytic FLOPs vs XLA's cost analysis, MFU and the peak table, throughput, profiler window."""

import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.metrics import ProfileWindow, Throughput, batch_counts, flops
from evejax.models import EVE, ModelConfig
from evejax.train.step import TrainState, make_train_step

# Small, but with matmuls that dominate the elementwise work, as in real models.
CFG = dict(
  vocab_size=256,
  hidden_size=128,
  intermediate_size=384,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  vision_patch_size=4,
  vision_merge=2,
  vision_hidden_size=64,
)
ROWS, SEQ_LEN, PATCH_GROUPS = 2, 128, 32


def spec_of(cfg: ModelConfig) -> BatchSpec:
  return BatchSpec.for_model(cfg, seq_len=SEQ_LEN, patch_slots=PATCH_GROUPS)


def dummy_batch(cfg: ModelConfig) -> dict:
  shape = (ROWS, SEQ_LEN)
  group, features = cfg.vision_merge**2, cfg.vision_patch_size**2 * 3
  kind = np.zeros(shape, np.int32)
  kind[:, 1:33] = bf.PATCH  # Half the rows' tokens visual: both routing branches run anyway.
  return dict(
    tokens=jnp.ones(shape, jnp.int32),
    token_kind=jnp.asarray(kind),
    patch_index=jnp.zeros(shape, jnp.int32),
    positions=jnp.broadcast_to(jnp.arange(SEQ_LEN, dtype=jnp.int32), shape),
    segment_ids=jnp.ones(shape, jnp.int32),
    targets=jnp.ones(shape, jnp.int32),
    loss_weights=jnp.ones(shape, jnp.float32),
    patches=jnp.zeros((ROWS, PATCH_GROUPS, group, features), jnp.uint8),
  )


@pytest.mark.parametrize('moe_part', ['layernorm-self_attn-mlp', ''])
def test_analytic_flops_match_xla_cost_analysis(moe_part):
  cfg = ModelConfig(**CFG, moe_part=moe_part)
  graphdef, state = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params, batch = nnx.to_pure_dict(state), dummy_batch(cfg)
  tx = optax.sgd(0.1)
  train_step = make_train_step(graphdef, tx, optax.constant_schedule(0.1))
  train_state = TrainState.create(params, tx.init(params))
  xla = train_step.lower(train_state, batch).compile().cost_analysis()['flops']
  analytic = flops.train_step_flops(cfg, spec_of(cfg), ROWS)
  assert abs(analytic / xla - 1) < 0.10, (analytic, xla)

  forward = jax.jit(lambda p, b: nnx.merge(graphdef, nnx.State(p))(b))
  xla_forward = forward.lower(params, batch).compile().cost_analysis()['flops']
  analytic_forward = sum(flops.forward_flops(cfg, spec_of(cfg), ROWS).values())
  assert abs(analytic_forward / xla_forward - 1) < 0.10, (analytic_forward, xla_forward)


def test_decomposition_doubles_only_the_decomposed_parts():
  forward = lambda cfg: flops.forward_flops(cfg, spec_of(cfg), ROWS)
  full = forward(ModelConfig(**CFG))
  dense = forward(ModelConfig(**CFG, moe_part=''))
  assert full['decoder_linear'] == 2 * dense['decoder_linear']
  one_branch = forward(ModelConfig(**CFG, routing='sorted'))
  assert one_branch == dense  # `sorted` routing runs one branch per token.
  assert {k: v for k, v in full.items() if k != 'decoder_linear'} == {
    k: v for k, v in dense.items() if k != 'decoder_linear'
  }
  # Attention by hand: per layer, row and head, q @ k.T and p @ v, each 2 * L * L * H FLOPs.
  layers, heads, head_dim = CFG['num_layers'], CFG['num_heads'], CFG['head_dim']
  assert dense['attention'] == layers * ROWS * heads * 2 * (2 * SEQ_LEN * SEQ_LEN * head_dim)


def test_peak_table_and_mfu():
  assert flops.peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops_per_device('TPU v5 lite') == 197e12
  assert flops.peak_flops_per_device('TPU v5p') == 459e12
  assert flops.peak_flops_per_device('cpu') is None
  assert flops.peak_flops_per_device('cpu', override=1e12) == 1e12
  # 4e14 FLOPs per step at 2 steps/s on 4 chips of 1e15 peak: 20%.
  assert flops.mfu(4e14, 2.0, 4, 1e15) == pytest.approx(0.2)


def test_batch_counts_and_throughput_window():
  segment_ids = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
  token_kind = np.array([[bf.CLASS, bf.PATCH, bf.TEXT, bf.CLASS, bf.TEXT, bf.TEXT], [bf.TEXT] * 6])
  assert batch_counts({'segment_ids': segment_ids, 'token_kind': token_kind}) == (7, 2)
  meter = Throughput(flops_per_step=3e12, num_devices=2, peak_flops=5e12)
  meter.add(0.5, tokens=7, images=2)
  meter.add(1.5, tokens=9, images=2)
  scalars = meter.scalars()
  assert scalars == pytest.approx(
    {
      'step_time_s': 1.0,
      'tokens_per_s': 8.0,
      'images_per_s': 2.0,
      'tflops_per_device': 1.5,
      'mfu': 0.3,
    }
  )
  assert meter.scalars() == {}  # A new window starts after each report.
  unknown_peak = Throughput(1e12, 1, None)
  unknown_peak.add(1.0, 1, 0)
  assert set(unknown_peak.scalars()) == {
    'step_time_s',
    'tokens_per_s',
    'images_per_s',
    'tflops_per_device',
  }


def test_profile_window_writes_a_trace_of_the_chosen_steps(tmp_path):
  window = ProfileWindow(str(tmp_path), first_step=2, num_steps=2)
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  for step in range(1, 6):
    window.step_begins(step, x)
    x = f(x) / 64
  window.stop(x)
  assert glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert not ProfileWindow(str(tmp_path / 'off'), 2, 0).enabled
