"""CPU demo of EVEv1: a tiny Llama with the EVEv1 patch embedding learns the embedded shapes data,
with the patch-aligning loss (PAL) against a small CLIP ViT teacher, randomly initialised and frozen
(no download; a real run sets pal.clip_weights to a local openai/clip-vit-large-patch14-336
safetensors file and pal.clip to its dimensions, or reads offline features: pal.teacher='offline').

  python -m evejax.train --config=configs/demo_v1.py --workdir=/tmp/evejax_demo_v1
  python -m evejax.train --config=configs/demo_v1.py:pal_weight=0 --workdir=/tmp/evejax_v1_nopal
"""

from configs import demo
from evejax.config_utils import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, pal_weight=1.0)
  config = demo.get_config('model=eve_v1_tiny')
  # 28 px visual tokens: 168 px = 6 tokens on the long side (data.resize='eve_v1': long side =
  # max_size, short side rounded up to 28 px; 'pad' keeps sizes and pads with a valid-pixel mask).
  config.data.update(resize='eve_v1', max_size=168, row_patches=0, pack_window=1)
  config.data.shapes.update(cell=28)
  config.batch_size = 8
  # The teacher sees each 28 px visual token as one 14 px CLIP patch of the half-size image, so its
  # canvas is max_size / 2 (EVE-7B: 672 px EVE, 336 px CLIP).
  config.pal.update(weight=arg.pal_weight, teacher='online', seed=1, clip_weights='')
  config.pal.clip.update(
    hidden_size=64,
    intermediate_size=256,
    num_layers=3,
    num_heads=4,
    image_size=84,
    patch_size=14,
    select_layer=-2,
  )
  return config
