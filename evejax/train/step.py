"""The jitted, purely functional train and eval steps (the NNX graph is split once, outside).

No `from __future__ import annotations` here: clu reads the metric classes from the annotations.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import nnx

from evejax.train import losses
from evejax.train.pal import PalObjective

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint stores of the model side of a run."""

  step: Array  # () int32: steps done
  params: Any  # pure dict of parameter arrays
  opt_state: Any
  rng: Array  # (2,) uint32: the run's base key data, for stochastic ops (none in the recipes yet)

  @classmethod
  def create(cls, params, opt_state, seed: int = 0) -> 'TrainState':
    """Step 0 and the base key of `seed`, as host arrays: place them where the run needs them. From
    host memory because a device array put on a mesh that spans other processes' devices yields a
    global array Orbax cannot save when each process has one device (jax 0.10)."""
    return cls(
      step=np.zeros((), np.int32),
      params=params,
      opt_state=opt_state,
      rng=np.asarray(jax.random.key_data(jax.random.key(seed))),
    )


@flax.struct.dataclass
class TokenMetrics(metrics.Collection):
  """Averages over supervised (caption / answer) tokens."""

  loss: metrics.Average.from_output('nll')
  accuracy: metrics.Average.from_output('correct')


@flax.struct.dataclass
class PalMetrics(metrics.Collection):
  """The EVEv1 patch-aligning loss (unweighted), when PAL is on."""

  pal_loss: metrics.Average.from_output('pal')


LossMetrics = tuple[metrics.Collection, ...]  # TokenMetrics first, then PalMetrics with PAL


@flax.struct.dataclass
class StepMetrics(metrics.Collection):
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


def _loss_metrics(
  graphdef: nnx.GraphDef, params, batch, pal: PalObjective | None, loss_chunk: int
) -> tuple[Array, LossMetrics]:
  """Cross-entropy on supervised tokens (logits `loss_chunk` positions at a time), plus
  `pal.weight` x the PAL loss when `pal` is given."""
  model = nnx.merge(graphdef, nnx.State(params))
  weights = batch['loss_weights']  # [B, L]
  hidden, pal_loss = (model.hidden_states(batch)[0], None) if pal is None else pal(model, batch)
  nll, correct = losses.chunked_token_losses(
    hidden, model.logits, batch['targets'], weights, loss_chunk
  )
  loss = losses.weighted_mean(nll, weights)
  collected = (TokenMetrics.single_from_model_output(nll=nll, correct=correct, mask=weights > 0),)
  if pal is None:
    return loss, collected
  return loss + pal.weight * pal_loss, collected + (
    PalMetrics.single_from_model_output(pal=pal_loss),
  )


def _frozen_as_constants(params, trainable):
  """`trainable` (optim.trainable_mask, bools like the params; None = all): frozen parameters
  become constants of the loss, so no weight gradient is computed (or held) for them."""
  if trainable is None:
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def _loss_and_grads(
  graphdef: nnx.GraphDef,
  params,
  batch,
  microbatches: int,
  pal: PalObjective | None = None,
  trainable: Any = None,
  loss_chunk: int = 0,
):
  """Loss, token metrics and gradients of the whole batch. With `microbatches` > 1 a `lax.scan`
  over batch slices accumulates them (the same result, a fraction of the activation memory)."""
  grad_fn = jax.value_and_grad(
    lambda p, b: _loss_metrics(graphdef, _frozen_as_constants(p, trainable), b, pal, loss_chunk),
    has_aux=True,
  )
  if microbatches == 1:
    (loss, loss_metrics), grads = grad_fn(params, batch)
    return loss, loss_metrics, grads
  rows = batch['tokens'].shape[0]
  if rows % microbatches:
    raise ValueError(f'batch_size {rows} is not a multiple of microbatches={microbatches}')
  # Microbatch m takes rows m, m + M, ...: each stays spread over the batch-sharded devices.
  split = jax.tree.map(
    lambda x: x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1), batch
  )
  total_weight = jnp.maximum(batch['loss_weights'].sum(), 1.0)

  def accumulate(carry, micro):
    (loss, loss_metrics), grads = grad_fn(params, micro)
    # Each microbatch loss is its own weighted mean: rescale it to its share of the whole batch.
    share = jnp.maximum(micro['loss_weights'].sum(), 1.0) / total_weight
    loss_sum, grad_sum = carry
    grad_sum = jax.tree.map(lambda acc, g: acc + share * g, grad_sum, grads)
    return (loss_sum + share * loss, grad_sum), loss_metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), stacked_metrics = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), split)
  return loss, tuple(m.reduce() for m in stacked_metrics), grads


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  skip_nonfinite: bool = False,
  trainable: Any = None,
  microbatches: int = 1,
  pal: PalObjective | None = None,
  loss_chunk: int = 0,
) -> Callable:
  """`skip_nonfinite`: a step whose loss or gradients are not finite leaves params and opt_state
  unchanged (the step counter still advances, past the bad batch). `microbatches`: gradient
  accumulation over that many slices of each batch inside the step. `pal`: EVEv1's patch-aligning
  term added to the loss (evejax/train/pal.py); None leaves the loss pure cross-entropy.
  `loss_chunk`: positions whose logits are computed at a time (losses.chunked_token_losses)."""

  def train_step(state: TrainState, batch) -> tuple[TrainState, tuple[LossMetrics, StepMetrics]]:
    loss, loss_metrics, grads = _loss_and_grads(
      graphdef, state.params, batch, microbatches, pal, trainable, loss_chunk
    )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state),
        (state.params, state.opt_state),
      )
    step_metrics = StepMetrics.single_from_model_output(
      grad_norm=grad_norm, param_norm=optax.global_norm(params), learning_rate=schedule(state.step)
    )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), (
      loss_metrics,
      step_metrics,
    )

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
  graphdef: nnx.GraphDef, pal: PalObjective | None = None, loss_chunk: int = 0
) -> Callable:
  def eval_step(params, batch) -> LossMetrics:
    return _loss_metrics(graphdef, params, batch, pal, loss_chunk)[1]

  return jax.jit(eval_step)
