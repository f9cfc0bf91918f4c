"""evejax checkpoints on the conversion side, in the layout of evejax.checkpoint (issue 6):

  {dir}/params     Orbax parameter pytree (what `--config.init_from={dir}` reads)
  {dir}/metadata   JSON: {'config': {'model': ...}, 'converted_from': ...}

Training step directories (`{workdir}/checkpoints/{step}`) have the same two items, so `export`
reads either.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from evejax.checkpoint.init_from import resolve_params_dir
from evejax.convert import keymap
from evejax.models import ModelConfig


def save_params(directory: str, params: Mapping, cfg: ModelConfig, source: str) -> None:
  """Writes imported parameters where `--config.init_from=directory` (and `export`) finds them."""
  metadata = {'config': {'model': dataclasses.asdict(cfg)}, 'converted_from': source}
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.path.abspath(directory), ocp.args.Composite(
      params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(metadata)))


def saved_model_config(params_dir: str) -> ModelConfig:
  """The model config stored beside a `params` item (import output or training step)."""
  step_dir = os.path.dirname(params_dir)
  if not os.path.isdir(os.path.join(step_dir, 'metadata')):
    raise FileNotFoundError(f'No metadata beside {params_dir} to read the model config from; '
                            'pass --config')
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      step_dir, ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  model = restored['metadata'].get('config', {}).get('model')
  if model is None:
    raise ValueError(f'{step_dir}/metadata has no config.model; pass --config')
  return ModelConfig.from_dict(model)


def load_params(path: str, cfg: ModelConfig | None = None) -> tuple[dict, ModelConfig]:
  """Parameters (numpy, on this host) of an import output, a workdir, a checkpoints directory
  (newest step) or a step directory; `cfg` defaults to the one saved with them."""
  params_dir = resolve_params_dir(path)
  cfg = cfg or saved_model_config(params_dir)
  target = keymap.abstract_params(cfg)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  params = ocp.PyTreeCheckpointer().restore(params_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args))
  return params, cfg
