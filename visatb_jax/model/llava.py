"""LLaVA in Flax NNX: CLIP tower -> MLP projector -> splice into embeddings -> decoder -> logits.

Submodules are named as in HF `LlavaForConditionalGeneration`: `vision_tower`,
`multi_modal_projector.{linear_1, linear_2}`, `language_model`, `lm_head` (None when tied).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from visatb_jax.model.clip import CLIPVisionModel, activation
from visatb_jax.model.config import LlavaConfig
from visatb_jax.model.llama import (KVCache, LlamaModel, default_positions_and_segments, dense,
                                    lm_logits, make_lm_head)


class LlavaMultiModalProjector(nnx.Module):
  """linear_1 -> activation ("gelu" = exact erf GELU, as HF) -> linear_2."""

  def __init__(self, config: LlavaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act_name = config.projector_hidden_act
    self.linear_1 = nnx.Linear(config.vision.hidden_size, config.text.hidden_size, **kw)
    self.linear_2 = nnx.Linear(config.text.hidden_size, config.text.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.linear_2, activation(self.act_name)(dense(self.linear_1, x)))


def splice_image_features(text_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                          image_token_id: int) -> jax.Array:
  """Replaces image-token embeddings by image features, in order of appearance.

  Args:
    text_embeds: [B, L, D] token embeddings.
    input_ids: int32 [B, L].
    features: [B, M * P, D], the row's M images flattened; the k-th block of P image tokens of a
      row reads image k. A row with more image tokens than features is a data bug (the excess
      tokens reuse the last feature rather than failing inside jit).
    image_token_id: id of the image placeholder token.

  Returns:
    [B, L, D] embeddings, text tokens unchanged.
  """
  is_image = input_ids == image_token_id
  # The n-th image token of a row (0-based) takes flattened feature n.
  idx = jnp.clip(jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features, idx[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class LlavaForConditionalGeneration(nnx.Module):
  """LLaVA-style multimodal causal LM. Call: `model(input_ids, images, positions, segment_ids)`."""

  def __init__(self, config: LlavaConfig, *, remat: bool = False,
               remat_policy: Callable[..., bool] | None = None, rngs: nnx.Rngs):
    """Builds the model; parameters in `config.param_dtype`, compute in `config.dtype`.

    Args:
      config: model shape.
      remat: rematerialise each decoder layer in the backward pass.
      remat_policy: optional `jax.checkpoint_policies` policy for `remat`.
      rngs: parameter initialisation.
    """
    self.config = config
    dtype, param_dtype = config.compute_dtype, config.params_dtype
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision_tower = CLIPVisionModel(config.vision, **kw)
    self.multi_modal_projector = LlavaMultiModalProjector(config, **kw)
    self.language_model = LlamaModel(config.text, remat=remat, remat_policy=remat_policy, **kw)
    self.lm_head = make_lm_head(config.text, **kw)

  @property
  def num_image_tokens(self) -> int:
    """Image tokens per image in `input_ids`."""
    return self.config.num_image_tokens

  def image_features(self, images: jax.Array) -> jax.Array:
    """float32 images [B, M, H, W, 3] -> projected features [B, M * num_image_tokens, D_text]."""
    b, m = images.shape[:2]
    flat = images.reshape((b * m,) + images.shape[2:])
    feats = self.vision_tower.feature_layer(
        flat, self.config.vision_feature_layer,
        drop_class_token=self.config.vision_feature_select_strategy == "default")
    feats = self.multi_modal_projector(feats)
    return feats.reshape(b, m * feats.shape[1], feats.shape[-1])

  def embed_inputs(self, input_ids: jax.Array, images: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, L, D] with image features spliced in; `images` None -> text only.

    `images` is [B, M, H, W, 3] (or [B, H, W, 3] for one image per row).
    """
    embeds = self.language_model.embed_tokens(input_ids).astype(self.dtype)
    if images is None:
      return embeds
    if images.ndim == 4:
      images = images[:, None]
    if images.shape[0] != input_ids.shape[0]:
      raise ValueError(f"images batch {images.shape[0]} != input_ids batch {input_ids.shape[0]}")
    return splice_image_features(embeds, input_ids, self.image_features(images),
                                 self.config.image_token_id)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 logits [..., V]."""
    return lm_logits(hidden, self.lm_head, self.language_model.embed_tokens)

  def hidden_states(self, input_ids: jax.Array, images: jax.Array | None = None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm decoder output [B, L, D] (for losses that chunk the vocabulary themselves)."""
    positions, segment_ids = default_positions_and_segments(input_ids, positions, segment_ids)
    hidden, _ = self.language_model(self.embed_inputs(input_ids, images), positions, segment_ids)
    return hidden

  def __call__(self, input_ids: jax.Array, images: jax.Array | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids int32 [B, L] (+ images [B, M, H, W, 3]) -> logits float32 [B, L, V].

    Defaults: positions = arange(L), segment_ids = all ones.
    """
    return self.logits(self.hidden_states(input_ids, images, positions, segment_ids))

  @staticmethod
  def batch_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """`hidden_states` keyword arguments from a training Batch (data/packing.py)."""
    return dict(images=batch.get("images"), positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"))

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """Empty KV cache for generation (compute dtype)."""
    return self.language_model.init_cache(batch_size, max_len)

  def decode(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: KVCache, *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends T tokens' embeddings to `cache` and returns their logits.

    Args:
      inputs_embeds: [B, T, D] (from `embed_inputs`).
      positions: int32 [B, T].
      segment_ids: int32 [B, T] (0 = padding).
      cache: written at `cache.index`.
      last_only: return logits of the last token only ([B, 1, V]); avoids a [B, T, V] prefill.

    Returns:
      (logits float32 [B, T or 1, V], updated cache).
    """
    hidden, cache = self.language_model(inputs_embeds, positions, segment_ids, cache)
    if last_only:
      hidden = hidden[:, -1:]
    return self.logits(hidden), cache
