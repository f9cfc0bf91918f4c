"""EVEv1 patch-aligning layer and loss against NumPy; gradient flow; truncated image tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evejax import batch as bf
from evejax.batch import BatchSpec
from evejax.config import PalConfig, TrainConfig
from evejax.data import encode, images
from evejax.models import EVE
from evejax.models import pal as pal_layer
from evejax.models.clip import CLIPVision, CLIPVisionConfig
from evejax.train import pal as pal_lib
from tests.test_eve_v1 import TINY, np_layer_norm

CFG = dataclasses.replace(TINY, pal=True, pal_layer_rate=1, pal_teacher_size=8, pal_heads=2)


def row_spec(cfg, seq_len, patch_slots, **image):
  return BatchSpec.for_model(cfg, seq_len=seq_len, patch_slots=patch_slots, **image)


def test_tap_indices_are_the_reference_ones():
  assert pal_layer.tap_indices(32, 4) == (32, 28, 24, 20, 16, 12, 8, 4, 0)


def test_cosine_loss_matches_numpy_per_image_average():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
  patch_image = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 0, 0]])
  valid = np.array([[True, False, True, True, True], [False, False, False, True, True]])
  cos = (pred * target).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(target, axis=-1)
  # Row 0 image 1: token 0; image 2: tokens 2, 3. Row 1 image 1 has no valid token: left out.
  expected = np.mean([1 - cos[0, 0], 1 - cos[0, 2:4].mean()])
  got = pal_lib.cosine_loss(
    jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid), jnp.asarray(patch_image)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  nothing = pal_lib.cosine_loss(
    jnp.asarray(pred), jnp.asarray(target), jnp.zeros((2, 5), bool), jnp.asarray(patch_image)
  )
  assert float(nothing) == 0.0


def test_pal_layer_matches_numpy():
  layer = pal_layer.PatchAligningLayer(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  tapped = [rng.normal(size=(3, CFG.hidden_size)).astype(np.float32) for _ in layer.taps]
  got = np.asarray(layer([jnp.asarray(t) for t in tapped]))
  c, heads = CFG.pal_teacher_size, CFG.pal_heads
  z = np.stack(
    [
      np_layer_norm(t, n.norm) @ np.asarray(n.proj.kernel[...])
      for n, t in zip(layer.norm_layer, tapped)
    ],
    axis=1,
  )  # (3, T, c)
  for i in range(3):
    attended = []
    for q, kv in zip(np.split(z[i, 0], heads), np.split(z[i, 1:], heads, axis=-1)):
      logits = kv @ q * c**-0.5
      w = np.exp(logits - logits.max())
      attended.append((w / w.sum()) @ kv)
    expected = (
      tapped[0][i] @ np.asarray(layer.input_layer.kernel[...])
      + np.asarray(layer.input_layer.bias[...])
      + np.concatenate(attended) @ np.asarray(layer.output_layer.kernel[...])
      + np.asarray(layer.output_layer.bias[...])
    )
    np.testing.assert_allclose(got[i], expected, atol=1e-5, rtol=1e-4)


def _batch(seq_len=40):
  rng = np.random.default_rng(2)
  pics = [
    images.with_valid_channel(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), 28),
    images.with_valid_channel(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), 28),
  ]
  ex = encode.encode_example(
    [1, bf.IMAGE_TOKEN_INDEX, 5, bf.IMAGE_TOKEN_INDEX, 6, 7],
    [False, False, True, False, True, True],
    [images.patchify(p, 14, 2) for p in pics],
  )
  row = encode.pack_row([ex], row_spec(CFG, seq_len, 12))
  return {k: jnp.asarray(v)[None] for k, v in row.items()}


def _teacher():
  clip_cfg = CLIPVisionConfig(
    hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, image_size=42, patch_size=14
  )
  return CLIPVision(clip_cfg, rngs=nnx.Rngs(3))


def _loss(graphdef, params, teacher_graphdef, teacher_params, batch):
  teacher = lambda b: nnx.merge(teacher_graphdef, teacher_params).patch_features(
    b['patches'], b['patch_image'], b['patch_coords']
  )
  objective = pal_lib.PalObjective(1.0, teacher)
  return objective(nnx.merge(graphdef, params), batch)[1]


def test_pal_gradients_reach_decoder_and_patch_embedding_never_the_teacher():
  graphdef, params = nnx.split(EVE(CFG, rngs=nnx.Rngs(0)))
  teacher_graphdef, teacher_params = nnx.split(_teacher())
  grad_fn = jax.jit(jax.grad(_loss, argnums=(1, 3)), static_argnums=(0, 2))
  grads, teacher_grads = grad_fn(graphdef, params, teacher_graphdef, teacher_params, _batch())
  norm = lambda tree: float(optax_norm(tree))
  assert norm(grads['layers'][0]) > 0 and norm(grads['layers'][CFG.num_layers - 1]) > 0
  assert norm(grads['vision_tower']['patch_embedding']) > 0
  assert norm(grads['vision_tower']['local_attention']) > 0
  assert norm(grads['pal']) > 0
  assert norm(teacher_grads) == 0.0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_truncated_image_tokens_use_only_the_surviving_patches():
  batch = _batch()
  graphdef, params = nnx.split(EVE(CFG, rngs=nnx.Rngs(0)))
  model = nnx.merge(graphdef, params)
  target = jax.random.normal(jax.random.key(0), (1, 12, CFG.pal_teacher_size))
  # Cut the sequence inside the second image: its CLASS token, first row (2 PATCH + SPLIT) and one
  # PATCH of its second row survive; that row is partly padding (40 px of 56), so it never counts.
  cut = 16
  truncated = dict(batch)
  for key in (
    'tokens',
    'token_kind',
    'patch_index',
    'positions',
    'segment_ids',
    'targets',
    'loss_weights',
  ):
    truncated[key] = batch[key][:, :cut]
  hidden, tapped = model.hidden_states(truncated, model.pal.taps)
  assert hidden.shape[1] == cut
  loss = pal_lib.PalObjective(1.0, lambda b: target)(model, truncated)[1]
  # NumPy: predictions of the surviving PATCH positions, mapped to their groups.
  kind, index = np.asarray(truncated['token_kind'][0]), np.asarray(truncated['patch_index'][0])
  pred = np.asarray(model.pal([t[0] for t in tapped]))
  groups = index[kind == bf.PATCH]
  assert list(groups) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
  valid = np.asarray(pal_lib.valid_groups(batch['patches'])[0])
  image = np.asarray(batch['patch_image'][0])
  t = np.asarray(target[0])
  per_image = []
  for number in (1, 2):
    cos = [
      pred[pos] @ t[g] / np.linalg.norm(pred[pos]) / np.linalg.norm(t[g])
      for pos, g in zip(np.flatnonzero(kind == bf.PATCH), groups)
      if image[g] == number and valid[g]
    ]
    per_image.append(1 - np.mean(cos))
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), np.mean(per_image), rtol=1e-4)


def test_offline_teacher_features_are_packed_per_group_and_checked():
  rng = np.random.default_rng(4)
  groups, grid = images.patchify(
    images.with_valid_channel(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8), 28), 14, 2
  )
  ex = encode.encode_example([bf.IMAGE_TOKEN_INDEX, 3], [False, True], [(groups, grid)])
  ex['teacher_features'] = rng.normal(size=(2, 8)).astype(np.float32)
  row = encode.pack_row([ex, ex], row_spec(CFG, 16, 5, teacher_size=8))
  np.testing.assert_array_equal(
    row['teacher_features'][:4], np.concatenate([ex['teacher_features']] * 2)
  )
  assert not row['teacher_features'][4].any()
  ex['teacher_features'] = ex['teacher_features'][:1]
  with pytest.raises(ValueError, match=r'teacher_features field of shape \(2, 8\)'):
    encode.pack_row([ex], row_spec(CFG, 16, 5, teacher_size=8))
  with pytest.raises(ValueError, match="pal.teacher='online'"):
    pal_lib.offline_teacher({'patches': None})


def _demo_v1_records(tmp_path, num: int) -> tuple:
  """configs/demo_v1.py over `num` demo images written as converted records, and that config."""
  from configs import demo_v1  # pylint: disable=import-outside-toplevel
  from evejax.data import records, shapes  # pylint: disable=import-outside-toplevel

  config = demo_v1.get_config()
  kw = dict(config.data.shapes, question_kinds=('caption',), turns=1)
  dataset = shapes.ShapesDataset(num, 7, **kw)
  records.write_dataset(
    list(range(num)),
    dataset.__getitem__,
    str(tmp_path / 'plain'),
    'train',
    num_shards=2,
    info={'corpus': dataset.corpus()},
  )
  config.data.update(
    source='records',
    path=str(tmp_path / 'with_teacher'),
    template='plain',
    pack_window=4,
    row_patches=3 * 49,
    seq_len=3 * 64,
  )
  return config


def test_offline_teacher_features_from_records_equal_the_online_teacher(tmp_path):
  """data_pipelines/teacher_features.py -> records -> loader -> packed rows: every group's offline
  feature is what the online teacher computes for that group of the packed batch, so PAL gives
  the same loss both ways; features that differ change the loss."""
  from data_pipelines import teacher_features  # pylint: disable=import-outside-toplevel
  from evejax.data import pipeline, records  # pylint: disable=import-outside-toplevel

  config = _demo_v1_records(tmp_path, 12)
  teacher_features.teacher_dataset(
    config, str(tmp_path / 'plain'), config.data.path, 'train', dtype='float32'
  )
  source = records.RecordSource(config.data.path, 'train')
  assert source[0]['extras']['teacher_features'].shape[1] == config.pal.clip.hidden_size
  cfg = TrainConfig.parse(config)
  model_cfg = cfg.model
  offline = dataclasses.replace(cfg, pal=dataclasses.replace(cfg.pal, teacher='offline'))
  spec = offline.batch_spec()
  assert spec.teacher_size == model_cfg.pal_teacher_size and spec.channels == 4
  pre = pipeline.make_preprocessor(cfg.data, pipeline.load_tokenizer(cfg.data, source), spec)
  ds = pipeline.make_dataset(source, pre, 2, seed=0, shuffle=False, num_epochs=1, pack_window=4)
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  assert int(batch['segment_ids'].max()) > 1  # Several examples per row: offsets matter.
  online = pal_lib.online_teacher(cfg.pal, model_cfg)(batch)
  used = np.asarray(batch['patch_image'] > 0)
  assert used.sum() > 50
  np.testing.assert_allclose(
    np.asarray(batch['teacher_features'])[used], np.asarray(online)[used], atol=1e-5
  )
  model = EVE(model_cfg, rngs=nnx.Rngs(0))
  loss = lambda teacher: float(pal_lib.PalObjective(1.0, teacher)(model, batch)[1])
  offline_loss = loss(pal_lib.offline_teacher)
  assert 0.0 < offline_loss < 2.0
  np.testing.assert_allclose(offline_loss, loss(lambda b: online), rtol=1e-5)
  flipped = dict(batch, teacher_features=-batch['teacher_features'])
  assert (
    abs(float(pal_lib.PalObjective(1.0, pal_lib.offline_teacher)(model, flipped)[1]) - offline_loss)
    > 1e-3
  )
  # A record without features is a bad record named by shard and index, never a silent zero.
  plain = records.RecordSource(str(tmp_path / 'plain'), 'train')
  bad = pipeline.ReadAndEncode(plain, pre)(7)
  assert (bad.kind, bad.shard, bad.index) == (
    'bad_teacher_features',
    plain.location(7)['shard'],
    plain.location(7)['index'],
  )
  assert 'teacher_features field of shape' in bad.reason


def test_hd_pal_averages_2x2_token_blocks_like_numpy():
  """pal_pool=2 (EVE-7B-HD): hidden states averaged over each whole 2x2 block of a 4x6-token image
  (truncation cuts the last block row), the prediction at the block's top-left token, a
  padded block left out."""
  cfg = dataclasses.replace(CFG, pal_pool=2)
  rng = np.random.default_rng(5)
  pixels = images.with_valid_channel(rng.integers(0, 256, (112, 160, 3), dtype=np.uint8), 28)
  groups, grid = images.patchify(pixels, 14, 2)
  assert grid == (4, 6)  # 160 px padded to 168: the last token column is partly padding
  ex = encode.encode_example([1, bf.IMAGE_TOKEN_INDEX, 5], [False, False, True], [(groups, grid)])
  cut = 2 + 1 + 2 * 7 + 4  # text, CLASS, two full rows of 6 + SPLIT, 4 tokens of row 3
  row = encode.pack_row([ex], row_spec(cfg, len(ex['tokens']), 24))
  batch = {
    k: jnp.asarray(v[:cut] if v.shape[0] == len(ex['tokens']) else v)[None] for k, v in row.items()
  }
  model = EVE(cfg, rngs=nnx.Rngs(0))
  target = jax.random.normal(jax.random.key(1), (1, 24, cfg.pal_teacher_size))
  loss = pal_lib.PalObjective(1.0, lambda b: target)(model, batch)[1]

  _, tapped = model.hidden_states(batch, model.pal.taps)
  kind, index = np.asarray(batch['token_kind'][0]), np.asarray(batch['patch_index'][0])
  position = {int(g): int(pos) for pos, g in enumerate(index) if kind[pos] == bf.PATCH}
  cos = []
  for block_row in range(2):
    for block_col in range(3):
      members = [(2 * block_row + dy) * 6 + 2 * block_col + dx for dy in (0, 1) for dx in (0, 1)]
      if not all(m in position for m in members) or block_col == 2:  # cut off, or padding
        continue
      pooled = [np.mean([np.asarray(t[0, position[m]]) for m in members], axis=0) for t in tapped]
      pred = np.asarray(model.pal([jnp.asarray(p) for p in pooled]))
      t = np.asarray(target[0, members[0]])
      cos.append(pred @ t / np.linalg.norm(pred) / np.linalg.norm(t))
  assert len(cos) == 2  # blocks (0, 0) and (0, 1); row 1's blocks lost their bottom tokens
  np.testing.assert_allclose(float(loss), 1 - np.mean(cos), rtol=1e-4)
  with pytest.raises(ValueError, match='needs pal.teacher=offline'):
    pal_lib.objective_from_config(PalConfig(weight=1.0, teacher='online'), cfg)


def test_hd_offline_features_sit_at_block_anchors_and_sides_round_to_56px():
  coords = np.array([(r, c) for r in range(2) for c in range(4)])
  features = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)  # the 1 x 2 teacher grid
  placed = encode.teacher_features_at_anchors(features, coords, 2, 3)
  np.testing.assert_array_equal(placed[[0, 2]], features)
  assert not placed[[1, 3, 4, 5, 6, 7]].any()
  with pytest.raises(
    ValueError,
    match=r'model.pal_pool=2 needs a teacher_features field of '
    r'shape \(2, 3\)',
  ):
    encode.teacher_features_at_anchors(features[:1], coords, 2, 3)
  # EVE-7B-HD resizes the short side to a multiple of 56 px (2 tokens), the 672 model to 28 px.
  assert images.target_size(1000, 430, 1344, 56, 'eve_v1') == (1344, 616)
  assert images.target_size(1000, 430, 1344, 28, 'eve_v1') == (1344, 588)
  for raw, hd in [
    ((1024, 1024), (1344, 1344)),
    ((640, 480), (1344, 1008)),
    ((300, 200), (1344, 896)),
  ]:  # EVE_REFERENCE.md §2.2
    assert images.target_size(*raw, 1344, 56, 'eve_v1') == hd
