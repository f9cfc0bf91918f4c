"""Non-finite guard: the jitted step skips bad updates exactly; the guard stops or counts; and
through the CLI an exploding run stops with a message naming the step and last good checkpoint."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.config import GuardConfig
from evejax.models import EVE, ModelConfig
from evejax.train.guard import NonFiniteError, NonFiniteGuard
from evejax.train.step import TrainState, make_train_step
from tests.conftest import TINY

REPO = __file__.rsplit('/tests/', 1)[0]


def tiny_batch(loss_weight: float) -> dict:
  shape = (2, 16)
  cfg = ModelConfig(**TINY)
  group, features = cfg.vision_merge**2, cfg.vision_patch_size**2 * 3
  return dict(
    tokens=jnp.ones(shape, jnp.int32),
    token_kind=jnp.full(shape, bf.TEXT, jnp.int32),
    patch_index=jnp.zeros(shape, jnp.int32),
    positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), shape),
    segment_ids=jnp.ones(shape, jnp.int32),
    targets=jnp.full(shape, 2, jnp.int32),
    loss_weights=jnp.full(shape, loss_weight, jnp.float32),
    patches=jnp.zeros((2, 1, group, features), jnp.uint8),
  )


def test_skip_mode_keeps_params_and_optimizer_state_on_a_non_finite_batch():
  graphdef, state = nnx.split(EVE(ModelConfig(**TINY), rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)
  tx = optax.adam(1e-2)
  step = make_train_step(graphdef, tx, optax.constant_schedule(1e-2), skip_nonfinite=True)
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  before = TrainState.create(params, tx.init(params))
  expected = copy((before.params, before.opt_state))

  after, (loss_metrics, _) = step(copy(before), tiny_batch(float('inf')))
  assert not np.isfinite(float(loss_metrics[0].loss.total))
  assert int(after.step) == 1  # The step (and the data) moves on ...
  for got, want in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)  # ... the weights and moments do not.

  updated, _ = step(after, tiny_batch(1.0))
  assert not np.array_equal(updated.params['lm_head']['kernel'], expected[0]['lm_head']['kernel'])


def test_guard_stop_names_step_and_last_checkpoint():
  guard = NonFiniteGuard(GuardConfig('stop', max_skipped=10))
  assert guard.check(5, 1.0, 2.0, lambda: 'unused')
  with pytest.raises(
    NonFiniteError,
    match=r'non-finite gradients at step 6 .*'
    r'Last good checkpoint: /w/checkpoints/4\.',
  ):
    guard.check(6, 1.0, float('inf'), lambda: 'Last good checkpoint: /w/checkpoints/4')


def test_guard_skip_counts_then_stops():
  guard = NonFiniteGuard(GuardConfig('skip', max_skipped=2))
  assert not guard.check(3, float('nan'), 1.0, lambda: 'none')
  assert not guard.check(4, float('nan'), 1.0, lambda: 'none')
  assert guard.skipped == 2
  with pytest.raises(NonFiniteError, match='after skipping 2 steps: non-finite loss at step 5'):
    guard.check(5, float('nan'), 1.0, lambda: 'none')
  with pytest.raises(ValueError, match="guard.nonfinite='ignore'"):
    GuardConfig('ignore', 1)


@pytest.mark.slow  # ~20 s; the jitted skip and the guard are tested above in-process.
def test_cli_exploding_run_skips_then_stops_with_a_clear_message(tmp_path):
  """lr=1e30: step 1 (warm-up lr 0) is fine, its update makes the weights huge, then losses are
  NaN; skip mode skips two such steps and then stops."""
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'evejax.train',
      '--config=configs/demo.py',
      f'--workdir={tmp_path}',
      '--config.total_steps=8',
      '--config.log_every=1',
      '--config.data.num_train=200',
      '--config.model.num_layers=1',
      '--config.batch_size=4',
      '--config.optim.lr=1e30',
      '--config.optim.warmup_steps=2',
      '--config.guard.nonfinite=skip',
      '--config.guard.max_skipped=2',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('NonFiniteError: Training stopped after skipping 2 steps'), last_line
  assert f'Last good checkpoint: {tmp_path}/checkpoints/1.' in last_line
  assert 'Traceback' not in result.stderr
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  skipped = [r['train/skipped_steps'] for r in rows if 'train/skipped_steps' in r]
  assert skipped[0] == 0 and skipped[-1] == 2
