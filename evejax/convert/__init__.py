"""Weights in and out: HF Llama/Qwen2 and official EVE checkpoints <-> evejax parameters.

python -m evejax.convert import --hf_dir=Qwen2.5-7B-Instruct --config=... --out=CKPT
python -m evejax.convert export --params=CKPT --config=... --out=EXPORT [--llm_only]
python -m evejax.convert.check --hf_dir=EXPORT --config=...
"""

from evejax.convert.exporter import export_eve, export_hf_llm
from evejax.convert.importer import (
  CheckpointMismatchError,
  import_checkpoint,
  model_config_from_hf,
  read_hf_config,
  with_vision_copies,
)
from evejax.convert.keymap import TensorSpec, tensor_specs

__all__ = [
  'CheckpointMismatchError',
  'TensorSpec',
  'export_eve',
  'export_hf_llm',
  'import_checkpoint',
  'model_config_from_hf',
  'read_hf_config',
  'tensor_specs',
  'with_vision_copies',
]
