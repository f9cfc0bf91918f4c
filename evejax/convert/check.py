"""Logit parity between evejax and PyTorch on the same image + text input.

  python -m evejax.convert.check --hf_dir=EXPORT [--params=CKPT] [--image=cat.jpg]
      [--prompt='<image>\\nDescribe the image.'] [--atol=1e-3] [--config=cfg.py:arg]

The PyTorch side loads `--hf_dir`: with `transformers` for a plain Llama/Qwen2 folder and a text
prompt, otherwise with evejax.convert.torch_reference (the reference EVEv2 forward). The evejax side
is `--params` (an evejax checkpoint) or, by default, `--hf_dir` imported with evejax.convert. Prints
max abs / relative logit difference, KL divergence and top-k agreement; exits 1 above `--atol`.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from evejax import batch as bf
from evejax import cli, storage
from evejax.batch import BatchSpec
from evejax.convert import checkpoints, importer
from evejax.convert.cli_flags import CONFIG, HF_DIR, PARAMS, config_from_flag
from evejax.convert.files import CheckpointReader
from evejax.data import encode, images
from evejax.data.tokenizer import Tokenizer
from evejax.models import EVE, ModelConfig

_IMAGE = flags.DEFINE_string(
  'image', None, 'Image file; default: a fixed random image when the model has a vision tower.'
)
_PROMPT = flags.DEFINE_string(
  'prompt',
  f'{bf.IMAGE_PLACEHOLDER}\nDescribe the image.',
  f'Prompt; {bf.IMAGE_PLACEHOLDER} marks where the image goes.',
)
_IDS = flags.DEFINE_list('ids', None, 'Token ids instead of --prompt (-200 = the image).')
_TOKENIZER = flags.DEFINE_string(
  'tokenizer_dir', None, 'Folder of tokenizer.json (default --hf_dir).'
)
# Named apart from the generation flags (--max_size, --top_k of evejax.inference.cli_flags): absl
# refuses a name defined twice in one process, and the tests import both.
_MAX_SIZE = flags.DEFINE_integer(
  'image_max_size', 448, 'Image area budget (side of a square), pixels.'
)
_TORCH = flags.DEFINE_enum(
  'torch_impl',
  'auto',
  ['auto', 'transformers', 'reference'],
  'PyTorch model: transformers (plain LLM, text) or the reference forward.',
)
_TOP_K = flags.DEFINE_integer('agreement_k', 5, 'k of the top-k agreement.')
_ATOL = flags.DEFINE_float('atol', None, 'Exit with status 1 if max |logit diff| exceeds this.')


def compare_logits(
  evejax_logits: np.ndarray, torch_logits: np.ndarray, top_k: int = 5
) -> dict[str, float]:
  """Parity metrics over positions; both (L, vocab). KL is KL(torch || evejax), mean over L."""
  a, b = np.asarray(evejax_logits, np.float64), np.asarray(torch_logits, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'logit shapes differ: evejax {a.shape}, torch {b.shape}')
  diff = np.abs(a - b)
  log_p = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
  log_q = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
  top_a = np.argsort(-a, axis=-1)[:, :top_k]
  top_b = np.argsort(-b, axis=-1)[:, :top_k]
  overlap = [len(set(x) & set(y)) / top_k for x, y in zip(top_a, top_b)]
  return {
    'max_abs_diff': float(diff.max()),
    'max_rel_diff': float(diff.max() / max(np.abs(b).max(), 1e-30)),
    'kl_divergence': float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()),
    'top1_agreement': float((top_a[:, 0] == top_b[:, 0]).mean()),
    f'top{top_k}_overlap': float(np.mean(overlap)),
  }


def format_report(metrics: dict[str, float], positions: int) -> str:
  lines = [f'{"metric":<22}{"value":>14}', '-' * 36]
  lines += [f'{k:<22}{v:>14.6g}' for k, v in metrics.items()]
  lines.append(f'{"positions":<22}{positions:>14d}')
  return '\n'.join(lines)


def model_config(hf_dir: str, reader: CheckpointReader, cfg: ModelConfig | None) -> ModelConfig:
  """`cfg` (a `--config` model), checked against the folder's config.json, or else the model of
  config.json and the weights."""
  hf = importer.read_hf_config(hf_dir)
  if cfg is not None:
    importer.check_config_matches(hf, cfg, hf_dir)
    return cfg
  return importer.model_config_from_hf(hf, **importer.vision_fields(reader))


def prompt_ids(prompt: str, tokenizer_dir: str) -> list[int]:
  """The reference's tokenizer_image_token: chunks around `<image>`, joined by IMAGE_TOKEN_INDEX."""
  tokenizer = Tokenizer.load(tokenizer_dir)
  ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  for i, chunk in enumerate(prompt.split(bf.IMAGE_PLACEHOLDER)):
    ids += ([bf.IMAGE_TOKEN_INDEX] if i else []) + tokenizer.encode(chunk)
  return ids


def image_spec(cfg: ModelConfig, max_size: int) -> BatchSpec:
  """The model's batch format for one image resized by the EVEv2 training rule (the row's length
  and patch slots are set per input)."""
  return BatchSpec.for_model(
    cfg, seq_len=0, patch_slots=0, max_size=max_size, resize='eve_v2_train'
  )


def load_pixels(path: str | None, spec: BatchSpec) -> np.ndarray:
  """RGB uint8 (H, W, 3), resized per `spec`; a fixed random image if no path."""
  if path is None:  # a non-square grid, so a row/column mix-up shows
    t, n = spec.token_pixels, max(spec.max_size // spec.token_pixels, 1)
    return np.random.default_rng(0).integers(0, 256, (n * t, max(n * 3 // 4, 1) * t, 3), np.uint8)
  image = images.decode_image(storage.read_bytes(path))
  return np.asarray(images.resize(image, spec))


def evejax_logits(
  cfg: ModelConfig, spec: BatchSpec, params, ids: list[int], pixels: np.ndarray | None
) -> np.ndarray:
  image_list = [] if pixels is None else [images.patch_groups(pixels, spec)]
  example = encode.encode_example(ids, [False] * len(ids), image_list)
  row = encode.pack_row(
    [example],
    spec.replace(
      seq_len=len(example['tokens']), patch_slots=max(1, sum(len(g) for g, _ in image_list))
    ),
  )
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: EVE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  forward = jax.jit(lambda p, b: nnx.merge(graphdef, nnx.State(p))(b))
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  return np.asarray(forward(params, batch))[0]


def torch_logits(hf_dir: str, impl: str, ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel

  if impl == 'transformers':
    import transformers  # pylint: disable=import-outside-toplevel

    if pixels is not None:
      raise ValueError('--torch_impl=transformers runs text only; use reference for images')
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
      return model.eval()(torch.tensor([ids])).logits[0].numpy()
  from evejax.convert.torch_reference import TorchEVE  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    return TorchEVE.from_folder(hf_dir).logits(ids, [] if pixels is None else [pixels]).numpy()


def main(argv):
  del argv
  hf_dir = HF_DIR.value
  reader = CheckpointReader(hf_dir)
  cfg = model_config(hf_dir, reader, config_from_flag())
  has_vision = bool(importer.vision_fields(reader))
  if _IDS.value:
    ids = [int(i) for i in _IDS.value]
  else:
    prompt = _PROMPT.value if has_vision else _PROMPT.value.replace(bf.IMAGE_PLACEHOLDER, '')
    ids = prompt_ids(prompt, _TOKENIZER.value or hf_dir)
  spec = image_spec(cfg, _MAX_SIZE.value)
  pixels = load_pixels(_IMAGE.value, spec) if bf.IMAGE_TOKEN_INDEX in ids else None
  impl = _TORCH.value
  if impl == 'auto':
    impl = 'transformers' if pixels is None and not has_vision else 'reference'
  if PARAMS.value:
    params, cfg = checkpoints.load_params(PARAMS.value, cfg if CONFIG.value else None)
  else:
    params = importer.import_checkpoint(hf_dir, cfg)
  got = evejax_logits(cfg, spec, params, ids, pixels)
  del params
  want = torch_logits(hf_dir, impl, ids, pixels)
  metrics = compare_logits(got, want, _TOP_K.value)
  print(
    f'evejax vs PyTorch ({impl}) on {os.path.basename(os.path.normpath(hf_dir))}: '
    f'{len(ids)} ids, {"one image" if pixels is not None else "no image"}'
  )
  print(format_report(metrics, len(got)), flush=True)
  if _ATOL.value is not None and metrics['max_abs_diff'] > _ATOL.value:
    sys.exit(f'FAILED: max |logit diff| {metrics["max_abs_diff"]:.3g} > --atol={_ATOL.value}')


if __name__ == '__main__':
  flags.mark_flag_as_required('hf_dir')
  cli.run(main)
