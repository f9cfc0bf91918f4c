"""Ahead-of-time plan of a training run: compile the train step for a mesh of devices that need not
exist and report what each device holds, the step's FLOPs, and whether it fits the chip's HBM.

  python -m evejax.plan --config=configs/eve_v2/stage2.py:size=7b --mesh=fsdp=-1 --topology=v5p-256
  python -m evejax.plan --config=configs/eve_v2/stage2.py:size=7b --mesh=fsdp=-1 --devices=256
      [--hbm_gib=95] [--config.model.routing=sorted --config.model.remat=full]
      [--config.batch_size=512]

`--config.model.X=Y` sets any ModelConfig field (configs start from `default_config()`, which has
them all).

Nothing is allocated: parameters, optimizer state and the batch are abstract (shapes + shardings),
and `jax.jit(...).lower(...).compile()` runs XLA's SPMD partitioner and buffer assignment for the
per-device program.

- `--topology=v5p-256` (v4, v5p, v5e, v6e slices; sharding/topology.py) compiles with the TPU
  compiler from libtpu (`pip install 'evejax[tpu]'`) for the slice's chips, as MaxText's
  train_compile: the TPU's fused attention (`model.attention=auto` -> splash), layouts and buffer
  assignment; HBM is the chip's unless --hbm_gib is given. A program over the chip's HBM fails to
  compile; the plan reports the compiler's figure as DOES NOT FIT.
- `--devices=N` (no --topology) compiles for N fake CPU devices: the CPU compiler's buffer
  assignment, attention the plain XLA kernel (no flash kernel), so temporaries are an upper bound.

FLOPs come from XLA's cost analysis of the per-device program, times the device count. XLA counts
a scanned layer stack (`model.scan_layers`) once per layer body; `--layer_flops=unrolled` then also
compiles unrolled 1- and 2-layer programs and scales the per-layer difference (the default on CPU),
`analytic` reports the analytic count only (the default with --topology, where those two extra
compiles of the full-width model would triple the time).
"""

from __future__ import annotations

import dataclasses
import json
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

from evejax import cli, sharding, storage
from evejax.batch import BatchSpec
from evejax.config import TrainConfig
from evejax.metrics import flops as flops_lib
from evejax.models import EVE, ModelConfig, attention
from evejax.sharding import topology
from evejax.sharding.synthetic import batch_shapes
from evejax.train import optim
from evejax.train import pal as pal_lib
from evejax.train.step import TrainState, make_train_step

_CONFIG = cli.define_config_flag(
  'A get_config(arg) file, as path[:arg]; --config.model.X=Y sets any ModelConfig field.'
)
_MESH = flags.DEFINE_string(
  'mesh',
  '',
  "Mesh sizes, e.g. 'data=2,fsdp=-1,tensor=4', plus 'dcn.data=2' for slices (default: the "
  "config's mesh).",
)
_DEVICES = flags.DEFINE_integer(
  'devices', 256, 'Number of fake CPU devices (chips) to compile for, without --topology.'
)
_TOPOLOGY = flags.DEFINE_string(
  'topology', '', 'A TPU slice (v5p-256, v6e-256, v4-128, v5e-16): compile with the TPU compiler.'
)
_SLICES = flags.DEFINE_integer('num_slices', 1, 'Slices of --topology (multi-slice; mesh.dcn).')
_HBM = flags.DEFINE_float(
  'hbm_gib', 0.0, "Memory per chip, GiB (default: the --topology chip's, else 95)."
)
_LAYER_FLOPS = flags.DEFINE_enum(
  'layer_flops',
  'auto',
  ['auto', 'unrolled', 'analytic'],
  'FLOPs of scanned layers: unrolled 1- and 2-layer compiles, or the analytic count only '
  '(auto: unrolled on fake CPU devices, analytic with --topology).',
)
_JSON = flags.DEFINE_string(
  'json', '', 'Also write the plan (figures in bytes and FLOPs, mesh, device) to this JSON file.'
)
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Positions per row (default: data.seq_len).')
_PATCH_GROUPS = flags.DEFINE_integer(
  'patch_groups', 0, 'Visual-token slots per row (default: from data.max_size / data.row_patches).'
)

GiB, MiB = 2**30, 2**20


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


def lower_step(config: TrainConfig, cfg: ModelConfig, mesh, spec: BatchSpec):
  """The lowered train step (with the run's PAL term and frozen parameters), and the abstract
  state and batch it was lowered for."""
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
      trainable=optim.trainable_mask(config.optim, params),
      pal=pal_lib.objective_from_config(config.pal, cfg),
      loss_chunk=config.loss_chunk,
    )
    lowered = train_step.lower(state, batch)
  return lowered, state, batch


def compile_step(config: TrainConfig, cfg: ModelConfig, mesh, spec: BatchSpec):
  """The compiled train step, and the abstract state and batch it was compiled for."""
  lowered, state, batch = lower_step(config, cfg, mesh, spec)
  with jax.set_mesh(mesh):
    return lowered.compile(), state, batch


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', 0.0))


def unrolled_layer_flops(config: TrainConfig, cfg: ModelConfig, mesh, spec: BatchSpec) -> float:
  """XLA counts a while loop's body once: count the unrolled 1-layer program plus num_layers - 1
  layers, one layer being the difference between the unrolled 2- and 1-layer programs."""
  one, two = (
    xla_flops(
      compile_step(config, dataclasses.replace(cfg, num_layers=n, scan_layers=False), mesh, spec)[0]
    )
    for n in (1, 2)
  )
  return (one + (cfg.num_layers - 1) * (two - one)) * mesh.size


def plan(
  config: TrainConfig,
  cfg: ModelConfig,
  mesh,
  spec: BatchSpec,
  hbm_gib: float,
  layer_flops: str = 'unrolled',
) -> dict[str, Any]:
  """Per-device memory (bytes), fit, and FLOPs of the run's train step on `mesh`. `layer_flops`
  ('unrolled' or 'analytic'): how a scanned stack's FLOPs are counted (module docstring). A
  compile the TPU compiler refuses for HBM gives the compiler's figure (`refused`: its words)."""
  start = time.perf_counter()
  lowered, state, batch = lower_step(config, cfg, mesh, spec)
  result = dict(
    params=per_device_bytes(state.params),
    opt_state=per_device_bytes(state.opt_state),
    batch=per_device_bytes(batch),
    hbm=hbm_gib * GiB,
    analytic_flops=flops_lib.train_step_flops(cfg, spec, config.batch_size),
    xla_flops=None,
  )
  try:
    with jax.set_mesh(mesh):
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if (needed := topology.over_hbm(error)) is None:
      raise
    # Refused for its temporaries: the arguments come on top.
    needed.setdefault('total', result['params'] + result['opt_state'] + result['batch'])
    needed['total'] += needed.get('temporaries', 0)
    refused = str(error).splitlines()[0]
    return dict(
      result, **needed, compile_s=time.perf_counter() - start, fits=False, refused=refused
    )
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # Arguments (params, optimizer state, batch) + outputs not aliased to them (the donated state's
  # outputs reuse its buffers) + temporaries (activations, gradients, workspace) + the program.
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  total = (
    memory.argument_size_in_bytes
    + outputs
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes
  )
  xla = xla_flops(compiled) * mesh.size
  if cfg.scan_layers and cfg.num_layers > 1:
    xla = unrolled_layer_flops(config, cfg, mesh, spec) if layer_flops == 'unrolled' else None
  return dict(
    result,
    compile_s=compile_s,
    arguments=memory.argument_size_in_bytes,
    outputs=outputs,
    temporaries=memory.temp_size_in_bytes,
    generated_code=memory.generated_code_size_in_bytes,
    total=total,
    fits=total <= hbm_gib * GiB,
    xla_flops=xla,
  )


_ROWS = (
  ('params', 'parameters'),
  ('opt_state', 'optimizer state'),
  ('batch', 'batch'),
  ('arguments', "arguments (the compiler's layouts)"),
  ('outputs', 'outputs not aliased to arguments'),
  ('temporaries', 'activations, gradients, workspace'),
  ('generated_code', 'generated code'),
  ('total', 'total (peak estimate)'),
  ('hbm', 'HBM per chip'),
)


def report(result: dict[str, Any], cfg: ModelConfig, mesh, spec: BatchSpec, rows: int) -> str:
  seq_len, patch_groups = spec.seq_len, spec.patch_slots
  device = mesh.devices.flat[0]
  lines = [
    f'Plan: {cfg.num_layers} layers, hidden {cfg.hidden_size}, routing {cfg.routing}, '
    f'scan_layers {cfg.scan_layers}, remat {cfg.remat}, dtype {cfg.dtype}/{cfg.param_dtype}, '
    f'attention {attention.resolve(cfg.attention, device.platform)}',
    f'Mesh {dict(mesh.shape)} = {mesh.size} devices ({device.device_kind}); global batch {rows} '
    f'rows x {seq_len} positions, {patch_groups} visual-token slots per row; compiled in '
    f'{result["compile_s"]:.0f} s',
    '',
    '| per device                         |        GiB |          MiB |',
    '| --- | ---: | ---: |',
  ]
  for key, label in _ROWS:
    if key in result:
      lines.append(f'| {label:<34} | {result[key] / GiB:10.3f} | {result[key] / MiB:12.2f} |')
  verdict = 'FITS' if result['fits'] else 'DOES NOT FIT'
  analytic = result['analytic_flops']
  if 'refused' in result:
    xla = 'no compiled program to count'
  elif result['xla_flops'] is None:
    xla = 'XLA cost analysis not counted (scanned layers: --layer_flops=unrolled counts them)'
  else:
    xla = (
      f'XLA cost analysis {result["xla_flops"]:.4g} (all devices), analytic {analytic:.4g} '
      f'(ratio {result["xla_flops"] / analytic:.3f})'
    )
  lines += [
    '',
    f'{verdict}: {result["total"] / GiB:.2f} GiB of {result["hbm"] / GiB:.0f} GiB per chip',
    *(
      [f'The TPU compiler refused the program: {result["refused"]}'] if 'refused' in result else []
    ),
    '',
    f'FLOPs per step: {xla}; analytic per device {analytic / mesh.size:.4g}',
  ]
  return '\n'.join(lines)


def devices_and_hbm() -> tuple[list, float, str]:
  """The devices to compile for, the HBM per chip (GiB) and how scanned layers' FLOPs are counted:
  a TPU slice's (--topology), else --devices fake CPU devices."""
  if _TOPOLOGY.value:
    slice_ = topology.parse(_TOPOLOGY.value)
    devices = topology.devices(slice_, _SLICES.value)
    hbm, default_flops = slice_.chip.hbm_gib, 'analytic'
  else:
    # Fake devices: set before the first JAX call creates the CPU backend.
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)
    devices, hbm, default_flops = jax.devices(), 95.0, 'unrolled'
  layer_flops = default_flops if _LAYER_FLOPS.value == 'auto' else _LAYER_FLOPS.value
  return devices, _HBM.value or hbm, layer_flops


def main(argv):
  del argv
  # The host compiles; a TPU slice's devices come from libtpu without initialising a TPU backend.
  jax.config.update('jax_platforms', 'cpu')
  config = TrainConfig.parse(_CONFIG.value)
  cfg = config.model
  devices, hbm_gib, layer_flops = devices_and_hbm()
  sizes = cli.parse_mesh(_MESH.value) if _MESH.value else dict(config.mesh)
  mesh = sharding.make_mesh(sizes, devices)
  spec = batch_spec(config)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if config.batch_size % shards:
    raise ValueError(
      f'batch_size {config.batch_size} does not split over the {shards} batch '
      f'shards (data x fsdp) of mesh {dict(mesh.shape)}; set --config.batch_size '
      'to a multiple of it'
    )
  result = plan(config, cfg, mesh, spec, hbm_gib, layer_flops)
  print(report(result, cfg, mesh, spec, config.batch_size), flush=True)
  if _JSON.value:
    device = mesh.devices.flat[0]
    described = dict(
      config=cli.config_spec(),
      overrides=cli.config_overrides(),
      topology=_TOPOLOGY.value or f'{mesh.size} fake CPU devices',
      device_kind=device.device_kind,
      attention=attention.resolve(cfg.attention, device.platform),
      mesh=dict(mesh.shape),
      batch_size=config.batch_size,
      seq_len=spec.seq_len,
    )
    with storage.open(_JSON.value, 'w') as file:
      json.dump(dict(described, **result), file, indent=1)


if __name__ == '__main__':
  cli.run(main)
