"""Local paths and object-storage URLs (`gs://`, `s3://`, ...) alike: the one home of file access.

Every path a user gives (workdir, checkpoints, init_from, data, tokenizer, config files, conversion
input and output, evaluation output, recipe and sweep roots) goes through here, on `etils.epath`
(whose `gs://` backend is fsspec's gcsfs), so a URL never turns into a local folder:
`os.path.abspath('gs://b/x')` is `<cwd>/gs:/b/x`. Path strings stay strings (`os.path.join` and
`os.path.basename` are right for URLs too); only what touches the file system is here.

Object stores have no append and no rename: an appended file is read once and rewritten whole at
each flush (metrics, quarantine lists: small files), and a single object write is already atomic
(readers see the old or the new object), so `write_atomic` writes URLs directly.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import fsspec
from etils import epath

# gcsfs caches folder listings per process; other processes, and tensorstore (Orbax's array
# writer), change the bucket behind its back, so a cached listing would hide a new checkpoint.
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def is_url(path: str | os.PathLike) -> bool:
  """`gs://bucket/x` and the like (any scheme epath serves), as opposed to a local path."""
  return '://' in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return exists(path) and not isdir(path)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open(path: str, mode: str = 'r') -> IO:  # noqa: A001 (the builtin's name, for any path)
  """`open` for a local path or a URL; modes r, w, rb, wb (appends: `Appender`)."""
  return epath.Path(path).open(mode)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def listdir(path: str) -> list[str]:
  """The names (not paths) in a folder."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def glob(directory: str, pattern: str) -> list[str]:
  """Paths in `directory` whose names match `pattern` (one level: no `**`, too many requests
  on an object store)."""
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


def files_below(folder: str) -> list[str]:
  """Every file below `folder`, at any depth, as paths relative to it. (epath's walk yields
  object-store folders without their scheme, so `relative_to` fails on them.)"""
  root = os.fspath(folder).split('://', 1)[-1]
  return sorted(
    os.path.relpath(os.path.join(os.fspath(top).split('://', 1)[-1], name), root)
    for top, _, names in epath.Path(folder).walk()
    for name in names
  )


def remove(path: str) -> None:
  epath.Path(path).unlink()


def rmtree(path: str) -> None:
  epath.Path(path).rmtree()


def rename(src: str, dst: str) -> None:
  """A file or folder to a new name (on an object store: copied, then deleted)."""
  epath.Path(src).rename(dst)


def copy(src: str, dst: str) -> None:
  """One file, between any two places (local or URL)."""
  epath.Path(src).copy(dst, overwrite=True)


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes a whole file so that no reader sees half of it: a temporary file and a rename
  locally, one object upload on an object store."""
  mode = 'wb' if isinstance(content, bytes) else 'w'
  if is_url(path):
    with open(path, mode) as f:
      f.write(content)
    return
  with local_file_for_writing(path) as tmp, builtins.open(tmp, mode) as f:
    f.write(content)


@contextlib.contextmanager
def local_file_for_writing(path: str) -> Iterator[str]:
  """A local file name to write `path` through, for writers that take only local files
  (ArrayRecord): a temporary name renamed on success locally, a temporary file uploaded on
  success for a URL. On an exception nothing appears at `path`."""
  if not is_url(path):
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
      yield tmp
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory(prefix='evejax-upload-') as folder:
    tmp = os.path.join(folder, os.path.basename(path))
    yield tmp
    copy(tmp, path)


class Appender:
  """A file appended to (`write`, `flush`, `close`; text, or bytes with `binary`): `open(path,
  'a')` locally; on an object store, the existing object is read once and the whole content is
  uploaded at each `flush` (objects cannot be appended to; metric, event and quarantine files
  stay small)."""

  def __init__(self, path: str, binary: bool = False):
    self.path = path
    self._remote = is_url(path)
    if self._remote:
      self._content = read_bytes(path) if exists(path) else b''
      self._dirty = False
    else:
      self._file = builtins.open(path, 'ab' if binary else 'a')

  def write(self, data: str | bytes) -> None:
    if not self._remote:
      self._file.write(data)
      return
    self._content += data.encode() if isinstance(data, str) else data
    self._dirty = True

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      with open(self.path, 'wb') as f:
        f.write(self._content)
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class EventFiles:
  """tensorboardX's writer factory for URLs (`register_writer_factory`): event files through
  `Appender`. Its own gs:// writer needs google-cloud-storage and uploads again from `__del__`
  after `close` (retrying for minutes once the bucket is unreachable)."""

  def open(self, path: str) -> Appender:
    return Appender(path, binary=True)

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no folders to create.
