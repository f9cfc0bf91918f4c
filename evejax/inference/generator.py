"""KV-cache generation: one jitted prefill of image + prompt, then one jitted step per new token.

Shapes are static: the prompt batch is left-padded to a multiple of `length_multiple` slots and the
cache holds prefill + max_new_tokens slots, so a handful of programs serve every request. The model
only needs `embed(batch)`, `embed_tokens(ids)`, `init_cache(batch, slots)` and
`forward(x, vision_mask, positions, segment_ids, last_only=...)` (evejax/models/eve.py): the
prompt's padding has segment id 0 and its tokens 1, as have the generated tokens, so the cache's
segment ids tell each new token which slots to attend to.

EVEv2 routing: prefill routes visual tokens to the vision weights by `token_kind`; decode steps pass
no vision mask, so generated tokens use the text weights.
(The reference decides by chunk length instead: a chunk of one token is text-routed, so a prompt of
a single visual token would differ; prompts always hold text, so this never arises here.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from evejax import batch as bf
from evejax import sharding
from evejax.batch import BatchSpec
from evejax.inference import prompts as prompt_lib
from evejax.inference.sampling import SamplingConfig, next_token
from evejax.models import attention
from evejax.sharding.mesh import BATCH_AXES

Array = jax.Array


@flax.struct.dataclass
class DecodeState:
  cache: Any  # pure dict of every layer's nnx.Cache: keys, values and write index
  positions: Array  # (B,) RoPE position of `token`: expanded prompt length + earlier new tokens
  token: Array  # (B,) the last chosen token, the input of the next step
  # (B, V) bool: tokens of the prompt text or generated, for the repetition penalty; visual tokens
  # are none (see `image_seen_id`).
  seen: Array
  done: Array  # (B,) bool: the row emitted a stop token or filled its context
  output: Array  # (B, max_new_tokens) int32: chosen tokens (pad_id after a row is done)
  output_len: Array  # (B,) int32: tokens to return per row (stop token excluded)
  key: Array


def _round_up(value: int, multiple: int) -> int:
  return max(1, math.ceil(value / multiple)) * multiple


class Generator:
  """Batched generation for a model given as (graphdef, pure-dict params), optionally on a mesh."""

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    params: dict,
    *,
    spec: BatchSpec,
    pad_id: int,
    max_length: int | None = None,
    mesh: Mesh | None = None,
    length_multiple: int = 32,
    patch_multiple: int = 16,
    image_seen_id: int | None = None,
  ):
    """`spec`: the batch format of the prompts (its seq_len and patch_slots are set per batch, to
    multiples of `length_multiple` and `patch_multiple`). `max_length` caps prompt + generated
    tokens per row (the context the model trained on). `image_seen_id`: a token the repetition
    penalty counts as seen in a prompt with an image (the official EVEv2 code replaces its image
    placeholder -200 by id 0 in the ids HF `generate` penalises)."""
    self.graphdef, self.params, self.pad_id, self.mesh = graphdef, params, pad_id, mesh
    self.image_seen_id = image_seen_id
    self.spec, self.max_length = spec, max_length
    model_cfg = nnx.merge(graphdef, nnx.State(params)).cfg
    if attention.resolve(model_cfg.attention) == 'pallas':  # flash kernels take whole blocks
      length_multiple = math.lcm(length_multiple, attention.FLASH_BLOCK)
    self.length_multiple, self.patch_multiple = length_multiple, patch_multiple
    self.num_kv_heads = model_cfg.num_kv_heads

    def with_cache():
      model = nnx.merge(graphdef, nnx.State(params))
      model.init_cache(1, 1)
      return model

    self.cached_graphdef = nnx.split(nnx.eval_shape(with_cache), nnx.Param, nnx.Cache)[0]
    self._prefill = jax.jit(self._prefill_fn, static_argnames=('cache_len', 'cfg'))
    self._step = jax.jit(self._step_fn, static_argnames=('cfg',), donate_argnames=('state',))

  # --- jitted pieces -------------------------------------------------------------------------

  def _emit(self, state: DecodeState, logits: Array, cfg: SamplingConfig, index) -> DecodeState:
    """Chooses the next token of every row and records it at output column `index`."""
    key, sub = jax.random.split(state.key)
    token = next_token(logits, state.seen, sub, cfg)
    active = ~state.done
    is_stop = (
      jnp.isin(token, jnp.asarray(cfg.stop_tokens, jnp.int32))
      if cfg.stop_tokens
      else (jnp.zeros_like(active))
    )
    token = jnp.where(active, token, self.pad_id)
    rows = jnp.arange(token.shape[0])
    # `positions` is the emitted token's position: the row now holds positions + 1 tokens.
    context_full = (state.positions + 1 >= self.max_length) if self.max_length else False
    return state.replace(
      token=token,
      key=key,
      seen=state.seen.at[rows, token].set(state.seen[rows, token] | active),
      output=state.output.at[:, index].set(token),
      output_len=state.output_len + (active & ~is_stop),
      done=state.done | is_stop | context_full,
    )

  def _constrain_cache(self, cache):
    if self.mesh is None:
      return cache
    heads = 'tensor' if self.num_kv_heads % self.mesh.shape['tensor'] == 0 else None
    by_rank = {  # keys and values [B, S, K, H], segment ids [B, S], the write index
      4: NamedSharding(self.mesh, P(BATCH_AXES, None, heads, None)),
      2: NamedSharding(self.mesh, P(BATCH_AXES, None)),
      0: NamedSharding(self.mesh, P()),
    }
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_rank[x.ndim]), cache)

  def _prefill_fn(self, params, batch, key, *, cache_len: int, cfg: SamplingConfig) -> DecodeState:
    model = nnx.merge(self.graphdef, nnx.State(params))
    b, t = batch['tokens'].shape
    model.init_cache(b, cache_len)
    is_real = batch['segment_ids'] != 0
    logits = model.forward(
      model.embed(batch),
      batch['token_kind'] != bf.TEXT,
      batch['positions'],
      batch['segment_ids'],
      last_only=True,
    )[:, 0]
    is_text = (is_real & (batch['token_kind'] == bf.TEXT)).astype(jnp.int32)
    seen = (
      jnp.zeros((b, logits.shape[-1]), jnp.int32)
      .at[jnp.arange(b)[:, None], batch['tokens']]
      .max(is_text)
      > 0
    )
    if self.image_seen_id is not None:
      has_image = jnp.any(is_real & (batch['token_kind'] != bf.TEXT), axis=-1)  # [B]
      seen = seen.at[:, self.image_seen_id].set(seen[:, self.image_seen_id] | has_image)
    state = DecodeState(
      cache=self._constrain_cache(nnx.to_pure_dict(nnx.state(model, nnx.Cache))),
      positions=is_real.sum(-1).astype(jnp.int32),
      token=jnp.zeros((b,), jnp.int32),
      seen=seen,
      done=jnp.zeros((b,), jnp.bool_),
      output=jnp.full((b, cfg.max_new_tokens), self.pad_id, jnp.int32),
      output_len=jnp.zeros((b,), jnp.int32),
      key=key,
    )
    return self._emit(state, logits, cfg, 0)

  def _step_fn(self, params, state: DecodeState, index, *, cfg: SamplingConfig) -> DecodeState:
    model = nnx.merge(self.cached_graphdef, nnx.State(params), nnx.State(state.cache))
    logits = model.forward(
      model.embed_tokens(state.token[:, None]),
      None,
      state.positions[:, None],
      jnp.ones_like(state.token)[:, None],  # the segment of every real prompt token
      last_only=True,
    )[:, 0]
    state = state.replace(
      cache=nnx.to_pure_dict(nnx.state(model, nnx.Cache)),
      positions=state.positions + 1,
    )
    return self._emit(state, logits, cfg, index)

  # --- host loop -----------------------------------------------------------------------------

  def generate(
    self,
    prompts: Sequence[dict[str, np.ndarray]],
    cfg: SamplingConfig,
    *,
    seed: int = 0,
    on_step: Callable[[list[list[int]]], None] | None = None,
    check_every: int = 8,
  ) -> list[list[int]]:
    """Generated token ids per prompt (from `prompts.encode_prompt`), stop token excluded.

    `on_step` receives every row's tokens so far after each step (streaming); without it, whether
    all rows are done is checked every `check_every` steps so the host does not wait on each step.
    """
    if not prompts:
      return []
    state = self.prefill(prompts, cfg, seed=seed)
    for index in range(1, cfg.max_new_tokens):
      if on_step is not None:
        on_step(self._tokens_so_far(state, index)[: len(prompts)])
      if (on_step is not None or index % check_every == 0) and bool(jnp.all(state.done)):
        break
      state = self.step(state, index, cfg)
    tokens = self._tokens_so_far(state, cfg.max_new_tokens)[: len(prompts)]
    if on_step is not None:
      on_step(tokens)
    return tokens

  def prefill(
    self, prompts: Sequence[dict[str, np.ndarray]], cfg: SamplingConfig, *, seed: int = 0
  ) -> DecodeState:
    """Left-pads and runs the prompts; the state holds each row's first token (output column 0).
    On a mesh, the batch is filled up to a multiple of the batch axes with copies of prompt 0."""
    rows = len(prompts)
    if self.mesh is not None:
      shards = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
      prompts = list(prompts) + [prompts[0]] * (_round_up(rows, shards) - rows)
    length = _round_up(max(len(p['tokens']) for p in prompts), self.length_multiple)
    max_patches = _round_up(
      max(0 if p['patches'] is None else len(p['patches']) for p in prompts), self.patch_multiple
    )
    batch = prompt_lib.left_padded_batch(
      prompts, self.spec.replace(seq_len=length, patch_slots=max_patches, teacher_size=0)
    )
    with self._mesh_context():
      if self.mesh is not None:
        batch = sharding.shard_batch(batch, self.mesh)
      return self._prefill(
        self.params, batch, jax.random.key(seed), cache_len=length + cfg.max_new_tokens - 1, cfg=cfg
      )

  def step(self, state: DecodeState, index: int, cfg: SamplingConfig) -> DecodeState:
    """Feeds the last tokens and records the next ones at output column `index` (>= 1). `state` is
    donated: its cache is updated in place."""
    with self._mesh_context():
      return self._step(self.params, state, jnp.asarray(index, jnp.int32), cfg=cfg)

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  @staticmethod
  def _tokens_so_far(state: DecodeState, columns: int) -> list[list[int]]:
    output, lengths = jax.device_get((state.output[:, :columns], state.output_len))
    return [row[:n].tolist() for row, n in zip(output, lengths)]
