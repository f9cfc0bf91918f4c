"""Orbax checkpoints, exact resume, weights-only initialisation and preemption handling."""
from evejax.checkpoint.init_from import load_params
from evejax.checkpoint.manager import CheckpointError, Checkpointer, layer_layout, param_shapes
from evejax.checkpoint.preemption import PreemptionWatcher

__all__ = ['CheckpointError', 'Checkpointer', 'PreemptionWatcher', 'layer_layout', 'load_params',
           'param_shapes']
