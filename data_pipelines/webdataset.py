"""Webdataset-style tar shards (KEY.jpg|png|... + KEY.txt caption or KEY.json) -> ArrayRecord.

  python -m data_pipelines.webdataset --tars='laion/*.tar' --out_dir=data/laion

A KEY.json may hold "conversations" (LLaVA layout) or "caption"; KEY.txt is a caption. Samples
without an image or without text are an error naming the tar and key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from typing import Any

from absl import flags

from data_pipelines import common
from evejax import cli

TARS = flags.DEFINE_list('tars', None, 'Tar files or glob patterns (comma-separated).')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif')


@dataclasses.dataclass(frozen=True)
class TarItem:
  tar: str
  key: str
  image: str  # Member names.
  text: str

  def describe(self) -> str:
    return f'{common.file_signature(self.tar)}|{self.key}'


def scan_tar(path: str) -> list[TarItem]:
  """Groups a tar's members by key (the name up to the first dot of the base name)."""
  samples: dict[str, dict[str, str]] = {}
  with tarfile.open(path) as tar:
    for member in tar.getmembers():
      if not member.isfile():
        continue
      directory, base = os.path.split(member.name)
      stem, _, ext = base.partition('.')
      samples.setdefault(os.path.join(directory, stem), {})[ext.lower()] = member.name
  items = []
  for key, members in samples.items():
    images = [members[e] for e in IMAGE_EXTENSIONS if e in members]
    text = members.get('json') or members.get('txt')
    if len(images) != 1 or text is None:
      raise ValueError(
        f'{path}: sample {key!r} has members {sorted(members)}; each sample needs '
        f'one image ({"/".join(IMAGE_EXTENSIONS)}) and a .txt or .json'
      )
    items.append(TarItem(path, key, images[0], text))
  return items


class TarRecords:
  """TarItem -> record (runs in the conversion processes; tar files stay open per process)."""

  def __init__(self, extras_dir: str = ''):
    self.extras_dir = extras_dir
    self._members = common.TarMembers()

  def __call__(self, item: TarItem) -> dict[str, Any]:
    text = self._members.read(item.tar, item.text).decode('utf-8')
    if item.text.endswith('.json'):
      meta = json.loads(text)
      if 'conversations' in meta:
        conversations = meta['conversations']
      elif 'caption' in meta:
        conversations = common.caption_conversation(meta['caption'])
      else:
        raise ValueError(f'{item.tar}: {item.text} has neither "conversations" nor "caption"')
    else:
      conversations = common.caption_conversation(text.strip())
    record = {
      'id': item.key,
      'image': self._members.read(item.tar, item.image),
      'conversations': conversations,
    }
    extras = common.read_extras(self.extras_dir, item.key)
    if extras:
      record['extras'] = extras
    return record


def main(argv):
  del argv
  tars = common.expand_globs(TARS.value)
  items = [item for path in tars for item in scan_tar(path)]
  common.write(
    items,
    TarRecords(common.EXTRAS_DIR.value),
    TarItem.describe,
    info={'converter': 'webdataset', 'input': tars},
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['tars', 'out_dir'])
  cli.run(main)
