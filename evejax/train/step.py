"""The jitted, purely functional train and eval steps (the NNX graph is split once, outside).

No `from __future__ import annotations` here: clu reads the metric classes from the annotations.
"""

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import nnx

from evejax.models.pal import PalObjective
from evejax.train import losses

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """What a checkpoint restores for an exact resume (with the data-iterator state)."""
  step: Array
  params: Any  # pure dict of parameter arrays
  opt_state: Any
  # The run's base key as raw uint32 key data (`jax.random.key_data`), for stochastic ops; None
  # where nothing random is drawn (step tests, memory planning).
  rng: Optional[Array] = None


@flax.struct.dataclass
class TokenMetrics(metrics.Collection):
  """Averages over supervised (caption / answer) tokens."""
  loss: metrics.Average.from_output('nll')
  accuracy: metrics.Average.from_output('correct')


@flax.struct.dataclass
class PalTokenMetrics(TokenMetrics):
  """TokenMetrics plus the EVEv1 patch-aligning loss (unweighted), when PAL is on."""
  pal_loss: metrics.Average.from_output('pal')


@flax.struct.dataclass
class StepMetrics(metrics.Collection):
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


def _token_metrics(graphdef: nnx.GraphDef, params, batch,
                   pal: Optional[PalObjective] = None) -> tuple[Array, TokenMetrics]:
  """Cross-entropy on supervised tokens, plus `pal.weight` x the PAL loss when `pal` is given."""
  model = nnx.merge(graphdef, nnx.State(params))
  weights = batch['loss_weights']
  logits, pal_loss = (model(batch), None) if pal is None else pal(model, batch)
  nll, correct = losses.token_losses(logits, batch['targets'], weights)
  loss = losses.weighted_mean(nll, weights)
  token_metrics = TokenMetrics.single_from_model_output(nll=nll, correct=correct, mask=weights > 0)
  if pal is None:
    return loss, token_metrics
  return loss + pal.weight * pal_loss, PalTokenMetrics(
      _reduction_counter=token_metrics._reduction_counter, loss=token_metrics.loss, accuracy=token_metrics.accuracy,
      pal_loss=metrics.Average.from_model_output(pal_loss))


def _frozen_as_constants(params, trainable):
  """`trainable` (optim.trainable_mask, bools like the params; None = all): frozen parameters
  become constants of the loss, so no weight gradient is computed (or held) for them."""
  if trainable is None:
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def _loss_and_grads(graphdef: nnx.GraphDef, params, batch, microbatches: int,
                    pal: Optional[PalObjective] = None, trainable: Any = None):
  """Loss, token metrics and gradients of the whole batch. With `microbatches` > 1 a `lax.scan`
  over batch slices accumulates them (the same result, a fraction of the activation memory)."""
  grad_fn = jax.value_and_grad(
      lambda p, b: _token_metrics(graphdef, _frozen_as_constants(p, trainable), b, pal),
      has_aux=True)
  if microbatches == 1:
    (loss, token_metrics), grads = grad_fn(params, batch)
    return loss, token_metrics, grads
  rows = batch['tokens'].shape[0]
  if rows % microbatches:
    raise ValueError(f'batch_size {rows} is not a multiple of microbatches={microbatches}')
  # Microbatch m takes rows m, m + M, ...: each stays spread over the batch-sharded devices.
  split = jax.tree.map(lambda x: x.reshape(rows // microbatches, microbatches, *x.shape[1:])
                       .swapaxes(0, 1), batch)
  total_weight = jnp.maximum(batch['loss_weights'].sum(), 1.0)

  def accumulate(carry, micro):
    (loss, token_metrics), grads = grad_fn(params, micro)
    # Each microbatch loss is its own weighted mean: rescale it to its share of the whole batch.
    share = jnp.maximum(micro['loss_weights'].sum(), 1.0) / total_weight
    loss_sum, grad_sum = carry
    grad_sum = jax.tree.map(lambda acc, g: acc + share * g, grad_sum, grads)
    return (loss_sum + share * loss, grad_sum), token_metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), stacked_metrics = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), split)
  return loss, stacked_metrics.reduce(), grads


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, skip_nonfinite: bool = False,
                    trainable: Any = None,
                    microbatches: int = 1, pal: Optional[PalObjective] = None) -> Callable:
  """`skip_nonfinite`: a step whose loss or gradients are not finite leaves params and opt_state
  unchanged (the step counter still advances, past the bad batch). `microbatches`: gradient
  accumulation over that many slices of each batch inside the step. `pal`: EVEv1's patch-aligning
  term added to the loss (evejax/models/pal.py); None leaves the loss pure cross-entropy."""
  def train_step(state: TrainState, batch) -> tuple[TrainState, tuple[TokenMetrics, StepMetrics]]:
    loss, token_metrics, grads = _loss_and_grads(graphdef, state.params, batch, microbatches, pal,
                                                 trainable)
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
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            (token_metrics, step_metrics))

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, pal: Optional[PalObjective] = None) -> Callable:
  def eval_step(params, batch) -> TokenMetrics:
    return _token_metrics(graphdef, params, batch, pal)[1]

  return jax.jit(eval_step)
