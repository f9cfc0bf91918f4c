"""In-training evaluation: the harness on a benchmark file, with the parameters being trained.

Configured by the trainer's `benchmark` config section (file: a records.py JSONL file, '' = off;
every: steps between runs, 0 = only at the end; limit: first N items, 0 = all; batch_size;
max_new_tokens).
Generation is compiled once; later runs reuse it with the current parameters.
"""
from __future__ import annotations

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from evejax.data.tokenizer import Tokenizer
from evejax.evaluation import harness
from evejax.evaluation.records import read_jsonl
from evejax.inference.assistant import Assistant, unrolled_params
from evejax.inference.sampling import SamplingConfig


class PeriodicBenchmark:

  def __init__(self, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               graphdef: nnx.GraphDef, params: dict, tokenizer: Tokenizer,
               mesh: Mesh | None = None):
    """`cfg`: the `benchmark` section; `config`: the whole training config."""
    self.config, self.every, self.batch_size = config, cfg.every, cfg.batch_size
    self.records = read_jsonl(cfg.file)[:cfg.limit or None]
    self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    self.assistant = Assistant.from_params(config, graphdef, params, tokenizer, mesh=mesh)

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every) and step % self.every == 0

  def __call__(self, params: dict) -> dict[str, float]:
    """'bench/...' metrics of the benchmark answered with `params`."""
    self.assistant.generator.params = unrolled_params(self.config, params)
    predictions = harness.predict(self.assistant, self.records, self.sampling,
                                  batch_size=self.batch_size)
    return {f'bench/{k}': v for k, v in harness.score(self.records, predictions).items()}
