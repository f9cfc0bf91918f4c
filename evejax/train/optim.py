"""AdamW with linear warmup + cosine decay and global-norm clipping (the reference recipe)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
      end_value=optim_cfg.lr * optim_cfg.end_lr_ratio)


def decay_mask(params) -> dict:
  """Weight decay on matrices only; biases, norms and 1-D embeddings are exempt (as in HF)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim_cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(optim_cfg, total_steps), b1=optim_cfg.b1,
                           b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
