"""A trained model ready to answer questions about images: preprocessing, generation, decoding.

Built from a checkpoint (`from_checkpoint`: the workdir of `python -m evejax.train`, an import
output or an official EVE folder) or from parameters in memory (`from_params`: in-training
evaluation). An evejax run answers with its own template, tokenizer and image preprocessing, so
questions look exactly like its training data; an official or imported model with the official
inference protocol (evejax/inference/official.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from evejax import sharding, storage
from evejax.checkpoint import CheckpointError, kinds, store
from evejax.config import TrainConfig
from evejax.convert import importer
from evejax.data import pipeline, templates
from evejax.data.tokenizer import Tokenizer
from evejax.inference import official
from evejax.inference import prompts as prompt_lib
from evejax.inference.generator import Generator
from evejax.inference.sampling import SamplingConfig
from evejax.models import EVE, ModelConfig, stack


def _find_tokenizer(cfg: TrainConfig, step_dir: str) -> Tokenizer:
  """The run's `data.tokenizer`, else the tokenizer the trainer saved in the workdir."""
  if cfg.data.tokenizer:
    return Tokenizer.load(cfg.data.tokenizer)
  workdir = store.workdir_of(step_dir)
  try:
    return Tokenizer.load(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'No tokenizer in {workdir}, the workdir of checkpoint {step_dir}; the trainer writes it '
      'there'
    ) from None


class LoadedCheckpoint(NamedTuple):
  config: TrainConfig  # official and imported models: the data section is the official protocol
  graphdef: nnx.GraphDef
  params: dict
  tokenizer: Tokenizer
  sampling: SamplingConfig  # the checkpoint's generation settings (official: generation_config)
  image_seen_id: int | None = None  # official EVEv2: 0 (Generator)


def _abstract(model: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, dict, dict]:
  """Graph, parameter shapes and their shardings on `mesh`, nothing allocated."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EVE(model, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef, nnx.to_pure_dict(abstract), sharding.param_shardings(abstract, mesh)


def _restore(folder: str, model: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
  """Orbax parameters (a step folder or import output) read straight into their sharded layout."""
  graphdef, abstract, shardings = _abstract(model, mesh)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  return graphdef, ocp.StandardCheckpointer().restore(store.item_dir(folder, store.PARAMS), target)


def _import(folder: str, model: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
  """An official folder's weights, converted on the host one tensor at a time, then placed."""
  graphdef, _, shardings = _abstract(model, mesh)
  params = importer.import_checkpoint(folder, model)
  return graphdef, jax.tree.map(jax.device_put, params, shardings)


def _source_files(folder: str) -> str:
  """The HF files (tokenizer, config.json) of an import output: its source/ copy, else the folder
  it was converted from when that is still there."""
  if storage.isdir(store.source_dir(folder)):
    return store.source_dir(folder)
  source = store.read_metadata(folder).get('converted_from')
  if source and storage.exists(os.path.join(source, 'config.json')):
    return source
  raise CheckpointError(
    f'{folder} has no {store.source_dir(folder)} (tokenizer and config.json of the model it was '
    'imported from); re-run python -m evejax.convert import, which writes it'
  )


def load_checkpoint(
  path: str, mesh: Mesh | None = None, *, max_size: int | None = None, template: str | None = None
) -> LoadedCheckpoint:
  """Any checkpoint (`kinds.locate`), params placed on `mesh`: an evejax run with its own setup,
  an import output or an official folder with the official protocol (`official`; `max_size` and
  `template` override its image size and template). Nothing is initialised first."""
  located = kinds.locate(path)
  mesh = mesh or sharding.make_mesh({'data': -1})
  if located.kind == kinds.RUN:
    cfg = TrainConfig.parse(store.saved_config(located.folder))
    graphdef, params = _restore(located.folder, cfg.model, mesh)
    return LoadedCheckpoint(
      cfg, graphdef, params, _find_tokenizer(cfg, located.folder), SamplingConfig()
    )
  if located.kind == kinds.IMPORT:
    files = _source_files(located.folder)
    model = store.saved_model_config(located.folder)
    graphdef, params = _restore(located.folder, model, mesh)
  else:
    files = located.folder
    model = official.model_config(files, importer.read_hf_config(files), max_size)
    graphdef, params = _import(files, model, mesh)
  cfg = official.train_config(files, model, max_size=max_size, template=template)
  tokenizer = Tokenizer.load(files)
  sampling = official.sampling(files, tokenizer)
  image_seen_id = official.IMAGE_SEEN_ID.get(model.vision_tokenizer)
  return LoadedCheckpoint(cfg, graphdef, params, tokenizer, sampling, image_seen_id)


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
  # The checkpoint's own generation settings (`cli_flags.sampling_config` starts from them):
  # evejax's defaults (greedy) for its runs, generation_config.json for an official model.
  sampling: SamplingConfig = SamplingConfig()

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
    max_size: int | None = None,
    template: str | None = None,
    image_seen_id: int | None = None,
  ) -> Assistant:
    """`max_length` defaults to the training `data.seq_len`; `resize`, `max_size` and `template`
    to the training run's; `image_seen_id`: see Generator.

    Images are encoded with the training run's BatchSpec (geometry, channels, resize multiple),
    without the training-only parts: offline teacher features and blanked pixels."""
    cfg, graphdef, params = unrolled(TrainConfig.parse(config), graphdef, params)
    data = {'resize': resize, 'max_size': max_size, 'template': template}
    cfg = dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, **{k: v for k, v in data.items() if v})
    )
    spec = cfg.batch_spec().replace(teacher_size=0)
    preprocess = pipeline.Preprocessor(tokenizer, templates.get_template(cfg.data.template), spec)
    max_length = max_length or cfg.data.seq_len
    generator = Generator(
      graphdef,
      params,
      spec=spec,
      pad_id=tokenizer.pad_id,
      max_length=max_length,
      mesh=mesh,
      image_seen_id=image_seen_id,
    )
    return cls(generator, preprocess, max_length)

  @classmethod
  def from_checkpoint(
    cls,
    path: str,
    *,
    mesh: Mesh | None = None,
    max_size: int | None = None,
    template: str | None = None,
    **kw,
  ) -> Assistant:
    """Any checkpoint `load_checkpoint` takes. `mesh` defaults to all devices on the data axis
    (batch rows split, weights replicated)."""
    mesh = mesh or sharding.make_mesh({'data': -1})
    loaded = load_checkpoint(path, mesh, max_size=max_size, template=template)
    assistant = cls.from_params(
      *loaded[:4],
      mesh=mesh,
      max_size=max_size,
      template=template,
      image_seen_id=loaded.image_seen_id,
      **kw,
    )
    stops = set(loaded.sampling.stop_tokens) | set(assistant.stop_tokens)
    assistant.sampling = dataclasses.replace(loaded.sampling, stop_tokens=tuple(sorted(stops)))
    return assistant

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
