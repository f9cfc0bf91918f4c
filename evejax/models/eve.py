"""The EVE model: vision tokenizer -> splice into the token stream -> decoder -> norm -> LM head."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from evejax import batch as batch_format
from evejax.models import layers, stack
from evejax.models.config import ModelConfig
from evejax.models.decoder import DecoderLayer
from evejax.models.pal import PatchAligningLayer
from evejax.models.routing import Router
from evejax.models.vision import VisionTokenizerV2, splice
from evejax.models.vision_v1 import VisionTokenizerV1, image_numbers

Array = jax.Array


class EVE(nnx.Module):
  """Encoder-free VLM. Attribute names follow the reference keys (`embed_tokens`, `layers.N`...)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype,
      embedding_init=nnx.initializers.normal(layers.INIT_STD),
      embedding_metadata=layers.logical('vocab', 'embed'),
      rngs=rngs,
    )
    tokenizer = VisionTokenizerV1 if cfg.vision_tokenizer == 'v1' else VisionTokenizerV2
    self.vision_tower = tokenizer(cfg, rngs=rngs)
    # EVEv1's patch-aligning layer: training only (taps of `decode`), never at inference.
    self.pal = PatchAligningLayer(cfg, rngs=rngs) if cfg.pal else None
    if cfg.scan_layers:  # one DecoderLayer with stacked parameters (see stack.py)
      self.layers = stack.stacked_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(
      cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_param_dtype
    )
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.dense(
        cfg.hidden_size,
        cfg.vocab_size,
        ('embed', 'vocab'),
        use_bias=False,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        rngs=rngs,
      )

  def embed(self, batch: Mapping[str, Array]) -> Array:
    """Input embeddings (B, L, D) with the visual tokens spliced in at their positions."""
    vt = self.vision_tower
    if self.cfg.vision_tokenizer == 'v1':
      groups, classes, split = vt(batch['patches'], batch['patch_image'])
      # Every CLASS position takes the class token of its own image (a (B, L, D) gather).
      image_classes = jnp.take_along_axis(
        classes, image_numbers(batch['token_kind'])[..., None], axis=1
      )
      return splice(
        self.embed_tokens(batch['tokens']),
        groups,
        batch['token_kind'],
        batch['patch_index'],
        image_classes,
        split,
      )
    return splice(
      self.embed_tokens(batch['tokens']),
      vt(batch['patches']),
      batch['token_kind'],
      batch['patch_index'],
      vt.class_embedding[...],
      vt.split_embedding[...],
    )

  def logits(self, hidden: Array) -> Array:
    """Next-token logits [..., vocab] of decoder outputs [..., D] (final norm, then the head)."""
    hidden = self.norm(hidden)
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def init_cache(self, batch_size: int, max_len: int) -> None:
    """Gives every attention layer a KV cache of `max_len` slots (generation, evejax/inference)."""
    if self.cfg.scan_layers:
      raise ValueError(
        'Generation needs the unrolled layout: build the model with '
        'model.scan_layers=False (stack.unstack_params converts the parameters)'
      )
    for layer in self.layers:
      layer.self_attn.init_cache(batch_size, max_len, self.cfg.jnp_dtype)

  def decode(
    self,
    x: Array,  # [B, T, D] input embeddings
    vision_mask: Array | None,  # [B, T] bool
    positions: Array,  # [B, T] int32
    segment_ids: Array,  # [B, T] int32
    *,
    taps: tuple[int, ...] = (),
  ) -> tuple[Array, list[Array]]:
    """The decoder stack: outputs [B, T, D] (before the final norm), and the hidden states at
    `taps`, indices into HF's `hidden_states` tuple (0 = input embeddings, i = output of decoder
    layer i - 1, num_layers = the final output after the norm). `vision_mask` None routes every
    token to the text weights (EVEv2 decode steps)."""
    router = Router.create(vision_mask, self.cfg.routing)
    call = stack.layer_call(self.cfg.remat, scanned=self.cfg.scan_layers)
    # Hidden state i (0 < i < num_layers) is the output of layer i - 1.
    inner = tuple(i for i in taps if 0 < i < self.cfg.num_layers)
    layer_args = (router, positions, segment_ids)
    states = {0: x}
    x = router.enter(x)  # the layers run in the router's layout (routing.py)
    if self.cfg.scan_layers:
      x, tapped = stack.scan_layers(
        call, self.layers, x, *layer_args, taps=tuple(i - 1 for i in inner)
      )
      outputs = dict(zip(inner, tapped))
    else:
      outputs = {}
      for number, layer in enumerate(self.layers, 1):
        x = call(layer, x, *layer_args)
        if number in inner:
          outputs[number] = x
    states.update((i, router.leave(h)) for i, h in outputs.items())
    x = router.leave(x)
    if self.cfg.num_layers in taps:
      states[self.cfg.num_layers] = self.norm(x)
    return x, [states[i] for i in taps]

  def forward(
    self,
    x: Array,
    vision_mask: Array | None,
    positions: Array,
    segment_ids: Array,
    *,
    last_only: bool = False,
  ) -> Array:
    """Logits [B, T, vocab] of input embeddings (generation); `last_only`: of the last position
    only, [B, 1, vocab] (a prefill needs no more). With a KV cache, see decoder.Attention."""
    hidden, _ = self.decode(x, vision_mask, positions, segment_ids)
    return self.logits(hidden[:, -1:] if last_only else hidden)

  def hidden_states(
    self, batch: Mapping[str, Array], taps: tuple[int, ...] = ()
  ) -> tuple[Array, list[Array]]:
    """`decode` of a batch in the format of evejax/batch.py: the training losses apply `logits`
    to the outputs chunk by chunk (evejax/train/losses.py)."""
    return self.decode(
      self.embed(batch),
      batch['token_kind'] != batch_format.TEXT,
      batch['positions'],
      batch['segment_ids'],
      taps=taps,
    )

  def __call__(self, batch: Mapping[str, Array]) -> Array:
    """Next-token logits [B, L, vocab] for a batch in the format of evejax/batch.py."""
    return self.logits(self.hidden_states(batch)[0])
