"""Freezing and per-group learning rates (evejax/train/optim.py) against a NumPy AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.config import OptimConfig
from evejax.train import optim

PARAMS = {
  'embed_tokens': {'embedding': np.full((6, 4), 0.5, np.float32)},
  'layers': {
    0: {
      'mlp': {'up_proj': {'kernel': np.full((4, 8), -0.25, np.float32)}},
      'moe_mlp': {'up_proj': {'kernel': np.full((4, 8), 0.75, np.float32)}},
      'input_layernorm': {'scale': np.ones((4,), np.float32)},
    }
  },
  'vision_tower': {
    'patch_conv': {'kernel': np.full((12, 4), 0.1, np.float32), 'bias': np.zeros((4,), np.float32)}
  },
}


def optim_cfg(**kw) -> OptimConfig:
  base = dict(
    lr=1e-2,
    warmup_steps=2,
    end_lr_ratio=0.1,
    weight_decay=0.1,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    grad_clip=0.5,
    trainable='.*',
    frozen='',
    groups={},
  )
  return OptimConfig(**{**base, **kw})


def names(tree) -> dict[str, object]:
  return {optim.param_name(p): v for p, v in jax.tree.leaves_with_path(tree)}


def test_labels_follow_trainable_frozen_and_group_rules():
  cfg = optim_cfg(
    trainable='^vision_tower/|/moe_|/mlp/',
    frozen='/mlp/',
    groups={'vision': {'pattern': '^vision_tower/', 'lr': 1e-3}},
  )
  assert names(optim.param_labels(cfg, PARAMS)) == {
    'embed_tokens/embedding': 'frozen',
    'layers/0/mlp/up_proj/kernel': 'frozen',  # trainable, then excluded by `frozen`
    'layers/0/moe_mlp/up_proj/kernel': 'base',
    'layers/0/input_layernorm/scale': 'frozen',
    'vision_tower/patch_conv/kernel': 'vision',
    'vision_tower/patch_conv/bias': 'vision',
  }


@pytest.mark.parametrize(
  'kw, message',
  [
    (dict(trainable='^nothing'), 'leave no trainable parameter'),
    (dict(groups={'v': {'pattern': '^vison_tower/', 'lr': 1.0}}), 'matches no trainable'),
    (
      dict(groups={'a': {'pattern': 'up_proj', 'lr': 1.0}, 'b': {'pattern': 'moe_', 'lr': 1.0}}),
      'matches optim.groups',
    ),
    (dict(groups={'frozen': {'pattern': 'vision', 'lr': 1.0}}), 'reserved'),
    (dict(groups={'v': {'pattern': 'vision', 'peak': 1.0}}), 'pattern=REGEX and lr='),
  ],
)
def test_bad_rules_are_clear_errors(kw, message):
  with pytest.raises(ValueError, match=message):
    optim.param_labels(optim_cfg(**kw), PARAMS)


def numpy_adamw(params, grads_per_step, peaks, trainable, cfg, total_steps):
  """Independent AdamW: clipping over trainable gradients only, decay on matrices only."""
  mu = {n: np.zeros_like(p) for n, p in params.items()}
  nu = {n: np.zeros_like(p) for n, p in params.items()}
  params = {n: p.astype(np.float64) for n, p in params.items()}
  for step, grads in enumerate(grads_per_step):
    norm = np.sqrt(sum((grads[n].astype(np.float64) ** 2).sum() for n in trainable))
    scale = min(1.0, cfg.grad_clip / norm)
    for name in trainable:
      g = grads[name] * scale
      mu[name] = cfg.b1 * mu[name] + (1 - cfg.b1) * g
      nu[name] = cfg.b2 * nu[name] + (1 - cfg.b2) * g * g
      m_hat = mu[name] / (1 - cfg.b1 ** (step + 1))
      v_hat = nu[name] / (1 - cfg.b2 ** (step + 1))
      peak = peaks[name]
      if step < cfg.warmup_steps:
        lr = peak * step / cfg.warmup_steps
      else:
        t = (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps)
        end = peak * cfg.end_lr_ratio
        lr = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * t))
      decay = cfg.weight_decay * params[name] if params[name].ndim > 1 else 0.0
      params[name] = params[name] - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + decay)
  return params


def test_updates_match_numpy_adamw_per_group_and_frozen_stay_bit_identical():
  cfg = optim_cfg(
    trainable='^vision_tower/|/moe_', groups={'vision': {'pattern': '^vision_tower/', 'lr': 3e-2}}
  )
  total_steps = 5
  tx = optim.make_optimizer(cfg, total_steps)
  params = jax.tree.map(jnp.asarray, PARAMS)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grads_per_step = [
    jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), PARAMS) for _ in range(4)
  ]
  update = jax.jit(tx.update)
  for grads in grads_per_step:
    updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)

  flat_init = names(PARAMS)
  trainable = {n for n in flat_init if n.startswith('vision_tower/') or '/moe_' in n}
  peaks = {n: 3e-2 if n.startswith('vision_tower/') else 1e-2 for n in flat_init}
  expected = numpy_adamw(
    flat_init, [names(g) for g in grads_per_step], peaks, trainable, cfg, total_steps
  )
  for name, value in names(params).items():
    if name in trainable:
      np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-6, err_msg=name)
      assert not np.array_equal(value, flat_init[name]), name
    else:
      assert np.array_equal(np.asarray(value), flat_init[name]), name  # Bit-identical.


def test_frozen_parameters_hold_no_optimizer_state():
  cfg = optim_cfg(trainable='^vision_tower/')
  state = optim.make_optimizer(cfg, 10).init(jax.tree.map(jnp.asarray, PARAMS))
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  vision = [p for n, p in names(PARAMS).items() if n.startswith('vision_tower/')]
  # Adam's mu and nu for the two vision tensors, nothing else (counts are scalars).
  assert sorted(x.size for x in arrays) == sorted(2 * [p.size for p in vision])


def test_group_summary_counts():
  cfg = optim_cfg(
    trainable='^vision_tower/|/moe_', groups={'vision': {'pattern': '^vision_tower/', 'lr': 1e-3}}
  )
  table = optim.group_summary(cfg, PARAMS)
  rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
  assert rows['base'][1:4] == ['0.01', '1', '32']  # moe_mlp up_proj 4x8
  assert rows['vision'][1:4] == ['0.001', '2', '52']  # 12x4 + 4
  assert rows['frozen'][2:4] == ['3', '60']  # 6x4 + 4x8 + 4
  assert rows['trainable'][1:3] == ['3', '84']


def test_train_step_skips_frozen_weight_gradients():
  """With `trainable` the step gives the same result for less compute: frozen parameters are
  constants of the loss, so their weight gradients are not computed."""
  from flax import nnx

  from evejax.batch import BatchSpec
  from evejax.models import EVE, ModelConfig
  from evejax.models.presets import model_preset
  from evejax.sharding.synthetic import random_batch
  from evejax.train.step import TrainState, make_train_step

  cfg = ModelConfig.from_dict(dict(model_preset('eve_v2_tiny'), num_layers=1))
  graphdef, state = nnx.split(EVE(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = state.to_pure_dict()
  ocfg = optim_cfg(trainable='^vision_tower/', warmup_steps=1, weight_decay=0.0)
  tx = optim.make_optimizer(ocfg, 10)
  spec = BatchSpec.for_model(cfg, seq_len=64, patch_slots=16)
  batch = jax.tree.map(jnp.asarray, random_batch(spec, 4, cfg.vocab_size))
  results, flops = [], []
  for trainable in (None, optim.trainable_mask(ocfg, params)):
    step = make_train_step(
      graphdef, tx, optim.learning_rate_schedule(ocfg, 10), trainable=trainable
    )
    train_state = TrainState.create(jax.tree.map(jnp.copy, params), tx.init(params))
    flops.append(step.lower(train_state, batch).compile().cost_analysis()['flops'])
    for _ in range(2):
      train_state, (_, step_metrics) = step(train_state, batch)
    results.append(names(train_state.params))
  for name, value in results[1].items():
    np.testing.assert_allclose(value, results[0][name], rtol=1e-5, atol=1e-7, err_msg=name)
  assert flops[1] < 0.85 * flops[0], flops
