"""Orbax checkpoints, exact resume, weights-only initialisation and preemption handling; `store`
knows where a run keeps its checkpoints and files."""

from evejax.checkpoint.init_from import load_params
from evejax.checkpoint.manager import Checkpointer, layer_layout, param_shapes
from evejax.checkpoint.preemption import PreemptionWatcher
from evejax.checkpoint.store import CheckpointError

__all__ = [
  'CheckpointError',
  'Checkpointer',
  'PreemptionWatcher',
  'layer_layout',
  'load_params',
  'param_shapes',
]
