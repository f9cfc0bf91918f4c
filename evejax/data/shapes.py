"""The embedded demo dataset: coloured shapes on a plain background, with captions and questions.

Every example is a pure function of (seed, index), so any index can be regenerated on any host. The
text is a function of the image (colours, shapes, count, top-to-bottom order), so a model that
ignores the image cannot answer well. Images are grids of `cell`-pixel cells of varied size and
aspect ratio; each shape sits inside one cell, at most one per cell row, so shapes are listed top to
bottom, the order in which the visual token sequence meets them. With cells equal to the visual
token size (32 px for the reference 16 px patches merged 2x2) a token sees a whole shape, which a
tiny model learns in minutes on a CPU. Records use the LLaVA layout with encoded PNG bytes, like
converted data.

`text_only=True` gives the same scenes and questions as text: no image, the scene's description in
the prompt where the image would be. A language model learns to answer them by reading, so the
held-out text-only loss measures the LLM's language ability before and after vision training.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
  'red': (220, 40, 40),
  'green': (40, 180, 60),
  'blue': (50, 90, 235),
  'yellow': (235, 215, 40),
  'purple': (150, 60, 200),
  'white': (240, 240, 240),
}
SHAPES = ('circle', 'square', 'triangle')
NUMBERS = ('zero', 'one', 'two', 'three')
QUESTION_KINDS = ('caption', 'color', 'shape', 'count', 'top')


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel bounds)

  @property
  def center(self) -> tuple[int, int]:
    return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
  x0, y0, x1, y1 = shape.box
  fill = COLORS[shape.color]
  if shape.kind == 'circle':
    draw.ellipse(shape.box, fill=fill)
  elif shape.kind == 'square':
    draw.rectangle(shape.box, fill=fill)
  else:
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _place_shapes(
  rng: np.random.Generator, rows: int, cols: int, cell: int, count: int
) -> list[Shape]:
  """Shapes with distinct kinds and colours, one per grid cell and at most one per cell row, sorted
  top to bottom. Each sits inside its cell at a random size and offset."""
  kinds = rng.choice(len(SHAPES), count, replace=False)
  colors = rng.choice(len(COLORS), count, replace=False)
  shape_rows = np.sort(rng.choice(rows, count, replace=False))
  names = list(COLORS)
  shapes = []
  for kind, color, row in zip(kinds, colors, shape_rows):
    size = int(rng.uniform(0.75, 0.95) * cell)
    x0 = int(rng.integers(cols)) * cell + int(rng.integers(0, cell - size + 1))
    y0 = int(row) * cell + int(rng.integers(0, cell - size + 1))
    shapes.append(Shape(SHAPES[kind], names[color], (x0, y0, x0 + size - 1, y0 + size - 1)))
  return shapes


def _describe(shapes: list[Shape]) -> str:
  parts = [f'a {s.color} {s.kind}' for s in shapes]
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return text + '.'


def _question(rng: np.random.Generator, shapes: list[Shape], kind: str) -> tuple[str, str]:
  target = shapes[int(rng.integers(len(shapes)))]
  if kind == 'caption':
    return 'describe the image.', _describe(shapes)
  if kind == 'color':
    return f'what color is the {target.kind}?', f'{target.color}.'
  if kind == 'shape':
    return f'what shape is {target.color}?', f'{target.kind}.'
  if kind == 'count':
    return 'how many shapes are there?', f'{NUMBERS[len(shapes)]}.'
  top = shapes[0]
  return 'what is at the top?', f'a {top.color} {top.kind}.'


class ShapesDataset:
  """A random-access source of `num_examples` demo records (LLaVA layout, PNG bytes)."""

  def __init__(
    self,
    num_examples: int,
    seed: int,
    *,
    cell: int = 32,
    min_cells: int = 2,
    max_cells: int = 5,
    max_shapes: int = 3,
    turns: int = 1,
    question_kinds: tuple[str, ...] = QUESTION_KINDS,
    text_only: bool = False,
  ):
    unknown = set(question_kinds) - set(QUESTION_KINDS)
    if unknown:
      raise ValueError(f'Unknown question kinds {sorted(unknown)}; available: {QUESTION_KINDS}')
    if not 1 <= max_shapes <= len(SHAPES):
      raise ValueError(f'max_shapes must be in [1, {len(SHAPES)}], got {max_shapes}')
    if not 1 <= turns <= len(question_kinds):
      raise ValueError(
        f'turns must be in [1, {len(question_kinds)}] (one question kind per turn), got {turns}'
      )
    if min_cells < 1 or max_cells < min_cells:
      raise ValueError(f'Need 1 <= min_cells <= max_cells, got {min_cells}, {max_cells}')
    self.num_examples, self.seed = num_examples, seed
    self.cell, self.min_cells, self.max_cells = cell, min_cells, max_cells
    self.max_shapes, self.turns = max_shapes, turns
    self.question_kinds = tuple(question_kinds)
    self.text_only = text_only

  def __len__(self) -> int:
    return self.num_examples

  def scene(self, index: int) -> tuple[Image.Image, list[Shape], np.random.Generator]:
    rng = np.random.default_rng([self.seed, index])
    cols, rows = (int(v) for v in rng.integers(self.min_cells, self.max_cells + 1, 2))
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new('RGB', (cols * self.cell, rows * self.cell), background)
    count = min(int(rng.integers(1, self.max_shapes + 1)), rows)
    shapes = _place_shapes(rng, rows, cols, self.cell, count)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
      _draw(draw, shape)
    return image, shapes, rng

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    image, shapes, rng = self.scene(index)
    kinds = rng.choice(len(self.question_kinds), self.turns, replace=False)
    conversation = []
    context = f'{_describe(shapes)}\n' if self.text_only else '<image>\n'
    for turn, kind in enumerate(kinds):
      question, answer = _question(rng, shapes, self.question_kinds[kind])
      conversation += [
        {'from': 'human', 'value': (context if turn == 0 else '') + question},
        {'from': 'gpt', 'value': answer},
      ]
    record = {'id': f'shapes-{self.seed}-{index}', 'conversations': conversation}
    if not self.text_only:
      buffer = io.BytesIO()
      image.save(buffer, format='PNG')
      record['image'] = buffer.getvalue()
    return record

  def corpus(self) -> list[str]:
    """Every question and answer the dataset can produce, as they appear in a prompt (answers follow
    a space), to train the demo tokenizer on."""
    questions = ['describe the image.', 'how many shapes are there?', 'what is at the top?']
    answers = [f'{n}.' for n in NUMBERS]
    for color in COLORS:
      for kind in SHAPES:
        questions += [f'what color is the {kind}?', f'what shape is {color}?']
        answers += [
          f'{color}.',
          f'{kind}.',
          f'a {color} {kind}, a {color} {kind} and a {color} {kind}.',
        ]
    return [
      f'USER: <image>\n{q} ASSISTANT: {a}<|im_end|>USER: {q}' for q in questions for a in answers
    ]
