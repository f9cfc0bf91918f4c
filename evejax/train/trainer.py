"""The training loop: data, sharded model and optimizer, jitted steps, evaluation and metrics."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metrics
from flax import nnx

from evejax import sharding
from evejax.data import pipeline
from evejax.metrics import MetricWriter, Progress
from evejax.models import EVE, ModelConfig
from evejax.train import optim
from evejax.train.step import TrainState, make_eval_step, make_train_step


def _is_collection(x) -> bool:
  return isinstance(x, metrics.Collection)


def evaluate(eval_step, params, batches, mesh) -> dict[str, float]:
  """Loss and token accuracy over a whole held-out set."""
  total = None
  for batch in batches:
    m = eval_step(params, sharding.shard_batch(batch, mesh))
    total = m if total is None else total.merge(m)
  return {f'eval/{k}': float(v) for k, v in total.compute().items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing metrics (and the tokenizer) to `workdir`; returns final metrics."""
  model_cfg = ModelConfig.from_dict(config.model)
  train_source, eval_source = pipeline.make_sources(config.data)
  tokenizer = pipeline.load_tokenizer(config.data, train_source)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f'The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is '
                     f'{model_cfg.vocab_size}; raise model.vocab_size')
  is_main = jax.process_index() == 0
  if is_main:
    tokenizer.save(workdir)
  preprocess = pipeline.make_preprocessor(config.data, tokenizer, model_cfg.vision_patch_size,
                                          model_cfg.vision_merge)

  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = sharding.init_sharded(
      lambda: EVE(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  logging.info('Model: %s parameters; mesh %s', f'{num_params:,}', dict(mesh.shape))

  total_steps = config.total_steps
  schedule = optim.learning_rate_schedule(config.optim, total_steps)
  tx = optim.make_optimizer(config.optim, total_steps)
  with jax.set_mesh(mesh):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=jax.jit(tx.init)(params))
  train_step = make_train_step(graphdef, tx, schedule)
  eval_step = make_eval_step(graphdef)

  def eval_batches():
    return pipeline.batches(eval_source, preprocess, config.batch_size, seed=0, shuffle=False,
                            num_epochs=1, num_threads=config.data.num_threads)

  writer = MetricWriter(workdir, enabled=is_main)
  progress = Progress(total_steps)
  train_iter = iter(pipeline.batches(train_source, preprocess, config.batch_size,
                                     seed=config.data.seed, num_threads=config.data.num_threads))
  accumulated, final = None, {}
  for step in range(1, total_steps + 1):
    batch = sharding.shard_batch(next(train_iter), mesh)
    if step == 1:
      compile_start = time.perf_counter()
    with jax.set_mesh(mesh):
      state, step_metrics = train_step(state, batch)
    if step == 1:
      jax.block_until_ready(state.step)
      writer.write(step, {'compile_time_s': time.perf_counter() - compile_start})
      progress.start(step)
    accumulated = step_metrics if accumulated is None else jax.tree.map(
        lambda a, b: a.merge(b), accumulated, step_metrics, is_leaf=_is_collection)
    if step % config.log_every == 0 or step == total_steps:
      scalars = {f'train/{k}': float(v) for m in accumulated for k, v in m.compute().items()}
      scalars['train/steps_per_s'] = progress.steps_per_second(step)
      writer.write(step, scalars)
      logging.info(progress.line(step, {'loss': scalars['train/loss'],
                                        'acc': scalars['train/accuracy']}))
      final.update(scalars)
      accumulated = None
    if step % config.eval_every == 0 or step == total_steps:
      with jax.set_mesh(mesh):
        eval_scalars = evaluate(eval_step, state.params, eval_batches(), mesh)
      writer.write(step, eval_scalars)
      logging.info('step %d held-out: loss %.4f, caption/answer token accuracy %.4f', step,
                   eval_scalars['eval/loss'], eval_scalars['eval/accuracy'])
      final.update(eval_scalars)
  writer.close()
  return final
