"""evejax: encoder-free vision-language models (EVE, EVEv2) in JAX/Flax."""

__version__ = '0.1.0'
