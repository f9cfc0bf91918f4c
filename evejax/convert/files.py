"""Reading and writing HF-style checkpoint folders one tensor at a time.

safetensors is parsed here directly (an 8-byte header size, a JSON header, raw little-endian data):
a tensor is read with one positioned read into its array (local or object storage) instead of a
memory map, so pages of tensors already converted do not stay resident, and a file is written by
planning every shard's header up front and then streaming each tensor into place. Neither
direction holds more than one tensor. `pytorch_model*.bin` files are read with
`torch.load(weights_only=True, mmap=True)`: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np

from evejax import storage

DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SAFETENSORS_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'
DEFAULT_SHARD_BYTES = 5 * 10**9  # HF `save_pretrained`'s default max_shard_size, 5GB


class SafetensorsFile:
  """The header of one .safetensors file; tensors are read on demand."""

  def __init__(self, path: str):
    self.path = path
    with storage.open(path, 'rb') as f:
      head = f.read(8)
      try:
        (size,) = struct.unpack('<Q', head)
        header = json.loads(f.read(size))
      except (struct.error, ValueError):
        raise ValueError(
          f'{path} is not a safetensors file (truncated or damaged header); download it again'
        ) from None
    self.metadata = header.pop('__metadata__', {}) or {}
    self.entries = header
    self.data_start = 8 + size

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key]['shape'])

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(DTYPES[self.entries[key]['dtype']])

  def read(self, key: str) -> np.ndarray:
    entry = self.entries[key]
    if entry['dtype'] not in DTYPES:
      raise ValueError(f'{self.path}: tensor {key!r} has unsupported dtype {entry["dtype"]}')
    dtype = np.dtype(DTYPES[entry['dtype']])
    begin, end = entry['data_offsets']
    data = np.empty((end - begin) // dtype.itemsize, dtype)
    with storage.open(self.path, 'rb') as f:  # Local or object storage (a ranged read).
      f.seek(self.data_start + begin)
      read = f.readinto(data.view(np.uint8))
    if read != end - begin or data.size != math.prod(entry['shape']):
      raise ValueError(f'{self.path}: tensor {key!r} is truncated (file shorter than its header)')
    return data.reshape(entry['shape'])


class TorchBinFile:
  """A `pytorch_model*.bin` state dict, loaded lazily with torch's safe (weights-only) unpickler."""

  def __init__(self, path: str):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        f'Reading {path} needs PyTorch (pip install torch); safetensors checkpoints do not'
      ) from e
    self.path, self._torch = path, torch
    if storage.is_url(path):  # Read whole: only local files can be memory-mapped.
      with storage.open(path, 'rb') as f:
        state = torch.load(f, map_location='cpu', weights_only=True)
    else:
      try:  # Zip-format files are memory-mapped, so only the tensor being read is loaded.
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
      except RuntimeError:  # Legacy (non-zip) format cannot be mapped.
        state = torch.load(path, map_location='cpu', weights_only=True)
    self.entries = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(self.entries) != len(state):
      raise ValueError(f'{path}: entries {sorted(set(state) - set(self.entries))} are not tensors')

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key].shape)

  def dtype(self, key: str) -> np.dtype:
    tensor = self.entries[key]
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16
      return np.dtype(ml_dtypes.bfloat16)
    return tensor.reshape(-1)[:0].numpy().dtype  # an empty view: nothing is read

  def read(self, key: str) -> np.ndarray:
    tensor = self.entries[key]
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def checkpoint_files(folder: str) -> list[str]:
  """The weight files of a HF-style checkpoint folder (sharded with an index, or single)."""
  for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
    index = os.path.join(folder, index_name)
    if storage.exists(index):
      names = sorted(set(json.loads(storage.read_text(index))['weight_map'].values()))
      missing = [n for n in names if not storage.exists(os.path.join(folder, n))]
      if missing:
        raise FileNotFoundError(f'{index} lists shards that are not in {folder}: {missing}')
      return [os.path.join(folder, n) for n in names]
  for single in ('model.safetensors', 'pytorch_model.bin'):
    if storage.exists(os.path.join(folder, single)):
      return [os.path.join(folder, single)]
  raise FileNotFoundError(
    f'No checkpoint in {folder}: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, model.safetensors or '
    'pytorch_model.bin'
  )


class CheckpointReader:
  """All tensors of a checkpoint folder by key; each `read` loads just that tensor."""

  def __init__(self, folder: str):
    self.folder = folder
    self._files = {}
    for path in checkpoint_files(folder):
      file = SafetensorsFile(path) if path.endswith('.safetensors') else TorchBinFile(path)
      for key in file.entries:
        if key in self._files:
          raise ValueError(f'Tensor {key!r} is stored twice: in {self._files[key].path} and {path}')
        self._files[key] = file

  def keys(self) -> list[str]:
    return list(self._files)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._files[key].shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._files[key].dtype(key)

  def read(self, key: str) -> np.ndarray:
    return self._files[key].read(key)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _shard_names(count: int, prefix: str = 'model') -> list[str]:
  if count == 1:
    return [f'{prefix}.safetensors']
  return [f'{prefix}-{i:05d}-of-{count:05d}.safetensors' for i in range(1, count + 1)]


class ShardedSafetensorsWriter:
  """Writes planned tensors, in plan order, into safetensors shards of at most `max_shard_bytes`
  (a larger tensor gets a shard of its own), plus `model.safetensors.index.json` when sharded."""

  def __init__(
    self, folder: str, plan: Sequence[PlannedTensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES
  ):
    self.folder = folder
    shards, size = [[]], 0
    for tensor in plan:
      if shards[-1] and size + tensor.nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(tensor)
      size += tensor.nbytes
    self._shards = list(zip(_shard_names(len(shards)), shards))
    self._queue = [(name, t) for name, tensors in self._shards for t in tensors]
    self._next, self._file, self._file_name = 0, None, None
    storage.makedirs(folder)

  @property
  def file_names(self) -> list[str]:
    return [name for name, _ in self._shards]

  def _open(self, name: str, tensors: Iterable[PlannedTensor]):
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for t in tensors:
      header[t.key] = {
        'dtype': DTYPE_NAMES[t.dtype],
        'shape': list(t.shape),
        'data_offsets': [offset, offset + t.nbytes],
      }
      offset += t.nbytes
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # data starts 8-byte aligned
    self._file = storage.open(os.path.join(self.folder, name), 'wb')
    self._file.write(struct.pack('<Q', len(blob)) + blob)
    self._file_name = name

  def write(self, key: str, value: np.ndarray):
    if self._next >= len(self._queue):
      raise ValueError(f'Tensor {key!r} was not planned; all planned tensors are written')
    name, planned = self._queue[self._next]
    if key != planned.key:
      raise ValueError(
        f'Tensors must be written in plan order: expected {planned.key!r}, got {key!r}'
      )
    if tuple(value.shape) != planned.shape:
      raise ValueError(f'{key}: shape {tuple(value.shape)} differs from planned {planned.shape}')
    if name != self._file_name:
      self._close_file()
      self._open(name, dict(self._shards)[name])
    self._file.write(np.ascontiguousarray(value, planned.dtype).reshape(-1).view(np.uint8))
    self._next += 1

  def _close_file(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self):
    """Finishes the last shard and writes the index; every planned tensor must have been written."""
    self._close_file()
    if self._next != len(self._queue):
      raise ValueError(
        f'{len(self._queue) - self._next} planned tensors were never written, '
        f'first {self._queue[self._next][1].key!r}'
      )
    if len(self._shards) > 1:
      index = {
        'metadata': {'total_size': sum(t.nbytes for _, t in self._queue)},
        'weight_map': {t.key: name for name, t in self._queue},
      }
      storage.write_atomic(
        os.path.join(self.folder, SAFETENSORS_INDEX), json.dumps(index, indent=2)
      )
