"""A trained model ready to answer questions about images: preprocessing, generation, decoding.

Built from a checkpoint (`from_checkpoint`: the workdir of `python -m evejax.train`) or from
parameters in memory (`from_params`: in-training evaluation). The prompt template, tokenizer and
image preprocessing are the training run's, so questions look exactly like training data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from evejax import sharding, storage
from evejax.checkpoint import store
from evejax.config import TrainConfig
from evejax.data import pipeline, templates
from evejax.data.tokenizer import Tokenizer
from evejax.inference import prompts as prompt_lib
from evejax.inference.generator import Generator
from evejax.inference.sampling import SamplingConfig
from evejax.models import EVE, stack


def _find_tokenizer(cfg: TrainConfig, step_dir: str) -> Tokenizer:
  """The run's `data.tokenizer`, else the tokenizer.json the trainer saved in the workdir."""
  if cfg.data.tokenizer:
    return Tokenizer.load(cfg.data.tokenizer)
  path = store.tokenizer_file(store.workdir_of(step_dir))
  if not storage.exists(path):
    raise FileNotFoundError(
      f'No tokenizer at {path}, in the workdir of checkpoint {step_dir}; '
      'the trainer writes it there'
    )
  return Tokenizer.load(path)


def load_checkpoint(path: str, mesh: Mesh | None = None):
  """(config, graphdef, params, tokenizer) of a training checkpoint, params placed on `mesh`.

  `path`: a workdir, its checkpoints/ folder (newest step) or one step folder. Parameters are read
  straight into their sharded layout (nothing is initialised first).
  """
  step_dir = store.resolve_checkpoint(path)
  cfg = TrainConfig.parse(store.saved_config(step_dir))
  mesh = mesh or sharding.make_mesh({'data': -1})
  graphdef, abstract = nnx.split(
    nnx.eval_shape(lambda: EVE(cfg.model, rngs=nnx.Rngs(0))), nnx.Param
  )
  shardings = sharding.param_shardings(abstract, mesh)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nnx.to_pure_dict(abstract),
    shardings,
  )
  params = ocp.StandardCheckpointer().restore(store.item_dir(step_dir, store.PARAMS), target)
  return cfg, graphdef, params, _find_tokenizer(cfg, step_dir)


def unrolled(cfg: TrainConfig, graphdef: nnx.GraphDef, params: dict):
  """Generation writes one KV cache per layer, so it runs the layers unrolled: a model trained
  with `model.scan_layers` gets the unrolled graph and its stacked parameters split per layer."""
  if not cfg.model.scan_layers:
    return cfg, graphdef, params
  params = unrolled_params(cfg, params)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
  graphdef = nnx.split(nnx.eval_shape(lambda: EVE(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)[0]
  return cfg, graphdef, params


def unrolled_params(cfg: TrainConfig, params: dict) -> dict:
  """`params` with stacked layers (a `model.scan_layers` run) split into `layers.N` entries."""
  if not cfg.model.scan_layers:
    return params
  return {**params, 'layers': stack.unstack_params(params['layers'])}


@dataclasses.dataclass
class Assistant:
  generator: Generator
  preprocess: pipeline.Preprocessor
  max_length: int

  @classmethod
  def from_params(
    cls,
    config: ml_collections.ConfigDict | TrainConfig,
    graphdef: nnx.GraphDef,
    params: dict,
    tokenizer: Tokenizer,
    *,
    mesh: Mesh | None = None,
    max_length: int | None = None,
    resize: str | None = None,
  ) -> Assistant:
    """`max_length` defaults to the training `data.seq_len`; `resize` to the training policy.

    Images are encoded with the training run's BatchSpec (geometry, channels, resize multiple),
    without the training-only parts: offline teacher features and blanked pixels."""
    cfg, graphdef, params = unrolled(TrainConfig.parse(config), graphdef, params)
    spec = cfg.batch_spec().replace(teacher_size=0, resize=resize or cfg.data.resize)
    preprocess = pipeline.Preprocessor(tokenizer, templates.get_template(cfg.data.template), spec)
    max_length = max_length or cfg.data.seq_len
    generator = Generator(
      graphdef, params, spec=spec, pad_id=tokenizer.pad_id, max_length=max_length, mesh=mesh
    )
    return cls(generator, preprocess, max_length)

  @classmethod
  def from_checkpoint(cls, path: str, *, mesh: Mesh | None = None, **kw) -> Assistant:
    """`mesh` defaults to all devices on the data axis (batch rows split, weights replicated)."""
    mesh = mesh or sharding.make_mesh({'data': -1})
    cfg, graphdef, params, tokenizer = load_checkpoint(path, mesh)
    return cls.from_params(cfg, graphdef, params, tokenizer, mesh=mesh, **kw)

  @property
  def tokenizer(self) -> Tokenizer:
    return self.preprocess.tokenizer

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    """The tokenizer's eos and the template's turn end (`<|im_end|>`, `</s>`) when one token."""
    stops = {self.tokenizer.eos_id}
    sep2 = (
      self.tokenizer.encode(self.preprocess.template.sep2) if self.preprocess.template.sep2 else []
    )
    if len(sep2) == 1:
      stops.add(sep2[0])
    return tuple(sorted(stops))

  def encode(
    self, question: str, image: bytes | None = None, *, history: Sequence[prompt_lib.Turn] = ()
  ) -> dict[str, np.ndarray]:
    """A question after the conversation's earlier (question, answer) turns, the image in the first.

    Raises ValueError for an unreadable image or a prompt that fills the context.
    """
    return prompt_lib.encode_prompt(
      self.preprocess, question, image, max_length=self.max_length, history=history
    )

  def answer(
    self,
    prompts: Sequence[dict[str, np.ndarray]],
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    on_text: Callable[[list[str]], None] | None = None,
  ) -> list[str]:
    """Decoded answers of encoded prompts; `on_text` streams every row's text so far."""
    if not sampling.stop_tokens:
      sampling = dataclasses.replace(sampling, stop_tokens=self.stop_tokens)
    on_step = None if on_text is None else (lambda rows: on_text([self.decode(r) for r in rows]))
    return [
      self.decode(ids)
      for ids in self.generator.generate(prompts, sampling, seed=seed, on_step=on_step)
    ]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(ids).strip()
