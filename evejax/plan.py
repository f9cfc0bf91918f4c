"""Ahead-of-time plan of a training run: compile the train step for a mesh of fake CPU devices and
report what each device holds, the step's FLOPs, and whether it fits a given HBM per chip.

  python -m evejax.plan --config=configs/eve_v2/stage2.py:size=7b --mesh=fsdp=-1 --devices=256
      [--hbm_gib=95] [--config.model.routing=sorted --config.model.remat=full]
      [--config.batch_size=512]

`--config.model.X=Y` sets any ModelConfig field, also one the config file leaves at its default.

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
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from evejax import cli, sharding
from evejax.config_utils import load_config_file
from evejax.data import images
from evejax.metrics import flops as flops_lib
from evejax.models import EVE, ModelConfig
from evejax.sharding.synthetic import batch_shapes
from evejax.train import optim
from evejax.train.step import TrainState, make_train_step


def load_config(spec: str):
  """The config of a get_config(arg) file with every ModelConfig field in its `model` (defaults
  for those the file leaves out), so that `--config.model.X=Y` reaches any of them."""
  config = load_config_file(spec)
  config.model.update(dataclasses.asdict(ModelConfig.from_dict(config.model)))
  return config


_CONFIG = cli.define_config_flag('A get_config(arg) file, as path[:arg]; --config.model.X=Y sets '
                                 'any ModelConfig field.', load=load_config)
_MESH = flags.DEFINE_string('mesh', '', "Mesh sizes, e.g. 'data=2,fsdp=-1,tensor=4' (default: the "
                            "config's mesh).")
_DEVICES = flags.DEFINE_integer('devices', 256, 'Number of fake devices (chips) to compile for.')
_HBM = flags.DEFINE_float('hbm_gib', 95.0, 'Memory per chip, GiB.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Positions per row (default: data.seq_len).')
_PATCH_GROUPS = flags.DEFINE_integer('patch_groups', 0, 'Visual-token slots per row (default: '
                                     'from data.max_size / data.row_patches).')

GiB, MiB = 2 ** 30, 2 ** 20


def parse_sizes(text: str) -> dict[str, Any]:
  sizes = {}
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    sizes[key.strip()] = int(value)
  return sizes


def batch_geometry(config, cfg) -> tuple[int, int, int]:
  seq_len = _SEQ_LEN.value or config.data.seq_len
  patch_groups = _PATCH_GROUPS.value or config.data.get('row_patches', 0) or \
      images.max_patch_groups(config.data.max_size, cfg.vision_token_pixels)
  return config.batch_size, seq_len, patch_groups


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards (the largest, when uneven) of abstract sharded arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def with_shardings(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def compile_step(config, cfg, mesh, batch_shape):
  """The compiled train step, and the abstract state and batch it was compiled for."""
  rules = sharding.rules_from_config(config.get('sharding_rules', ()))
  sharding.activate_rules(rules)
  graphdef, params, _ = sharding.abstract_params(lambda: EVE(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  with jax.set_mesh(mesh):
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_state = with_shardings(opt_shapes, sharding.like_params(opt_shapes, params, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    state = TrainState(step, params, opt_state)
    batch = with_shardings(batch_shapes(cfg, *batch_shape),
                           {k: sharding.batch_sharding(mesh) for k in batch_shapes(cfg, 1, 1, 1)})
    train_step = make_train_step(graphdef, tx, optim.learning_rate_schedule(
        config.optim, config.total_steps), microbatches=config.get('microbatches', 1))
    compiled = train_step.lower(state, batch).compile()
  return compiled, state, batch


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', 0.0))


def plan(config, cfg, mesh, batch_shape, hbm_gib: float) -> dict[str, Any]:
  start = time.perf_counter()
  compiled, state, batch = compile_step(config, cfg, mesh, batch_shape)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  params, opt_state = per_device_bytes(state.params), per_device_bytes(state.opt_state)
  batch_bytes = per_device_bytes(batch)
  # Arguments (params, optimizer state, batch) + temporaries (activations, gradients, workspace);
  # the donated state's outputs alias its arguments, so they add nothing.
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  xla = xla_flops(compiled) * mesh.size
  if cfg.scan_layers and cfg.num_layers > 1:
    # XLA counts a while loop's body once: count the unrolled 1-layer program plus num_layers - 1
    # layers, one layer being the difference between the unrolled 2- and 1-layer programs.
    one, two = (xla_flops(compile_step(config, dataclasses.replace(
        cfg, num_layers=n, scan_layers=False), mesh, batch_shape)[0]) for n in (1, 2))
    xla = (one + (cfg.num_layers - 1) * (two - one)) * mesh.size
  analytic = flops_lib.train_step_flops(cfg, *batch_shape)
  return dict(compile_s=compile_s, params=params, opt_state=opt_state, batch=batch_bytes,
              temporaries=memory.temp_size_in_bytes, total=total, hbm=hbm_gib * GiB,
              fits=total <= hbm_gib * GiB, xla_flops=xla, analytic_flops=analytic)


def report(result: dict[str, Any], cfg, mesh, batch_shape) -> str:
  rows, seq_len, patch_groups = batch_shape
  lines = [
      f'Plan: {cfg.num_layers} layers, hidden {cfg.hidden_size}, routing {cfg.routing}, '
      f'scan_layers {cfg.scan_layers}, remat {cfg.remat}, dtype {cfg.dtype}/{cfg.param_dtype}',
      f'Mesh {dict(mesh.shape)} = {mesh.size} devices; global batch {rows} rows x {seq_len} '
      f'positions, {patch_groups} visual-token slots per row; compiled in '
      f'{result["compile_s"]:.0f} s',
      '', '| per device                        |        GiB |          MiB |',
      '| --- | ---: | ---: |']
  for key, label in (('params', 'parameters'), ('opt_state', 'optimizer state'),
                     ('batch', 'batch'),
                     ('temporaries', 'activations, gradients, workspace'),
                     ('total', 'total (peak estimate)'), ('hbm', 'HBM per chip')):
    lines.append(f'| {label:<33} | {result[key] / GiB:10.3f} | {result[key] / MiB:12.2f} |')
  verdict = 'FITS' if result['fits'] else 'DOES NOT FIT'
  lines += ['', f'{verdict}: {result["total"] / GiB:.2f} GiB of {result["hbm"] / GiB:.0f} GiB '
            'per chip', '',
            f'FLOPs per step: XLA cost analysis {result["xla_flops"]:.4g} (all devices), '
            f'analytic {result["analytic_flops"]:.4g} (ratio '
            f'{result["xla_flops"] / result["analytic_flops"]:.3f})']
  return '\n'.join(lines)


def main(argv):
  del argv
  # Fake devices: set before the first JAX call creates the CPU backend.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  config = _CONFIG.value
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(parse_sizes(_MESH.value) if _MESH.value else dict(config.mesh))
  batch_shape = batch_geometry(config, cfg)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_shape[0] % shards:
    raise ValueError(f'batch_size {batch_shape[0]} does not split over the {shards} batch shards '
                     f'(data x fsdp) of mesh {dict(mesh.shape)}; set --config.batch_size to a '
                     'multiple of it')
  result = plan(config, cfg, mesh, batch_shape, _HBM.value)
  print(report(result, cfg, mesh, batch_shape), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
