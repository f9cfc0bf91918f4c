"""Runs a multi-stage recipe: every stage in order, each initialised from the previous one's output.

  python -m evejax.recipe --recipe=eve_v2 --size=tiny --workdir=/tmp/eve_v2_tiny
  python -m evejax.recipe --recipe=eve_v2 --size=7b --workdir=gs://b/eve_v2 --stages=copy \
      --arg=data_root=gs://b/data

Stage S runs `configs/<recipe>/S.py:size=..,root=WORKDIR` into WORKDIR/S (the stage configs point
`init_from` at WORKDIR/<previous stage>). Weight-only steps (EVEv2's `copy`) run here, in memory.
A stage whose output is complete is skipped, so the same command resumes an interrupted recipe;
on a cluster, launch each training stage with launch/ and run the weight-only steps with --stages.
"""
from __future__ import annotations

import os
import runpy
from typing import Any, Mapping

import ml_collections
from absl import app, flags, logging
from etils import epath

from evejax.config_utils import apply_overrides, load_config_file
from evejax.models import ModelConfig

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
RECIPES = ('eve_v1', 'eve_v2')
WEIGHT_STEPS = ('copy',)  # Stages that transform weights without training.


def stages(recipe: str, configs_dir: str = CONFIGS_DIR) -> tuple[str, ...]:
  """The recipe's stages in order (`STAGES` of configs/<recipe>/common.py)."""
  if recipe not in RECIPES:
    raise ValueError(f'Unknown recipe {recipe!r}; available: {RECIPES}')
  return tuple(runpy.run_path(os.path.join(configs_dir, recipe, 'common.py'))['STAGES'])


def stage_config(recipe: str, stage: str, size: str, workdir: str, *, args: str = '',
                 overrides: Mapping[str, Any] | None = None,
                 configs_dir: str = CONFIGS_DIR) -> ml_collections.ConfigDict:
  """The config of one training stage, with `overrides` ({'data.num_train': 300}) applied."""
  arg = ','.join(filter(None, [f'size={size}', f'root={workdir}', args]))
  config = load_config_file(f'{os.path.join(configs_dir, recipe, stage)}.py:{arg}')
  return apply_overrides(config, overrides or {}, where=f'{recipe}/{stage}')


def copy_stage(source_dir: str, out_dir: str, cfg: ModelConfig) -> None:
  """EVEv2 weight copy (the reference's `repeat_moe`): the stage-0 model's weights, with every
  vision copy (moe_*) of the decomposed `cfg` taken from its LLM weight, saved for init_from."""
  from evejax.convert import checkpoints, importer  # Only this stage needs the conversion code.
  params, _ = checkpoints.load_params(source_dir)  # In the stage-0 model's own config.
  copied = importer.with_vision_copies(params, cfg)
  checkpoints.save_params(out_dir, copied, cfg, source=f'{source_dir} + vision copies')
  logging.info('copy: %s -> %s (vision copies <- LLM weights)', source_dir, out_dir)


def _complete(out_dir: str, config: ml_collections.ConfigDict | None) -> bool:
  """Whether a stage's output exists (local or gs://): the weights of a weight-only step, or a
  training stage's final-step checkpoint."""
  if config is None:
    return epath.Path(out_dir, 'params').is_dir()
  # Orbax renames a step directory to its final name only once the save is complete.
  return epath.Path(out_dir, 'checkpoints', str(config.total_steps)).is_dir()


def run(recipe: str, size: str, workdir: str, *, only: tuple[str, ...] = (), args: str = '',
        overrides: Mapping[str, Any] | None = None,
        configs_dir: str = CONFIGS_DIR) -> dict[str, dict[str, float]]:
  """Runs the recipe's stages (or `only` those) in order; returns each trained stage's final
  metrics. `overrides` apply to every training stage (e.g. a shorter run)."""
  from evejax.train.trainer import train  # Heavy; not needed to list stages.
  order = stages(recipe, configs_dir)
  unknown = set(only) - set(order)
  if unknown:
    raise ValueError(f'Unknown stages {sorted(unknown)} for recipe {recipe}; stages: {order}')
  results = {}
  for index, stage in enumerate(order):
    if only and stage not in only:
      continue
    out_dir = os.path.join(workdir, stage)
    if stage in WEIGHT_STEPS:
      if _complete(out_dir, None):
        logging.info('%s/%s: done already (%s)', recipe, stage, out_dir)
        continue
      following = stage_config(recipe, order[index + 1], size, workdir, args=args,
                               overrides=overrides, configs_dir=configs_dir)
      copy_stage(os.path.join(workdir, order[index - 1]), out_dir,
                 ModelConfig.from_dict(following.model))
      continue
    config = stage_config(recipe, stage, size, workdir, args=args, overrides=overrides,
                          configs_dir=configs_dir)
    if _complete(out_dir, config):
      logging.info('%s/%s: done already (%s)', recipe, stage, out_dir)
      continue
    logging.info('%s/%s: training %d steps from %s into %s', recipe, stage, config.total_steps,
                 config.init_from or 'scratch', out_dir)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    results[stage] = train(config, out_dir)
    if 'preempted' in results[stage]:  # The next stage needs this one's final weights.
      logging.warning('%s/%s preempted: run the same command again to resume', recipe, stage)
      break
  return results


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so modules can share flag names)."""
  flags.DEFINE_enum('recipe', None, RECIPES, 'Which recipe.')
  flags.DEFINE_string('size', 'tiny', "Model size: '7b', or 'tiny' for a CPU run.")
  flags.DEFINE_string('workdir', None, 'Root directory; stage S writes to WORKDIR/S.')
  flags.DEFINE_list('stages', [], 'Run only these stages (default: all, in order).')
  flags.DEFINE_string('arg', '', "More config arguments, e.g. 'data_root=/data,steps=100'.")
  flags.mark_flags_as_required(['recipe', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  results = run(f.recipe, f.size, f.workdir, only=tuple(f.stages), args=f.arg)
  for stage, final in results.items():
    shown = ', '.join(f'{k} {final[k]:.4f}' for k in ('eval/loss', 'eval/accuracy') if k in final)
    print(f'{f.recipe}/{stage}: {shown}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
