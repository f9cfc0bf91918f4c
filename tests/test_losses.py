import jax.numpy as jnp
import numpy as np

from evejax.train import losses


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
