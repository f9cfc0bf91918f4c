"""The embedded demo dataset: coloured shapes on a plain background, with captions and questions.

Every example is a pure function of (seed, index), so any index can be regenerated on any host. The
text is a function of the image (colours, shapes, count, top-to-bottom order), so a model that ignores
the image cannot answer well. Shapes are listed top to bottom: the order in which a raster scan, and so
the visual token sequence, meets them. Records use the LLaVA layout with encoded PNG bytes, like
converted data.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 90, 235),
    'yellow': (235, 215, 40), 'purple': (150, 60, 200), 'white': (240, 240, 240),
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


def _place_shapes(rng: np.random.Generator, width: int, height: int, count: int) -> list[Shape]:
  """Non-overlapping shapes with distinct kinds and colours, sorted top to bottom."""
  kinds = rng.choice(len(SHAPES), count, replace=False)
  colors = rng.choice(len(COLORS), count, replace=False)
  names = list(COLORS)
  shapes: list[Shape] = []
  for kind, color in zip(kinds, colors):
    for _ in range(100):
      size = int(rng.uniform(0.32, 0.5) * min(width, height))
      x0 = int(rng.integers(0, width - size))
      y0 = int(rng.integers(0, height - size))
      box = (x0, y0, x0 + size - 1, y0 + size - 1)
      if all(box[2] < s.box[0] or s.box[2] < box[0] or box[3] < s.box[1] or s.box[3] < box[1]
             for s in shapes):
        shapes.append(Shape(SHAPES[kind], names[color], box))
        break
  return sorted(shapes, key=lambda s: (s.box[1], s.box[0]))


def _describe(shapes: list[Shape]) -> str:
  parts = [f'a {s.color} {s.kind}' for s in shapes]
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return text + '.'


def _question(rng: np.random.Generator, shapes: list[Shape], kinds: tuple[str, ...]):
  kind = kinds[int(rng.integers(len(kinds)))]
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

  def __init__(self, num_examples: int, seed: int, *, min_side: int = 48, max_side: int = 112,
               max_shapes: int = 3, question_kinds: tuple[str, ...] = QUESTION_KINDS):
    unknown = set(question_kinds) - set(QUESTION_KINDS)
    if unknown:
      raise ValueError(f'Unknown question kinds {sorted(unknown)}; available: {QUESTION_KINDS}')
    if not 1 <= max_shapes <= len(SHAPES):
      raise ValueError(f'max_shapes must be in [1, {len(SHAPES)}], got {max_shapes}')
    self.num_examples, self.seed = num_examples, seed
    self.min_side, self.max_side, self.max_shapes = min_side, max_side, max_shapes
    self.question_kinds = tuple(question_kinds)

  def __len__(self) -> int:
    return self.num_examples

  def scene(self, index: int) -> tuple[Image.Image, list[Shape], np.random.Generator]:
    rng = np.random.default_rng([self.seed, index])
    width, height = (int(v) for v in rng.integers(self.min_side, self.max_side + 1, 2))
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new('RGB', (width, height), background)
    shapes = _place_shapes(rng, width, height, int(rng.integers(1, self.max_shapes + 1)))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
      _draw(draw, shape)
    return image, shapes, rng

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    image, shapes, rng = self.scene(index)
    question, answer = _question(rng, shapes, self.question_kinds)
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return {
        'id': f'shapes-{self.seed}-{index}',
        'image': buffer.getvalue(),
        'conversations': [{'from': 'human', 'value': f'<image>\n{question}'},
                          {'from': 'gpt', 'value': answer}],
    }

  def corpus(self) -> list[str]:
    """Every sentence the dataset can produce, to train the demo tokenizer on."""
    texts = ['describe the image.', 'how many shapes are there?', 'what is at the top?',
             *(f'{n}.' for n in NUMBERS), 'USER: ASSISTANT:', '\n', ', and .']
    for color in COLORS:
      for kind in SHAPES:
        texts += [f'what color is the {kind}?', f'what shape is {color}?', f'{color}.', f'{kind}.',
                  f'a {color} {kind}.', f'a {color} {kind}, a {color} {kind} and a {color} {kind}.']
    return texts
