"""The training loop: data, sharded model and optimizer, jitted steps, checkpoints, evaluation and
metrics. A run resumes from the newest complete checkpoint in its workdir."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from evejax import checkpoint, sharding, storage
from evejax.batch import BatchSpec
from evejax.checkpoint import store
from evejax.checkpoint.store import CheckpointError
from evejax.config import ConfigError, TrainConfig
from evejax.data import pipeline
from evejax.evaluation.periodic import PeriodicBenchmark
from evejax.metrics import MetricWriter, ProfileWindow, Progress, Throughput, batch_counts, flops
from evejax.models import EVE
from evejax.train import optim
from evejax.train import pal as pal_lib
from evejax.train.cadence import itstime
from evejax.train.guard import GuardedWindow, NonFiniteGuard
from evejax.train.step import TrainState, make_eval_step, make_train_step


def evaluate(eval_step, params, batches, mesh, prefix: str = 'eval') -> dict[str, float]:
  """Loss and token accuracy (and the PAL loss, when on) over a whole held-out set."""
  total = None
  for batch in batches:
    collected = eval_step(params, sharding.shard_batch(batch, mesh))
    total = collected if total is None else tuple(a.merge(b) for a, b in zip(total, collected))
  return {f'{prefix}/{k}': float(v) for m in total for k, v in m.compute().items()}


def _checkpoint_metadata(cfg: TrainConfig, params, mesh) -> dict:
  return {
    'config': cfg.to_dict(),
    'layer_layout': {
      'layers': checkpoint.layer_layout(checkpoint.param_shapes(params)),
      'num_layers': cfg.model.num_layers,
    },
    'mesh': dict(mesh.shape),
    'jax_version': jax.__version__,
  }


def _throughput_meter(cfg: TrainConfig, spec: BatchSpec) -> Throughput:
  step_flops = flops.train_step_flops(cfg.model, spec, cfg.batch_size)
  peak = flops.peak_flops_per_device(flops.device_kind(), cfg.metrics.peak_flops)
  if peak is None:
    logging.info(
      'No peak FLOP/s known for %r: set metrics.peak_flops to report MFU', flops.device_kind()
    )
  return Throughput(step_flops, jax.device_count(), peak)


def _window_scalars(
  step: int,
  train_averages: dict[str, float],
  throughput: Throughput,
  progress: Progress,
  skipped: int,
) -> dict[str, float]:
  """Scalars of one logging window; no train/ averages when every step in it was skipped."""
  scalars = {f'train/{k}': v for k, v in train_averages.items()}
  scalars.update({f'perf/{k}': v for k, v in throughput.scalars().items()})
  scalars['train/steps_per_s'] = progress.steps_per_second(step)
  scalars['train/skipped_steps'] = skipped
  return scalars


def _progress_values(scalars: dict[str, float]) -> dict[str, float]:
  """What the progress line shows of a window's scalars (those present)."""
  shown = (
    ('loss', 'train/loss'),
    ('acc', 'train/accuracy'),
    ('tok/s', 'perf/tokens_per_s'),
    ('mfu', 'perf/mfu'),
  )
  values = {name: scalars[key] for name, key in shown if key in scalars}
  if scalars['train/skipped_steps']:
    values['skipped'] = scalars['train/skipped_steps']
  return values


def _restore_or_start(
  cfg: TrainConfig, workdir: str, ckpt: checkpoint.Checkpointer, state: TrainState, train_iter
) -> TrainState:
  """Resumes from this run's checkpoint; else, for a new run, loads `init_from` weights."""
  if ckpt.latest_step() is not None:
    step, state, _ = ckpt.restore(state, train_iter)
    logging.info('Resumed from checkpoint %s/%d', ckpt.directory, step)
    return state
  if init_from := cfg.init_from:
    params, report = checkpoint.load_params(init_from, state.params, cfg.init_new)
    if jax.process_index() == 0:
      storage.write_atomic(
        os.path.join(workdir, 'init_from_report.json'),
        json.dumps({'init_from': init_from, **report}, indent=1),
      )
    state = state.replace(params=params)
  return state


def _check_paths(cfg: TrainConfig, workdir: str) -> None:
  """The workdir can hold a run, and a new run's `init_from` names a checkpoint."""
  if storage.isfile(workdir):
    raise ConfigError(f'--workdir={workdir} is a file: give a directory (created if missing)')
  if cfg.init_from and not storage.isdir(store.checkpoints_dir(workdir)):  # A resume ignores it.
    try:
      store.resolve_checkpoint(cfg.init_from)
    except CheckpointError as error:
      raise CheckpointError(f'init_from={cfg.init_from}: {error}') from None


def train(config: ml_collections.ConfigDict | TrainConfig, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing checkpoints, metrics (and the tokenizer) to `workdir`.

  Returns the final metrics; `preempted` is set when a SIGTERM ended the run early.
  """
  cfg = TrainConfig.parse(config)  # The one place the raw config is read.
  _check_paths(cfg, workdir)  # Before any data or device work.
  sharding.distributed.initialize(cfg.distributed)  # before any other JAX call
  cfg.check_attention()
  if jax.process_index() == 0:  # First: even a run that fails to start leaves its config.
    store.write_run_config(workdir, cfg.to_dict())
  train_source, eval_source = pipeline.make_sources(cfg.data)
  text_source = pipeline.text_eval_source(cfg.data)
  tokenizer = pipeline.load_tokenizer(cfg.data, train_source)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(
      f'The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is '
      f'{cfg.model.vocab_size}; raise model.vocab_size'
    )
  is_main = jax.process_index() == 0
  if is_main:
    tokenizer.save(workdir)
  spec = cfg.batch_spec()
  preprocess = pipeline.make_preprocessor(cfg.data, tokenizer, spec)

  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.sharding_rules)
  sharding.activate_rules(rules)  # for the activation constraints traced inside the steps
  graphdef, params = sharding.init_sharded(
    lambda: EVE(cfg.model, rngs=nnx.Rngs(cfg.seed)), mesh, rules
  )
  sharding.check_sharded(params, mesh, cfg.sharding_tolerance)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  logging.info(
    'Model: %s parameters; mesh %s\n%s',
    f'{num_params:,}',
    dict(mesh.shape),
    parameter_overview.get_parameter_overview(params, include_stats=False),
  )

  total_steps = cfg.total_steps
  schedule = optim.learning_rate_schedule(cfg.optim, total_steps)
  tx = optim.make_optimizer(cfg.optim, total_steps)
  logging.info(
    'Parameter groups (config.optim trainable/frozen/groups):\n%s',
    optim.group_summary(cfg.optim, params),
  )
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    opt_state = jax.jit(
      tx.init, out_shardings=sharding.like_params(jax.eval_shape(tx.init, params), params, mesh)
    )(params)
  state = TrainState.create(params, opt_state, cfg.seed)
  state = state.replace(
    step=jax.device_put(state.step, replicated), rng=jax.device_put(state.rng, replicated)
  )
  guard = NonFiniteGuard(cfg.guard)
  pal = pal_lib.objective_from_config(cfg.pal, cfg.model)  # EVEv1 only; None = off
  train_step = make_train_step(
    graphdef,
    tx,
    schedule,
    skip_nonfinite=guard.mode == 'skip',
    microbatches=cfg.microbatches,
    trainable=optim.trainable_mask(cfg.optim, params),
    pal=pal,
    loss_chunk=cfg.loss_chunk,
  )
  eval_step = make_eval_step(graphdef, pal, cfg.loss_chunk)
  benchmark = (
    PeriodicBenchmark(cfg.benchmark, cfg, graphdef, params, tokenizer, mesh)
    if cfg.benchmark.file
    else None
  )

  hosts = dict(
    process_index=jax.process_index(), process_count=jax.process_count(), workdir=workdir
  )

  def evaluate_held_out() -> dict[str, float]:
    """eval/* on the held-out set, and eval_text/* on the text-only one (data.text_eval_split)."""
    scalars = {}
    for prefix, source in (('eval', eval_source), ('eval_text', text_source)):
      if source is not None:
        batches = pipeline.eval_batches(cfg.data, source, preprocess, cfg.batch_size, **hosts)
        with jax.set_mesh(mesh):
          scalars.update(evaluate(eval_step, state.params, batches, mesh, prefix))
    return scalars

  def log_held_out(step: int) -> dict[str, float]:
    eval_scalars = evaluate_held_out()
    writer.write(step, eval_scalars)
    logging.info(
      'step %d held-out: %s',
      step,
      ', '.join(
        f'{k} {v:.4f}' for k, v in eval_scalars.items() if k.endswith(('loss', 'accuracy'))
      ),
    )
    return eval_scalars

  train_iter = pipeline.make_train_iterator(
    cfg.data, train_source, preprocess, cfg.batch_size, **hosts
  )
  ckpt = checkpoint.Checkpointer(
    store.checkpoints_dir(workdir), **dataclasses.asdict(cfg.checkpoint)
  )
  state = _restore_or_start(cfg, workdir, ckpt, state, train_iter)
  metadata = _checkpoint_metadata(cfg, params, mesh)

  also = []
  if is_main and cfg.metrics.wandb.project:
    from evejax.metrics.wandb_writer import WandbWriter  # The optional `wandb` extra.

    also.append(WandbWriter(cfg.metrics.wandb, workdir, cfg.to_dict()))
  writer = MetricWriter(workdir, enabled=is_main, also=also)
  progress = Progress(total_steps)
  profile = ProfileWindow(workdir, cfg.profile_first_step, cfg.profile_steps, enabled=is_main)
  preemption = checkpoint.PreemptionWatcher()
  first_step = int(state.step) + 1
  throughput, final = None, {}
  window = GuardedWindow(guard, ckpt.describe_latest)
  has_held_out = eval_source is not None or text_source is not None
  if first_step > total_steps:
    logging.info('Checkpoint step %d: training is already complete', first_step - 1)
    if has_held_out:
      final.update(evaluate_held_out())
  elif first_step == 1 and cfg.eval_at_start and has_held_out:
    log_held_out(0)  # The starting weights: the left end of the learning curves.
  try:
    clock = time.perf_counter()
    for step in range(first_step, total_steps + 1):
      profile.step_begins(step, state.step)
      host_batch = next(train_iter)
      batch = sharding.shard_batch(host_batch, mesh)
      with jax.set_mesh(mesh):
        state, step_metrics = train_step(state, batch)
      window.add(step, step_metrics)  # Guards the previous step while this one runs.
      log_step = itstime(step, cfg.log_every, total_steps)
      if throughput is None:  # The first step of this process compiles: timed on its own.
        window.settle()
        writer.write(step, {'compile_time_s': time.perf_counter() - clock})
        progress.start(step)
        throughput = _throughput_meter(cfg, spec)
      else:  # Dispatch is asynchronous: the time between iterations is the device's step time.
        if log_step:
          window.settle()  # The window's time ends where its last step does.
        throughput.add(
          time.perf_counter() - clock, *(n * jax.process_count() for n in batch_counts(host_batch))
        )
      clock = time.perf_counter()
      if log_step:
        scalars = _window_scalars(step, window.compute(), throughput, progress, guard.skipped)
        writer.write(step, scalars)
        logging.info(progress.line(step, _progress_values(scalars)))
        final.update(scalars)
      preempted = preemption.reached(step)
      # The first step too: a broken set-up (saving, restoring) shows at once.
      if itstime(step, cfg.checkpoint.every, total_steps, first=True) or preempted:
        window.settle()  # Never checkpoint a non-finite step.
        ckpt.save(step, state, train_iter, metadata, force=True)
      if preempted:
        ckpt.wait()
        logging.warning(
          'Preempted: saved checkpoint %s/%d; the same command resumes from it.',
          ckpt.directory,
          step,
        )
        final['preempted'] = step
        break
      if has_held_out and itstime(step, cfg.eval_every, total_steps):
        final.update(log_held_out(step))
        clock = time.perf_counter()  # Evaluation is not training time.
      if benchmark is not None and itstime(step, cfg.benchmark.every, total_steps):
        bench_scalars = benchmark(state.params)
        writer.write(step, bench_scalars)
        logging.info('step %d benchmark %s: %s', step, cfg.benchmark.file, bench_scalars)
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
