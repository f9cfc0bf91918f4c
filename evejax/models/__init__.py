"""EVE / EVEv2 models in Flax NNX."""

from evejax.models.config import ModelConfig
from evejax.models.eve import EVE

__all__ = ['EVE', 'ModelConfig']
