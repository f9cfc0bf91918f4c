"""The jitted, purely functional train and eval steps (the NNX graph is split once, outside).

No `from __future__ import annotations` here: clu reads the metric classes from the annotations.
"""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import nnx

from evejax.train import losses

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any  # pure dict of parameter arrays
  opt_state: Any


@flax.struct.dataclass
class TokenMetrics(metrics.Collection):
  """Averages over supervised (caption / answer) tokens."""
  loss: metrics.Average.from_output('nll')
  accuracy: metrics.Average.from_output('correct')


@flax.struct.dataclass
class StepMetrics(metrics.Collection):
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


def _token_metrics(graphdef: nnx.GraphDef, params, batch) -> tuple[Array, TokenMetrics]:
  model = nnx.merge(graphdef, nnx.State(params))
  weights = batch['loss_weights']
  nll, correct = losses.token_losses(model(batch), batch['targets'], weights)
  return losses.weighted_mean(nll, weights), TokenMetrics.single_from_model_output(
      nll=nll, correct=correct, mask=weights > 0)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, skip_nonfinite: bool = False) -> Callable:
  """`skip_nonfinite`: a step whose loss or gradients are not finite leaves params and opt_state
  unchanged (the step counter still advances, past the bad batch)."""
  def train_step(state: TrainState, batch) -> tuple[TrainState, tuple[TokenMetrics, StepMetrics]]:
    grad_fn = jax.value_and_grad(lambda p: _token_metrics(graphdef, p, batch), has_aux=True)
    (loss, token_metrics), grads = grad_fn(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
    step_metrics = StepMetrics.single_from_model_output(
        grad_norm=grad_norm, param_norm=optax.global_norm(params),
        learning_rate=schedule(state.step))
    return TrainState(state.step + 1, params, opt_state), (token_metrics, step_metrics)

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  def eval_step(params, batch) -> TokenMetrics:
    return _token_metrics(graphdef, params, batch)[1]

  return jax.jit(eval_step)
