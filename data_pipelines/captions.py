"""A CSV or Parquet table of (local image path, caption) -> ArrayRecord shards.

python -m data_pipelines.captions --table=pairs.parquet --image_dir=images/ --out_dir=data/cc3m
"""

from __future__ import annotations

import csv

from absl import flags

from data_pipelines import common
from evejax import cli

TABLE = flags.DEFINE_string('table', None, 'A .csv (with a header row) or .parquet file.')
IMAGE_COLUMN = flags.DEFINE_string('image_column', 'image', 'Column of image paths.')
CAPTION_COLUMN = flags.DEFINE_string('caption_column', 'caption', 'Column of captions.')
ID_COLUMN = flags.DEFINE_string('id_column', '', 'Column of record ids; default: the row number.')


def read_table(path: str) -> list[dict]:
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # Only needed for Parquet input.

    return pq.read_table(path).to_pylist()
  if path.endswith('.csv'):
    with open(path, newline='') as f:
      return list(csv.DictReader(f))
  raise ValueError(f'{path}: --table must be a .csv or .parquet file')


def items_from_rows(
  rows: list[dict],
  image_dir: str,
  source: str,
  image_column: str = 'image',
  caption_column: str = 'caption',
  id_column: str = '',
) -> list[common.FileItem | common.BadEntry]:
  """One FileItem per row, or a BadEntry (missing image, empty caption) to skip."""
  if rows:
    missing = {image_column, caption_column, id_column} - {''} - set(rows[0])
    if missing:
      raise ValueError(
        f'{source} has no column(s) {sorted(missing)}; it has {sorted(rows[0])} '
        '(see --image_column / --caption_column / --id_column)'
      )
  items = []
  for i, row in enumerate(rows):
    record_id = str(row[id_column]) if id_column else str(i)
    conversation = common.caption_conversation(row[caption_column])
    items.append(
      # Every row has an image: an empty cell is a bad image, not a text-only record.
      common.file_item(
        f'{source} row {i}', record_id, image_dir, row[image_column] or '', conversation
      )
    )
  return items


def main(argv):
  del argv
  items = items_from_rows(
    read_table(TABLE.value),
    common.IMAGE_DIR.value,
    TABLE.value,
    IMAGE_COLUMN.value,
    CAPTION_COLUMN.value,
    ID_COLUMN.value,
  )
  common.write(
    items,
    common.FileRecords(common.EXTRAS_DIR.value),
    common.FileItem.describe,
    info={'converter': 'captions', 'input': TABLE.value},
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['table', 'out_dir'])
  cli.run(main)
