"""In-training evaluation: the harness on a benchmark file, with the parameters being trained.

Configured by the `benchmark` config section (evejax/config.py BenchmarkConfig; the trainer decides
when it is due). Generation is compiled once; later runs reuse it with the current parameters.
"""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from evejax.config import BenchmarkConfig, TrainConfig
from evejax.data.tokenizer import Tokenizer
from evejax.evaluation import harness
from evejax.evaluation.records import read_jsonl
from evejax.inference.assistant import Assistant, unrolled_params
from evejax.inference.sampling import SamplingConfig


class PeriodicBenchmark:
  def __init__(
    self,
    cfg: BenchmarkConfig,
    config: TrainConfig,
    graphdef: nnx.GraphDef,
    params: dict,
    tokenizer: Tokenizer,
    mesh: Mesh | None = None,
  ):
    """`cfg`: the `benchmark` section; `config`: the whole training config (the model and how its
    data was encoded)."""
    self.config, self.batch_size = config, cfg.batch_size
    self.records = read_jsonl(cfg.file)[: cfg.limit or None]
    self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    self.assistant = Assistant.from_params(config, graphdef, params, tokenizer, mesh=mesh)

  def __call__(self, params: dict) -> dict[str, float]:
    """'bench/...' metrics of the benchmark answered with `params`."""
    self.assistant.generator.params = unrolled_params(self.config, params)
    predictions = harness.predict(
      self.assistant, self.records, self.sampling, batch_size=self.batch_size
    )
    return {f'bench/{k}': v for k, v in harness.score(self.records, predictions).items()}
