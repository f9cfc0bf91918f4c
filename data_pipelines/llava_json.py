"""LLaVA-style conversation JSON + an image folder -> ArrayRecord shards.

  python -m data_pipelines.llava_json --json=llava_v1_5_mix665k.json --image_dir=images/ \
      --out_dir=data/llava665k --records_per_shard=5000 --workers=8

Each entry: {"id": ..., "image": "relative/path.jpg" (optional: text-only), "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.
"""

from __future__ import annotations

import json

from absl import flags

from data_pipelines import common
from evejax import cli

JSON = flags.DEFINE_string('json', None, 'LLaVA-style JSON (a list of entries) or JSON-lines file.')


def load_entries(path: str) -> list[dict]:
  with open(path) as f:
    if path.endswith('.jsonl'):
      return [json.loads(line) for line in f if line.strip()]
    entries = json.load(f)
  if not isinstance(entries, list):
    raise ValueError(f'{path}: expected a JSON list of entries, got {type(entries).__name__}')
  return entries


def items_from_entries(
  entries: list, image_dir: str, source: str
) -> list[common.FileItem | common.BadEntry]:
  """One FileItem per entry, or a BadEntry (missing image, malformed conversation) to skip."""
  items = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      items.append(
        common.BadEntry(
          f'{source} entry {i}', str(i), 'unreadable_record', f'not a JSON object: {entry!r:.80}'
        )
      )
      continue
    record_id = str(entry.get('id', i))
    items.append(
      common.file_item(
        f'{source} entry {i}',
        record_id,
        image_dir,
        entry.get('image'),
        entry.get('conversations'),
      )
    )
  return items


def main(argv):
  del argv
  items = items_from_entries(load_entries(JSON.value), common.IMAGE_DIR.value, JSON.value)
  common.write(
    items,
    common.FileRecords(common.EXTRAS_DIR.value),
    common.FileItem.describe,
    info={'converter': 'llava_json', 'input': JSON.value},
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['json', 'out_dir'])
  cli.run(main)
