"""Optional Weights & Biases logging of a run (`metrics.wandb`), as the official EVE scripts report.

Off unless `metrics.wandb.project` is set. Offline mode (the default) writes the run under
`{workdir}/wandb` with no network; `wandb sync {workdir}/wandb/offline-run-*` uploads it later.
The run id is derived from the workdir, so a resumed run appends to the same W&B run. Needs the
`wandb` extra (`pip install 'evejax[wandb]'`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from evejax.config import WandbConfig


def run_id(workdir: str) -> str:
  """A stable W&B run id for a workdir (W&B ids allow [a-z0-9]; 16 hex digits)."""
  return hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


class WandbWriter:
  """Logs every `write(step, scalars)` to one W&B run with the run's config."""

  def __init__(self, cfg: WandbConfig, workdir: str, config: Mapping[str, Any]):
    try:
      import wandb  # The `wandb` extra; only runs that ask for it need it.
    except ImportError as error:
      raise ImportError(
        f'metrics.wandb.project={cfg.project!r} needs the wandb package: pip install '
        "'evejax[wandb]' (or set metrics.wandb.project='' to log without W&B)"
      ) from error
    os.makedirs(workdir, exist_ok=True)
    self._run = wandb.init(
      project=cfg.project,
      entity=cfg.entity or None,
      group=cfg.group or None,
      name=cfg.name or os.path.basename(os.path.normpath(workdir)),
      mode=cfg.mode,
      dir=workdir,
      id=run_id(workdir),
      resume='allow',
      config=dict(config),
    )

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def close(self) -> None:
    self._run.finish()
