"""AdamW with linear warmup + cosine decay and global-norm clipping (the reference recipe), with
freezing and per-group learning rates as regex rules over parameter paths.

Parameter paths are '/'-joined, e.g. 'layers/3/self_attn/moe_q_proj/kernel'. In `config.optim`:

  trainable='.*'   # re.search: parameters matching it train ...
  frozen=''        # ... unless they match this ('' = none). The rest is frozen: no update and no
                   # optimizer state.
  groups=dict(vision=dict(pattern='^vision_tower/', lr=4e-4))  # Own peak learning rates;
                   # the trainable rest is group 'base' at optim.lr. Two groups may not overlap.

Every group runs the same schedule shape (warmup, cosine decay) scaled to its own peak.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
  from evejax.config import OptimConfig

PyTree = Any
BASE = 'base'  # Trainable parameters in no named group.
FROZEN = 'frozen'


def learning_rate_schedule(
  optim_cfg: OptimConfig, total_steps: int, peak: float | None = None
) -> optax.Schedule:
  """Warmup + cosine decay to `peak` (default optim.lr, the base group's)."""
  peak = optim_cfg.lr if peak is None else peak
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=optim_cfg.warmup_steps,
    decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
    end_value=peak * optim_cfg.end_lr_ratio,
  )


def decay_mask(params) -> dict:
  """Weight decay on matrices only; biases, norms and 1-D embeddings are exempt (as in HF)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def param_name(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def _groups(optim_cfg: OptimConfig) -> Mapping[str, Mapping[str, Any]]:
  for name in optim_cfg.groups:
    if name in (BASE, FROZEN):
      raise ValueError(f'optim.groups.{name}: {BASE!r} and {FROZEN!r} are reserved group names')
  return optim_cfg.groups


def param_labels(optim_cfg: OptimConfig, params: PyTree) -> PyTree:
  """The group of every parameter (a tree of names like `params`): a named group, BASE or FROZEN.

  Raises if a rule matches nothing (a typo would otherwise silently train or freeze the wrong set)
  or a parameter falls in two groups."""
  trainable = re.compile(optim_cfg.trainable)
  frozen = re.compile(optim_cfg.frozen) if optim_cfg.frozen else None
  groups = {name: re.compile(g['pattern']) for name, g in _groups(optim_cfg).items()}
  names = [param_name(path) for path, _ in jax.tree.leaves_with_path(params)]

  def label(name: str) -> str:
    if not trainable.search(name) or (frozen and frozen.search(name)):
      return FROZEN
    hits = [group for group, rule in groups.items() if rule.search(name)]
    if len(hits) > 1:
      raise ValueError(f'Parameter {name} matches optim.groups {hits}; make the patterns disjoint')
    return hits[0] if hits else BASE

  labels = [label(name) for name in names]
  if all(lab == FROZEN for lab in labels):
    raise ValueError(
      f'optim.trainable={trainable.pattern!r} and optim.frozen='
      f'{optim_cfg.frozen!r} leave no trainable parameter; parameters '
      f'look like {names[:3]}'
    )
  for group, rule in groups.items():
    if group not in labels:
      raise ValueError(
        f'optim.groups.{group}.pattern={rule.pattern!r} matches no trainable '
        f'parameter; parameters look like {names[:3]}'
      )
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def trainable_mask(optim_cfg: OptimConfig, params: PyTree) -> PyTree:
  return jax.tree.map(lambda label: label != FROZEN, param_labels(optim_cfg, params))


def make_optimizer(optim_cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Frozen parameters get zero updates and hold no state (optax.masked leaves them out)."""

  def adamw(peak: float) -> optax.GradientTransformation:
    return optax.adamw(
      learning_rate_schedule(optim_cfg, total_steps, peak),
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=decay_mask,
    )

  def frozen_mask(params):
    return jax.tree.map(lambda t: not t, trainable_mask(optim_cfg, params))

  # Zero frozen gradients first, so clipping measures the trainable ones only.
  parts = [optax.masked(optax.set_to_zero(), frozen_mask)]
  if optim_cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  transforms = {
    BASE: adamw(optim_cfg.lr),
    FROZEN: optax.set_to_zero(),
    **{name: adamw(g['lr']) for name, g in _groups(optim_cfg).items()},
  }
  parts.append(optax.multi_transform(transforms, lambda p: param_labels(optim_cfg, p)))
  return optax.chain(*parts)


def group_summary(optim_cfg: OptimConfig, params: PyTree) -> str:
  """A table of parameter counts per group (trainable groups first, then frozen)."""
  labels = jax.tree.leaves(param_labels(optim_cfg, params))
  sizes = [int(p.size) for p in jax.tree.leaves(params)]
  peaks = {BASE: optim_cfg.lr, **{n: g['lr'] for n, g in _groups(optim_cfg).items()}}
  order = [*peaks, FROZEN]
  total = sum(sizes)
  rows = [('group', 'peak lr', 'tensors', 'parameters', 'share')]
  for group in order:
    count = sum(s for s, lab in zip(sizes, labels) if lab == group)
    tensors = sum(lab == group for lab in labels)
    if tensors:
      rows.append(
        (
          group,
          f'{peaks[group]:.3g}' if group in peaks else '-',
          str(tensors),
          f'{count:,}',
          f'{100 * count / total:.1f}%',
        )
      )
  trainable = sum(s for s, lab in zip(sizes, labels) if lab != FROZEN)
  rows.append(
    (
      'trainable',
      '',
      str(sum(lab != FROZEN for lab in labels)),
      f'{trainable:,}',
      f'{100 * trainable / total:.1f}%',
    )
  )
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join(
    '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    for r in rows
  )
