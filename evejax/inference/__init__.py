"""Generation with a KV cache: prompts, sampling, the batched generator."""

from evejax.inference.generator import Generator
from evejax.inference.prompts import encode_prompt, prompt_ids
from evejax.inference.sampling import SamplingConfig

__all__ = ['Generator', 'SamplingConfig', 'encode_prompt', 'prompt_ids']
