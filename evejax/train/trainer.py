"""The training loop: data, sharded model and optimizer, jitted steps, checkpoints, evaluation and
metrics. A run resumes from the newest complete checkpoint in its workdir."""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.sharding import NamedSharding, PartitionSpec as P

from evejax import checkpoint, sharding
from evejax.checkpoint import store
from evejax.data import pipeline
from evejax.metrics import MetricWriter, ProfileWindow, Progress, Throughput, batch_counts, flops
from evejax.models import EVE, ModelConfig
from evejax.models import pal as pal_lib
from evejax.evaluation.periodic import PeriodicBenchmark
from evejax.train import optim
from evejax.train.guard import GuardedWindow, NonFiniteGuard
from evejax.train.step import TrainState, make_eval_step, make_train_step
from flax import nnx

# Sections a config may leave out (configs/demo.py lists them all).
DEFAULTS = dict(
    checkpoint=dict(every=1000, keep_last=3, keep_every=0, async_save=True),
    guard=dict(nonfinite='stop', max_skipped=10),
    metrics=dict(peak_flops=0.0),  # 0: look the device kind up in flops.PEAK_FLOPS.
    init_from='', profile_steps=0, profile_first_step=10,
    # Scale (evejax/sharding): multi-process setup, logical-axis rule overrides, the largest
    # fraction of parameter bytes left replicated over the fsdp/tensor axes, and gradient
    # accumulation over this many microbatches per step.
    distributed=dict(coordinator_address='', num_processes=0, process_id=-1, auto=False),
    sharding_rules=(), sharding_tolerance=0.02, microbatches=1,
    # Generation on a benchmark file (evejax/evaluation/periodic.py); file '' = off, every 0 = at
    # the end only, limit 0 = every item.
    benchmark=dict(file='', every=0, limit=0, batch_size=16, max_new_tokens=32),
)


def _option(config: ml_collections.ConfigDict, name: str):
  default = DEFAULTS[name]
  if isinstance(default, dict):
    return ml_collections.ConfigDict({**default, **config.get(name, {})})
  return config.get(name, default)


def evaluate(eval_step, params, batches, mesh) -> dict[str, float]:
  """Loss and token accuracy over a whole held-out set."""
  total = None
  for batch in batches:
    m = eval_step(params, sharding.shard_batch(batch, mesh))
    total = m if total is None else total.merge(m)
  return {f'eval/{k}': float(v) for k, v in total.compute().items()}


def _checkpoint_metadata(config, params, mesh) -> dict:
  return {
      'config': json.loads(config.to_json_best_effort()),
      'layer_layout': {'layers': checkpoint.layer_layout(checkpoint.param_shapes(params)),
                       'num_layers': config.model.num_layers},
      'mesh': dict(mesh.shape), 'jax_version': jax.__version__,
  }


def _throughput_meter(model_cfg: ModelConfig, batch, peak_flops: float) -> Throughput:
  rows, seq_len = batch['tokens'].shape
  step_flops = flops.train_step_flops(model_cfg, rows, seq_len, batch['patches'].shape[1])
  peak = flops.peak_flops_per_device(flops.device_kind(), peak_flops)
  if peak is None:
    logging.info('No peak FLOP/s known for %r: set metrics.peak_flops to report MFU',
                 flops.device_kind())
  return Throughput(step_flops, jax.device_count(), peak)


def _window_scalars(step: int, train_averages: dict[str, float], throughput: Throughput,
                    progress: Progress, skipped: int) -> dict[str, float]:
  """Scalars of one logging window; no train/ averages when every step in it was skipped."""
  scalars = {f'train/{k}': v for k, v in train_averages.items()}
  scalars.update({f'perf/{k}': v for k, v in throughput.scalars().items()})
  scalars['train/steps_per_s'] = progress.steps_per_second(step)
  scalars['train/skipped_steps'] = skipped
  return scalars


def _progress_values(scalars: dict[str, float]) -> dict[str, float]:
  """What the progress line shows of a window's scalars (those present)."""
  shown = (('loss', 'train/loss'), ('acc', 'train/accuracy'), ('tok/s', 'perf/tokens_per_s'),
           ('mfu', 'perf/mfu'))
  values = {name: scalars[key] for name, key in shown if key in scalars}
  if scalars['train/skipped_steps']:
    values['skipped'] = scalars['train/skipped_steps']
  return values


def _restore_or_start(config, workdir: str, ckpt: checkpoint.Checkpointer, state: TrainState,
                      train_iter) -> TrainState:
  """Resumes from this run's checkpoint; else, for a new run, loads `init_from` weights."""
  if ckpt.latest_step() is not None:
    step, state, _ = ckpt.restore(state, train_iter)
    logging.info('Resumed from checkpoint %s/%d', ckpt.directory, step)
    return state
  init_from = _option(config, 'init_from')
  if init_from:
    params, report = checkpoint.load_params(init_from, state.params)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'init_from_report.json'), 'w') as f:
        json.dump({'init_from': init_from, **report}, f, indent=1)
    state = state.replace(params=params)
  return state


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing checkpoints, metrics (and the tokenizer) to `workdir`.

  Returns the final metrics; `preempted` is set when a SIGTERM ended the run early.
  """
  sharding.distributed.initialize(_option(config, 'distributed'))  # before any other JAX call
  if jax.process_index() == 0:  # First: even a run that fails to start leaves its config.
    store.write_run_config(workdir, json.loads(config.to_json_best_effort()))
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
                                          model_cfg.vision_merge,
                                          valid_channel=model_cfg.vision_tokenizer == 'v1',
                                          teacher_size=pal_lib.offline_teacher_size(
                                              config.get('pal'), model_cfg),
                                          pal_pool=model_cfg.pal_pool)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(_option(config, 'sharding_rules'))
  sharding.activate_rules(rules)  # for the activation constraints traced inside the steps
  graphdef, params = sharding.init_sharded(
      lambda: EVE(model_cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
  sharding.check_sharded(params, mesh, _option(config, 'sharding_tolerance'))
  num_params = sum(p.size for p in jax.tree.leaves(params))
  logging.info('Model: %s parameters; mesh %s\n%s', f'{num_params:,}', dict(mesh.shape),
               parameter_overview.get_parameter_overview(params, include_stats=False))

  total_steps = config.total_steps
  schedule = optim.learning_rate_schedule(config.optim, total_steps)
  tx = optim.make_optimizer(config.optim, total_steps)
  logging.info('Parameter groups (config.optim trainable/frozen/groups):\n%s',
               optim.group_summary(config.optim, params))
  replicated = NamedSharding(mesh, P())
  # The run's base key, checkpointed with the state for stochastic ops (none in the recipes yet).
  # From host memory: a device array put on a mesh that spans other processes' devices yields a
  # global array Orbax cannot save when each process has one device (jax 0.10).
  rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(config.seed))), replicated)
  with jax.set_mesh(mesh):
    state = TrainState(step=jax.device_put(np.zeros((), np.int32), replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=sharding.like_params(
                           jax.eval_shape(tx.init, params), params, mesh))(params), rng=rng)
  guard_cfg = _option(config, 'guard')
  guard = NonFiniteGuard(guard_cfg.nonfinite, guard_cfg.max_skipped)
  pal = pal_lib.objective_from_config(config.get('pal'), model_cfg)  # EVEv1 only; None = off
  train_step = make_train_step(graphdef, tx, schedule, skip_nonfinite=guard.mode == 'skip',
                               microbatches=_option(config, 'microbatches'),
                               trainable=optim.trainable_mask(config.optim, params), pal=pal)
  eval_step = make_eval_step(graphdef, pal)
  bench_cfg = _option(config, 'benchmark')
  benchmark = (PeriodicBenchmark(bench_cfg, config, graphdef, params, tokenizer, mesh)
               if bench_cfg.file else None)

  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               workdir=workdir)

  def eval_batches():
    return pipeline.eval_batches(config.data, eval_source, preprocess, config.batch_size, **hosts)

  train_iter = pipeline.make_train_iterator(config.data, train_source, preprocess,
                                            config.batch_size, **hosts)
  ckpt_cfg = _option(config, 'checkpoint')
  ckpt = checkpoint.Checkpointer(store.checkpoints_dir(workdir), **ckpt_cfg)
  state = _restore_or_start(config, workdir, ckpt, state, train_iter)
  metadata = _checkpoint_metadata(config, params, mesh)

  def save(step: int, force: bool = False) -> None:
    ckpt.save(step, state, train_iter, metadata, force=force)

  writer = MetricWriter(workdir, enabled=is_main)
  progress = Progress(total_steps)
  profile = ProfileWindow(workdir, _option(config, 'profile_first_step'),
                          _option(config, 'profile_steps'), enabled=is_main)
  preemption = checkpoint.PreemptionWatcher()
  first_step = int(state.step) + 1
  throughput, final = None, {}
  window = GuardedWindow(guard, ckpt.describe_latest)
  if first_step > total_steps:
    logging.info('Checkpoint step %d: training is already complete', first_step - 1)
    with jax.set_mesh(mesh):
      final.update(evaluate(eval_step, state.params, eval_batches(), mesh))
  try:
    clock = time.perf_counter()
    for step in range(first_step, total_steps + 1):
      profile.step_begins(step, state.step)
      host_batch = next(train_iter)
      batch = sharding.shard_batch(host_batch, mesh)
      with jax.set_mesh(mesh):
        state, step_metrics = train_step(state, batch)
      window.add(step, step_metrics)  # Guards the previous step while this one runs.
      log_step = step % config.log_every == 0 or step == total_steps
      if throughput is None:  # The first step of this process compiles: timed on its own.
        window.settle()
        writer.write(step, {'compile_time_s': time.perf_counter() - clock})
        progress.start(step)
        throughput = _throughput_meter(model_cfg, batch, _option(config, 'metrics').peak_flops)
      else:  # Dispatch is asynchronous: the time between iterations is the device's step time.
        if log_step:
          window.settle()  # The window's time ends where its last step does.
        throughput.add(time.perf_counter() - clock,
                       *(n * jax.process_count() for n in batch_counts(host_batch)))
      clock = time.perf_counter()
      if log_step:
        scalars = _window_scalars(step, window.compute(), throughput, progress, guard.skipped)
        writer.write(step, scalars)
        logging.info(progress.line(step, _progress_values(scalars)))
        final.update(scalars)
      preempted = preemption.reached(step)
      if ckpt.should_save(step) or step == total_steps or preempted:
        window.settle()  # Never checkpoint a non-finite step.
        save(step, force=True)
      if preempted:
        ckpt.wait()
        logging.warning('Preempted: saved checkpoint %s/%d; the same command resumes from it.',
                        ckpt.directory, step)
        final['preempted'] = step
        break
      if step % config.eval_every == 0 or step == total_steps:
        with jax.set_mesh(mesh):
          eval_scalars = evaluate(eval_step, state.params, eval_batches(), mesh)
        writer.write(step, eval_scalars)
        logging.info('step %d held-out: loss %.4f, caption/answer token accuracy %.4f', step,
                     eval_scalars['eval/loss'], eval_scalars['eval/accuracy'])
        final.update(eval_scalars)
        clock = time.perf_counter()  # Evaluation is not training time.
      if benchmark is not None and benchmark.due(step, total_steps):
        bench_scalars = benchmark(state.params)
        writer.write(step, bench_scalars)
        logging.info('step %d benchmark %s: %s', step, bench_cfg.file, bench_scalars)
        final.update(bench_scalars)
        clock = time.perf_counter()
  finally:  # Also when the guard stops the run: finish the pending save, flush the metrics.
    profile.stop(state.step)
    preemption.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    train_iter.close()  # Stops the data worker processes, if any.
  return final
