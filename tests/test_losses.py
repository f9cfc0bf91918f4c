import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from evejax.batch import BatchSpec
from evejax.models import EVE, ModelConfig
from evejax.models.presets import model_preset
from evejax.sharding.synthetic import random_batch
from evejax.train import losses
from evejax.train.pal import PalObjective, offline_teacher
from evejax.train.step import TrainState, make_train_step


def test_loss_ignores_masked_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 6)).astype(np.int32)
  weights = np.array([[0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], np.float32)
  nll, correct = losses.token_losses(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
  )
  loss = losses.weighted_mean(nll, jnp.asarray(weights))

  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [-logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(weights))]
  np.testing.assert_allclose(loss, np.mean(picked), rtol=1e-6)
  # Changing logits or targets at masked positions changes nothing.
  logits2, targets2 = logits.copy(), targets.copy()
  logits2[weights == 0] = 100 * rng.normal(size=logits2[weights == 0].shape)
  targets2[weights == 0] = 0
  nll2, correct2 = losses.token_losses(
    jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(weights)
  )
  np.testing.assert_allclose(losses.weighted_mean(nll2, jnp.asarray(weights)), loss, rtol=1e-6)
  np.testing.assert_array_equal(correct2, correct)
  want_correct = (logits.argmax(-1) == targets) * weights
  np.testing.assert_array_equal(correct, want_correct)


def test_chunked_loss_equals_full_logits_values_and_gradients():
  """Chunks of 5 over 23 positions (a ragged last chunk): the same per-position losses,
  correctness and gradients (hidden states and head weights) as one [B, T, vocab] pass."""
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 23, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, (2, 23)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 23)) < 0.6, jnp.float32)

  def loss(hidden, kernel, chunk):
    head = lambda h: jnp.tanh(h) @ kernel
    nll, correct = losses.chunked_token_losses(hidden, head, targets, weights, chunk)
    return losses.weighted_mean(nll, weights), (nll, correct)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (full, (nll, correct)), grads = grad(hidden, kernel, 0)
  (chunked, (nll_c, correct_c)), grads_c = grad(hidden, kernel, 5)
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  np.testing.assert_allclose(nll_c, nll, atol=1e-6)
  np.testing.assert_array_equal(correct_c, correct)
  for g_c, g in zip(grads_c, grads):
    np.testing.assert_allclose(g_c, g, atol=1e-6)


def test_chunked_loss_never_holds_the_full_logits():
  """XLA's memory analysis of the compiled gradient: the unchunked loss holds several [B, T, vocab]
  float32 buffers; chunks of 1/8 of the positions hold about 1/8 of that."""
  b, t, d, vocab = 2, 512, 16, 4096
  hidden = jnp.ones((b, t, d))
  kernel = jnp.ones((d, vocab))
  targets = jnp.zeros((b, t), jnp.int32)
  weights = jnp.ones((b, t))

  def temp_bytes(chunk):
    def loss(hidden, kernel):
      nll, _ = losses.chunked_token_losses(hidden, lambda h: h @ kernel, targets, weights, chunk)
      return nll.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = temp_bytes(0)
  assert full >= b * t * vocab * 4
  assert temp_bytes(64) < full / 6


@pytest.mark.parametrize('pal', [False, True], ids=['eve_v2', 'eve_v1_pal'])
def test_train_step_with_chunked_loss_matches_the_full_loss(pal):
  """The whole train step (EVEv2; EVEv1 with the PAL term, offline teacher): loss, metrics and
  updated parameters with logits 16 positions at a time equal those of one pass over all 48. (The
  eval step computes the same `_loss_metrics`.)"""
  preset = model_preset('eve_v1_tiny' if pal else 'eve_v2_tiny')
  cfg = ModelConfig(**{**preset, 'pal': pal, 'num_layers': 2})
  spec = BatchSpec.for_model(
    cfg, seq_len=48, patch_slots=8, teacher_size=cfg.pal_teacher_size * pal
  )
  batch = jax.tree.map(jnp.asarray, random_batch(spec, 3, cfg.vocab_size, seed=2))
  graphdef, params = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.sgd(0.1)
  objective = PalObjective(1.0, offline_teacher) if pal else None

  def run(loss_chunk):
    step = make_train_step(
      graphdef, tx, optax.constant_schedule(0.1), pal=objective, loss_chunk=loss_chunk
    )
    state = TrainState.create(jax.tree.map(jnp.copy, params), tx.init(params))
    state, (metrics, _) = step(state, batch)
    return state.params, [m.compute() for m in metrics]

  params_full, metrics_full = run(0)
  params_chunked, metrics_chunked = run(16)
  for g, w in zip(jax.tree.leaves(metrics_chunked), jax.tree.leaves(metrics_full)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree.leaves(params_chunked), jax.tree.leaves(params_full)):
    np.testing.assert_allclose(g, w, atol=1e-6)
