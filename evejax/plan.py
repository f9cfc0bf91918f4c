"""Ahead-of-time plan of a training run: compile the train step for a mesh of fake CPU devices and
report what each device holds, the step's FLOPs, and whether it fits a given HBM per chip.

  python -m evejax.plan --config=configs/eve_v2/stage2.py:size=7b --mesh=fsdp=-1 --devices=256
      [--hbm_gib=95] [--config.model.routing=sorted --config.model.remat=full]
      [--config.batch_size=512]

`--config.model.X=Y` sets any ModelConfig field (configs start from `default_config()`, which has
them all).

Nothing is allocated: parameters, optimizer state and the batch are abstract (shapes + shardings),
and `jax.jit(...).lower(...).compile()` runs XLA's SPMD partitioner and buffer assignment for the
per-device program. Memory comes from the CPU compiler's buffer assignment (attention is the plain
XLA kernel, not a fused flash kernel, so the temporaries are an upper bound for GPU/TPU runs).
FLOPs come from XLA's cost analysis of that per-device program, times the device count; a scanned
layer stack (`model.scan_layers`) is counted once per layer body by XLA, so for those the plan also
compiles unrolled 1- and 2-layer programs and scales the per-layer difference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from evejax import cli, sharding
from evejax.batch import BatchSpec
from evejax.config import TrainConfig
from evejax.metrics import flops as flops_lib
from evejax.models import EVE, ModelConfig
from evejax.sharding.synthetic import batch_shapes
from evejax.train import optim
from evejax.train.step import TrainState, make_train_step

_CONFIG = cli.define_config_flag(
  'A get_config(arg) file, as path[:arg]; --config.model.X=Y sets any ModelConfig field.'
)
_MESH = flags.DEFINE_string(
  'mesh', '', "Mesh sizes, e.g. 'data=2,fsdp=-1,tensor=4' (default: the config's mesh)."
)
_DEVICES = flags.DEFINE_integer('devices', 256, 'Number of fake devices (chips) to compile for.')
_HBM = flags.DEFINE_float('hbm_gib', 95.0, 'Memory per chip, GiB.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Positions per row (default: data.seq_len).')
_PATCH_GROUPS = flags.DEFINE_integer(
  'patch_groups', 0, 'Visual-token slots per row (default: from data.max_size / data.row_patches).'
)

GiB, MiB = 2**30, 2**20


def parse_sizes(text: str) -> dict[str, Any]:
  sizes = {}
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    sizes[key.strip()] = int(value)
  return sizes


def batch_spec(config: TrainConfig) -> BatchSpec:
  """The run's batch spec, with --seq_len / --patch_groups when given."""
  spec = config.batch_spec()
  return spec.replace(
    seq_len=_SEQ_LEN.value or spec.seq_len, patch_slots=_PATCH_GROUPS.value or spec.patch_slots
  )


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards (the largest, when uneven) of abstract sharded arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def with_shardings(shapes, shardings):
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def compile_step(config: TrainConfig, cfg: ModelConfig, mesh, spec: BatchSpec):
  """The compiled train step, and the abstract state and batch it was compiled for."""
  rules = sharding.rules_from_config(config.sharding_rules)
  sharding.activate_rules(rules)
  graphdef, params, _ = sharding.abstract_params(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_state = with_shardings(opt_shapes, sharding.like_params(opt_shapes, params, mesh))
    replicated = NamedSharding(mesh, P())
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    state = TrainState(step, params, opt_state, rng)
    shapes = batch_shapes(spec, config.batch_size)
    batch = with_shardings(shapes, {k: sharding.batch_sharding(mesh) for k in shapes})
    train_step = make_train_step(
      graphdef,
      tx,
      optim.learning_rate_schedule(config.optim, config.total_steps),
      microbatches=config.microbatches,
      loss_chunk=config.loss_chunk,
    )
    compiled = train_step.lower(state, batch).compile()
  return compiled, state, batch


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', 0.0))


def plan(
  config: TrainConfig, cfg: ModelConfig, mesh, spec: BatchSpec, hbm_gib: float
) -> dict[str, Any]:
  start = time.perf_counter()
  compiled, state, batch = compile_step(config, cfg, mesh, spec)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  params, opt_state = per_device_bytes(state.params), per_device_bytes(state.opt_state)
  batch_bytes = per_device_bytes(batch)
  # Arguments (params, optimizer state, batch) + temporaries (activations, gradients, workspace);
  # the donated state's outputs alias its arguments, so they add nothing.
  total = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )
  xla = xla_flops(compiled) * mesh.size
  if cfg.scan_layers and cfg.num_layers > 1:
    # XLA counts a while loop's body once: count the unrolled 1-layer program plus num_layers - 1
    # layers, one layer being the difference between the unrolled 2- and 1-layer programs.
    one, two = (
      xla_flops(
        compile_step(config, dataclasses.replace(cfg, num_layers=n, scan_layers=False), mesh, spec)[
          0
        ]
      )
      for n in (1, 2)
    )
    xla = (one + (cfg.num_layers - 1) * (two - one)) * mesh.size
  analytic = flops_lib.train_step_flops(cfg, spec, config.batch_size)
  return dict(
    compile_s=compile_s,
    params=params,
    opt_state=opt_state,
    batch=batch_bytes,
    temporaries=memory.temp_size_in_bytes,
    total=total,
    hbm=hbm_gib * GiB,
    fits=total <= hbm_gib * GiB,
    xla_flops=xla,
    analytic_flops=analytic,
  )


def report(result: dict[str, Any], cfg: ModelConfig, mesh, spec: BatchSpec, rows: int) -> str:
  seq_len, patch_groups = spec.seq_len, spec.patch_slots
  lines = [
    f'Plan: {cfg.num_layers} layers, hidden {cfg.hidden_size}, routing {cfg.routing}, '
    f'scan_layers {cfg.scan_layers}, remat {cfg.remat}, dtype {cfg.dtype}/{cfg.param_dtype}',
    f'Mesh {dict(mesh.shape)} = {mesh.size} devices; global batch {rows} rows x {seq_len} '
    f'positions, {patch_groups} visual-token slots per row; compiled in '
    f'{result["compile_s"]:.0f} s',
    '',
    '| per device                        |        GiB |          MiB |',
    '| --- | ---: | ---: |',
  ]
  for key, label in (
    ('params', 'parameters'),
    ('opt_state', 'optimizer state'),
    ('batch', 'batch'),
    ('temporaries', 'activations, gradients, workspace'),
    ('total', 'total (peak estimate)'),
    ('hbm', 'HBM per chip'),
  ):
    lines.append(f'| {label:<33} | {result[key] / GiB:10.3f} | {result[key] / MiB:12.2f} |')
  verdict = 'FITS' if result['fits'] else 'DOES NOT FIT'
  lines += [
    '',
    f'{verdict}: {result["total"] / GiB:.2f} GiB of {result["hbm"] / GiB:.0f} GiB per chip',
    '',
    f'FLOPs per step: XLA cost analysis {result["xla_flops"]:.4g} (all devices), '
    f'analytic {result["analytic_flops"]:.4g} (ratio '
    f'{result["xla_flops"] / result["analytic_flops"]:.3f})',
  ]
  return '\n'.join(lines)


def main(argv):
  del argv
  # Fake devices: set before the first JAX call creates the CPU backend.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  config = TrainConfig.parse(_CONFIG.value)
  cfg = config.model
  mesh = sharding.make_mesh(parse_sizes(_MESH.value) if _MESH.value else dict(config.mesh))
  spec = batch_spec(config)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if config.batch_size % shards:
    raise ValueError(
      f'batch_size {config.batch_size} does not split over the {shards} batch '
      f'shards (data x fsdp) of mesh {dict(mesh.shape)}; set --config.batch_size '
      'to a multiple of it'
    )
  result = plan(config, cfg, mesh, spec, _HBM.value)
  print(report(result, cfg, mesh, spec, config.batch_size), flush=True)


if __name__ == '__main__':
  cli.run(main)
