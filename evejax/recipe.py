"""Runs a multi-stage recipe: every stage in order, each initialised from the previous one's output.

  python -m evejax.recipe --config=configs/eve_v2:size=tiny --workdir=/tmp/eve_v2_tiny
  python -m evejax.recipe --config=configs/eve_v2:size=7b,data_root=gs://b/data \
      --workdir=gs://b/eve_v2 --stages=copy
  python -m evejax.recipe --config=configs/eve_v2:steps=3 --workdir=/tmp/t --config.batch_size=2

`--config` names the recipe's folder (configs/eve_v1, configs/eve_v2: one config file per stage,
the order in its common.py's STAGES) and the argument every stage gets; `--config.x=y` overrides
apply to every training stage. Stage S runs `FOLDER/S.py:ARG,root=WORKDIR` into WORKDIR/S (the stage
configs point `init_from` at WORKDIR/<previous stage>). Weight-only steps (EVEv2's `copy`) run
here, in memory. A stage whose output is complete is skipped, so the same command resumes an
interrupted recipe; on a cluster, launch each training stage with launch/ and run the weight-only
steps with --stages.
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import app, flags, logging

from evejax import cli, storage
from evejax.checkpoint import store
from evejax.config_utils import apply_overrides, load_config_file, resolve_config_path
from evejax.models import ModelConfig

WEIGHT_STEPS = ('copy',)  # Stages that transform weights without training.


def _folder_and_arg(recipe: str) -> tuple[str, str]:
  """`FOLDER[:arg]` -> the recipe folder (as `resolve_config_path` finds it) and the argument."""
  path, _, arg = recipe.partition(':')
  folder = resolve_config_path(path)
  if not os.path.isfile(os.path.join(folder, 'common.py')):
    raise ValueError(f'{path} is not a recipe folder (one with a common.py that defines STAGES)')
  return folder, arg


def recipe_name(recipe: str) -> str:
  """The recipe's name, its folder's ('eve_v2'), for messages."""
  return os.path.basename(os.path.normpath(recipe.partition(':')[0]))


def stages(recipe: str) -> tuple[str, ...]:
  """The stages of `recipe` (its folder, `:arg` allowed) in order: `STAGES` of its common.py."""
  folder, _ = _folder_and_arg(recipe)
  return tuple(runpy.run_path(os.path.join(folder, 'common.py'))['STAGES'])


def _with_root(arg: str, workdir: str) -> str:
  """`arg` plus root=`workdir`: the stages write to and start from folders under the workdir."""
  roots = {
    value for key, _, value in (item.partition('=') for item in arg.split(',')) if key == 'root'
  }
  if roots - {workdir}:
    raise ValueError(
      f'root={sorted(roots)[0]} is not the recipe workdir {workdir}: the workdir '
      'is the root, leave root= out'
    )
  return arg if roots else ','.join(filter(None, [arg, f'root={workdir}']))


def stage_config(
  recipe: str, stage: str, workdir: str, *, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """The config of one training stage of `recipe` ('configs/eve_v2:size=7b': the folder and the
  argument every stage gets) under `workdir`, with `overrides` ({'data.num_train': 300})."""
  folder, arg = _folder_and_arg(recipe)
  config = load_config_file(f'{os.path.join(folder, stage)}.py:{_with_root(arg, workdir)}')
  return apply_overrides(config, overrides or {}, where=f'{recipe_name(recipe)}/{stage}')


def first_stage_config(recipe: str) -> ml_collections.ConfigDict:
  """The first training stage's config (no workdir): what the CLI checks `--config.x=y` overrides
  against and parses their values as."""
  folder, arg = _folder_and_arg(recipe)
  first = next(stage for stage in stages(recipe) if stage not in WEIGHT_STEPS)
  return load_config_file(f'{os.path.join(folder, first)}.py:{arg}')


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
    return storage.isdir(store.item_dir(out_dir, store.PARAMS))
  # Orbax renames a step directory to its final name only once the save is complete.
  return storage.isdir(store.step_dir(store.checkpoints_dir(out_dir), config.total_steps))


def run(
  recipe: str,
  workdir: str,
  *,
  only: tuple[str, ...] = (),
  overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
  """Runs the stages of `recipe` ('configs/eve_v2:size=tiny', see stage_config), or `only` those,
  in order; returns each trained stage's final metrics. `overrides` apply to every training stage
  (e.g. a shorter run)."""
  from evejax.train.trainer import train  # Heavy; not needed to list stages.

  order, label = stages(recipe), recipe_name(recipe)
  unknown = set(only) - set(order)
  if unknown:
    raise ValueError(f'Unknown stages {sorted(unknown)} for recipe {label}; stages: {order}')
  results = {}
  for index, stage in enumerate(order):
    if only and stage not in only:
      continue
    out_dir = os.path.join(workdir, stage)
    if stage in WEIGHT_STEPS:
      if _complete(out_dir, None):
        logging.info('%s/%s: done already (%s)', label, stage, out_dir)
        continue
      following = stage_config(recipe, order[index + 1], workdir, overrides=overrides)
      copy_stage(
        os.path.join(workdir, order[index - 1]), out_dir, ModelConfig.from_dict(following.model)
      )
      continue
    config = stage_config(recipe, stage, workdir, overrides=overrides)
    if _complete(out_dir, config):
      logging.info('%s/%s: done already (%s)', label, stage, out_dir)
      continue
    logging.info(
      '%s/%s: training %d steps from %s into %s',
      label,
      stage,
      config.total_steps,
      config.init_from or 'scratch',
      out_dir,
    )
    storage.makedirs(out_dir)
    results[stage] = train(config, out_dir)
    if 'preempted' in results[stage]:  # The next stage needs this one's final weights.
      logging.warning('%s/%s preempted: run the same command again to resume', label, stage)
      break
  return results


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so modules can share flag names)."""
  cli.define_config_flag(
    "The recipe's folder and the argument of every stage, e.g. "
    "'configs/eve_v2:size=7b,data_root=gs://b/data'; --config.x=y overrides "
    'apply to every training stage.',
    load=first_stage_config,
  )
  flags.DEFINE_string('workdir', None, 'Root directory; stage S writes to WORKDIR/S.')
  flags.DEFINE_list('stages', [], 'Run only these stages (default: all, in order).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  recipe = cli.config_spec()
  results = run(
    recipe, flags.FLAGS.workdir, only=tuple(flags.FLAGS.stages), overrides=cli.config_overrides()
  )
  for stage, final in results.items():
    shown = ', '.join(f'{k} {final[k]:.4f}' for k in ('eval/loss', 'eval/accuracy') if k in final)
    print(f'{recipe_name(recipe)}/{stage}: {shown}', flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
