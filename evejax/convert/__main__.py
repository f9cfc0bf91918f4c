"""CLI: weights in and out of evejax.

# HF LLM (stage 0) or official EVE checkpoint -> evejax checkpoint (for --config.init_from=OUT)
python -m evejax.convert import --hf_dir=Qwen2.5-7B-Instruct --out=OUT [--config=cfg.py:arg
    --config.model.X=Y] [--moe_part=layernorm-self_attn-mlp --vision_copies=copy]
# evejax checkpoint (import output, workdir or step dir) -> official EVEv2 folder / plain HF LLM
python -m evejax.convert export --params=WORKDIR --out=EXPORT --tokenizer_dir=TOK [--llm_only]
"""

from __future__ import annotations

import re
import sys

from absl import flags, logging

from evejax import cli
from evejax.convert import checkpoints, exporter, importer
from evejax.convert.cli_flags import HF_DIR, PARAMS, config_from_flag
from evejax.convert.files import CheckpointReader
from evejax.inference import official

COMMANDS = ('import', 'export')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_MOE_PART = flags.DEFINE_string(
  'moe_part',
  None,
  'import without --config: the vision copies to '
  "build, e.g. 'layernorm-self_attn-mlp' (default: the file's).",
)
_PARAM_DTYPE = flags.DEFINE_string(
  'param_dtype', 'float32', 'import without --config: dtype of the evejax parameters.'
)
_VISION_COPIES = flags.DEFINE_enum(
  'vision_copies',
  'copy',
  importer.VISION_COPY_MODES,
  'import: vision copies missing from the checkpoint are copied '
  'from the LLM weights (repeat_moe) or freshly initialised.',
)
_SEED = flags.DEFINE_integer('seed', 0, 'import: seed of freshly initialised parameters.')
_LLM_ONLY = flags.DEFINE_bool('llm_only', False, 'export: the text LLM as a plain HF checkpoint.')
_SOURCE_DIR = flags.DEFINE_string(
  'source_dir',
  None,
  'export: the folder imported from (its config.json fields and generation_config.json are kept).',
)
_TOKENIZER_DIR = flags.DEFINE_string('tokenizer_dir', None, 'export: tokenizer files to copy.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'export: stored dtype.')
_VISION_TOWER = flags.DEFINE_string(
  'vision_tower',
  None,
  "export: mm_vision_tower (processor folder) in config.json; default: the release's.",
)
_CLIP_WEIGHTS = flags.DEFINE_string(
  'clip_weights',
  None,
  'export, EVEv1: the PAL teacher (CLIP ViT-L/14-336 safetensors) to include, as the releases do.',
)
_MAX_SHARD = flags.DEFINE_string(
  'max_shard_size', '5GB', 'export: largest shard (e.g. 5GB, 500MB).'
)


def parse_size(text: str) -> int:
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*', text.upper())
  if not match:
    raise ValueError(f'--max_shard_size={text!r}: use a number with KB, MB or GB, e.g. 5GB')
  return int(float(match[1]) * {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9}[match[2]])


def run_import(hf_dir: str, out: str) -> None:
  hf = importer.read_hf_config(hf_dir)
  cfg = config_from_flag()
  if cfg is None:
    overrides = dict(
      importer.vision_fields(CheckpointReader(hf_dir)), param_dtype=_PARAM_DTYPE.value
    )
    if overrides.get('pal'):  # EVE-7B-HD (1344 px) pools 2x2 tokens: from its processor's size
      overrides['pal_pool'] = official.pal_pool(hf_dir, hf)
    if _MOE_PART.value is not None:
      overrides['moe_part'] = _MOE_PART.value
    cfg = importer.model_config_from_hf(hf, **overrides)
  else:
    importer.check_config_matches(hf, cfg, hf_dir)
  logging.info('Importing %s as %s', hf_dir, cfg)
  params = importer.import_checkpoint(
    hf_dir, cfg, vision_copies=_VISION_COPIES.value, seed=_SEED.value
  )
  checkpoints.save_params(out, params, cfg, source=hf_dir)
  print(f'Wrote {out} (start training from it with --config.init_from={out})', flush=True)


def run_export(params_path: str, out: str) -> None:
  params, cfg = checkpoints.lazy_params(params_path, config_from_flag())
  kw = dict(
    source_dir=_SOURCE_DIR.value,
    tokenizer_dir=_TOKENIZER_DIR.value,
    dtype=_DTYPE.value,
    max_shard_bytes=parse_size(_MAX_SHARD.value),
  )
  if _LLM_ONLY.value:
    written = exporter.export_hf_llm(params, cfg, out, **kw)
  else:
    written = exporter.export_eve(
      params, cfg, out, vision_tower=_VISION_TOWER.value, clip_weights=_CLIP_WEIGHTS.value, **kw
    )
  print(f'Wrote {len(written)} weight files to {out}', flush=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    sys.exit(f'usage: python -m evejax.convert {{{",".join(COMMANDS)}}} --flags (see --help)')
  if not _OUT.value:
    sys.exit('--out is required')
  if argv[1] == 'import':
    if not HF_DIR.value:
      sys.exit('import needs --hf_dir')
    run_import(HF_DIR.value, _OUT.value)
  else:
    if not PARAMS.value:
      sys.exit('export needs --params')
    run_export(PARAMS.value, _OUT.value)


if __name__ == '__main__':
  cli.run(main)
