"""Causal attention within segments (packed examples), by one of several implementations.

`model.attention` picks how the scores are computed; every implementation gives the same
function: a query attends to the earlier keys of its own segment (segment id 0, the padding,
attends to earlier padding, so no row is empty).

- `xla`: builds the (B, 1, T, T) mask and calls XLA's unfused attention; the T x T scores are
  materialised. The oracle of the tests, and the default on CPU.
- `cudnn` (GPU): cuDNN's fused flash attention. Packed rows are given to it as ragged segments
  (offsets and lengths of every run of equal segment ids, padding included), at most
  `model.max_segments` runs a row.
- `pallas`: a flash-attention kernel taking segment ids directly: splash attention on TPU, the
  Pallas (Triton) flash kernel on GPU. Off those platforms it runs in Pallas interpret mode (tests).

`auto` takes cudnn on GPU, pallas on TPU and xla elsewhere.

Generation's decode steps (one new token a row against the KV cache) use `cache_attention`: one
query row of scores per token, nothing to fuse.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from evejax.sharding.mesh import BATCH_AXES

Array = jax.Array

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')
PLATFORM_DEFAULTS = {'gpu': 'cudnn', 'tpu': 'pallas'}
FLASH_BLOCK = 128  # query / key block of the Pallas kernels; the sequence must be a multiple


def traced_platform() -> str:
  """The platform being traced for: the active mesh's devices' (an AOT compile for TPU topology
  devices on a CPU host, `evejax.plan --topology`), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def resolve(implementation: str, platform: str | None = None) -> str:
  """The implementation `auto` stands for on `platform` (default: `traced_platform()`), checked
  against what the platform can run."""
  platform = platform or traced_platform()
  if implementation == 'auto':
    return PLATFORM_DEFAULTS.get(platform, 'xla')
  if implementation == 'cudnn' and platform != 'gpu':
    raise ValueError(
      f"model.attention='cudnn' needs a GPU (this run's platform is {platform}); "
      "use 'auto', 'xla' or 'pallas'"
    )
  return implementation


def segment_mask(segment_ids: Array) -> Array:
  """(B, T) segment ids -> (B, 1, T, T) bool: causal, within a segment."""
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def self_attention(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, T, K, H]
  v: Array,  # [B, T, K, H]
  segment_ids: Array,  # [B, T] int32
  implementation: str = 'xla',
  *,
  max_segments: int = 64,
) -> Array:  # [B, T, N, H]
  """Grouped-query causal attention within segments, by `implementation` ('auto' resolved here)."""
  implementation = resolve(implementation)
  if implementation == 'xla':
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids))
  if implementation == 'cudnn':
    return _cudnn(q, k, v, segment_ids, max_segments)
  platform = traced_platform()
  kernel = functools.partial(flash_attention, kernel=platform, interpret=platform == 'cpu')
  return _per_device(kernel, q, k, v, segment_ids)


def _per_device(fn, q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """Pallas kernels are not partitioned by GSPMD ("Mosaic kernels cannot be automatically
  partitioned"): under a mesh, `fn` runs on each device's shard, rows split over the batch axes
  and heads over `tensor` (each where it divides; whole otherwise)."""
  mesh = jax.sharding.get_abstract_mesh()
  auto = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto}
  if mesh.empty or not auto:
    return fn(q, k, v, segment_ids)
  divides = lambda size, axes: size % math.prod(mesh.shape[a] for a in axes) == 0
  batch = tuple(a for a in BATCH_AXES if a in auto)
  batch = (batch if divides(q.shape[0], batch) else None) or None
  heads = 'tensor' if 'tensor' in auto and divides(k.shape[2], ('tensor',)) else None
  qkv = P(batch, None, heads, None)
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(qkv, qkv, qkv, P(batch, None)),
    out_specs=qkv,
    axis_names=auto,
    check_vma=False,
  )(q, k, v, segment_ids)


def cache_attention(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, S, K, H]: every cache slot
  v: Array,  # [B, S, K, H]
  q_segments: Array,  # [B, T]
  kv_segments: Array,  # [B, S]: segment id of each written slot; never-written slots never match
) -> Array:  # [B, T, N, H]
  """Attention of the newest tokens over the cache slots of their segment (decode steps: every
  earlier slot of the segment is already written, so no causal term is needed)."""
  mask = q_segments[:, :, None] == kv_segments[:, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def flash_attention(
  q: Array, k: Array, v: Array, segment_ids: Array, *, kernel: str, interpret: bool = False
) -> Array:
  """The Pallas flash kernel of `kernel` ('tpu': splash attention; 'gpu' or 'cpu': the Triton
  flash kernel), same arguments as `self_attention`."""
  t, head_dim = q.shape[1], q.shape[-1]
  if t % FLASH_BLOCK:
    raise ValueError(
      f"model.attention='pallas' needs a sequence length that is a multiple of {FLASH_BLOCK} "
      f'(got {t}): set data.seq_len accordingly'
    )
  if kernel == 'tpu':
    return _splash(q * head_dim**-0.5, k, v, segment_ids, interpret)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # noqa: PLC0415

  group = q.shape[2] // k.shape[2]  # the GPU kernel has no grouped-query form: repeat the kv heads
  return gpu_attention.mha(
    q,
    jnp.repeat(k, group, axis=2),
    jnp.repeat(v, group, axis=2),
    segment_ids,
    sm_scale=head_dim**-0.5,
    causal=True,
    interpret=interpret,
  )


def _splash_kernel(seq_len: int, group: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
    splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
    splash_attention_mask as masks,
  )

  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * group)
  block = dict.fromkeys(
    (
      'block_q',
      'block_kv',
      'block_kv_compute',
      'block_q_dkv',
      'block_kv_dkv',
      'block_kv_dkv_compute',
      'block_q_dq',
      'block_kv_dq',
    ),
    FLASH_BLOCK,
  )
  kernel = splash.make_splash_mqa_single_device(
    mask, block_sizes=splash.BlockSizes(**block), interpret=interpret
  )
  return kernel, splash.SegmentIds


def _splash(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool) -> Array:
  """Splash attention: each kv head with its group of query heads is one multi-query problem."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  kernel, segment_type = _splash_kernel(t, n // kv_heads, interpret)
  qh = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
  out = jax.vmap(per_head)(qh, kh, vh, segment_type(q=segment_ids, kv=segment_ids))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def segment_runs(segment_ids: Array, max_runs: int) -> tuple[Array, Array]:
  """(B, T) -> offsets (B, max_runs + 1) and lengths (B, max_runs) of the runs of equal ids, -1
  where a row has fewer runs (cuDNN's ragged layout). A row with more runs loses the last ones."""
  b, t = segment_ids.shape
  starts = jnp.concatenate(
    [jnp.ones((b, 1), jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  first = jax.vmap(lambda s: jnp.nonzero(s, size=max_runs + 1, fill_value=t)[0])(starts)
  lengths = first[:, 1:] - first[:, :-1]
  offsets = jnp.where(first < t, first, -1)
  return offsets.astype(jnp.int32), jnp.where(lengths > 0, lengths, -1).astype(jnp.int32)


def _cudnn(q: Array, k: Array, v: Array, segment_ids: Array, max_segments: int) -> Array:
  # jax.nn.dot_product_attention(implementation='cudnn') has no segment ids, only one length per
  # row; its cuDNN backend takes packed (ragged) rows as offsets, which this private entry exposes.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415

  offsets, lengths = segment_runs(segment_ids, max_segments)
  return cudnn.dot_product_attention(
    q,
    k,
    v,
    q_seqlen=lengths,
    kv_seqlen=lengths,
    q_offsets=offsets,
    kv_offsets=offsets,
    scale=q.shape[-1] ** -0.5,
    mask_type=cudnn.MaskType.PADDING_CAUSAL,
  )
