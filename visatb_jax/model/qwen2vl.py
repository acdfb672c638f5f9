"""Qwen2-VL in Flax NNX: ViT with 2-D rotary -> 2x2 patch merger -> Qwen2 decoder with M-RoPE.

Module paths follow transformers' `Qwen2VLForConditionalGeneration` (without its `model.` level):
`visual.patch_embed.proj`, `visual.blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}`, `visual.merger.{ln_q, mlp[0], mlp[2]}`, `language_model.*` (the Llama decoder of
llama.py, Qwen2 flavour: q/k/v biases) and `lm_head` (None when tied). Leaves use NNX names
(`kernel` [in, out], `bias`, `scale`, `embedding`); qwen2vl_io maps them to the checkpoint.

Images arrive in one of two layouts, both made on the host from each image's grid (t, h, w) in
patches, so that everything shape-dependent enters the jitted model as arrays:

- `RowImages`, the training and evaluation batch (data/image_format.py, `NativeImages`): every
  row's images in M fixed slots of a per-image patch budget P ([B, M, P, patch_dim] + grids
  [B, M, 3]). Every batch array stays row-major, so the train step splits it over devices and
  micro-batches like any other; each slot is its own attention group in the tower (O(B M P^2))
  and each row splices its own slots' features (`splice_row_features`). The price: a slot
  computes its whole budget P, however small its image.
- `VisionBatch`, the processor's packed form (transformers' `pixel_values` [N, patch_dim] and
  `image_grid_thw`): all images of a batch in one sequence, each frame attending to itself only
  (transformers' cu_seqlens, here a block-diagonal mask from per-patch segment ids), features
  spliced in row-major order over the batch as transformers' masked_scatter. Kept for parity
  with transformers and for `greedy_generate` on processor outputs.

Within an image, patches come in the processor's order: merge blocks row-major, each block's
spatial_merge_size^2 patches together, so the merger fuses consecutive patches.

Rotary positions of the decoder are M-RoPE: int [B, 3, L] (temporal, height, width; transformers'
[3, B, L] with the batch first, as every batch array here); text tokens carry the same value in
all three, image tokens their (t, h, w) grid coordinates offset by the text before them.
`mrope_section` splits the head_dim / 2 rotary frequencies into three runs, run i rotated by
component i % 3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visatb_jax.model import generate as generate_lib
from visatb_jax.model.clip import activation
from visatb_jax.model.config import TextConfig, to_jnp_dtype
from visatb_jax.model.llama import (KVCache, LlamaModel, apply_rope, dense, lm_logits,
                                    make_lm_head, query_block_size)

_NEG = float(jnp.finfo(jnp.float32).min)  # Finite "minus infinity": masked scores never make NaN.
_LN_EPS = 1e-6  # transformers hard-codes it for every LayerNorm of the vision tower.

# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
  """Vision tower (HF `Qwen2VLVisionConfig`; `hidden_size` is the LM width the merger emits)."""

  depth: int = 2
  embed_dim: int = 32
  hidden_size: int = 64
  hidden_act: str = "quick_gelu"
  mlp_ratio: float = 4.0
  num_heads: int = 4
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads "
                       f"{self.num_heads}")
    if self.head_dim % 4:
      # Half the rotary dims turn with the row, half with the column: head_dim / 4 frequencies.
      raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rotary)")
    activation(self.hidden_act)  # Raises on an unknown name.

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Values per patch: channels x temporal_patch_size x patch_size^2."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def merge_unit(self) -> int:
    """Patches fused into one LM token."""
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
  """Qwen2-VL: vision tower + Qwen2 decoder (HF `Qwen2VLConfig`)."""

  vision: Qwen2VLVisionConfig
  text: TextConfig
  image_token_id: int
  video_token_id: int | None = None
  vision_start_token_id: int | None = None
  vision_end_token_id: int | None = None
  mrope_section: tuple[int, ...] = (16, 24, 24)
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if sum(self.mrope_section) != self.text.head_dim // 2:
      raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = "
                       f"{self.text.head_dim // 2}")
    if self.vision.hidden_size != self.text.hidden_size:
      raise ValueError(f"vision hidden_size {self.vision.hidden_size} (the merger's output) != "
                       f"text hidden_size {self.text.hidden_size}")
    if not self.text.attention_bias:
      raise ValueError("Qwen2-VL's decoder has q/k/v biases: text.attention_bias must be True")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} outside vocab "
                       f"[0, {self.text.vocab_size})")
    to_jnp_dtype(self.dtype)
    to_jnp_dtype(self.param_dtype)

  @property
  def compute_dtype(self) -> Any:
    return to_jnp_dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return to_jnp_dtype(self.param_dtype)


# ---------------------------------------------------------------- host-side inputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionBatch:
  """The packed patches of every image of a batch, with what the tower needs to attend.

  Attributes:
    pixel_values: float [N, patch_dim], all images' patches in order (processor layout).
    segment_ids: int32 [N], 1, 2, ... per frame (each frame attends to itself only); 0 marks
      padding patches, which attend among themselves and whose merged tokens are never read.
    positions: int32 [N, 2], (row, column) of each patch in its image's patch grid.
  """

  pixel_values: jax.Array
  segment_ids: jax.Array
  positions: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowImages:
  """Every row's images in fixed slots: the training and evaluation batch layout.

  Why not `VisionBatch`: the train step splits every batch array on its first axis (rows over the
  mesh, strided accumulation micro-batches); a packed patch sequence cannot be split that way, and
  its attention is O((total patches)^2). Here slot (b, m) holds one image's patches first and
  zeros after, so each slot is its own attention group (O(B M P^2)) and the row splices its own
  features. data/image_format.py (`NativeImages`) fills it.

  Attributes:
    pixel_values: float [B, M, P, patch_dim], P the per-image patch budget.
    grid: int32 [B, M, 3], each slot's (t, h, w) in patches; (0, 0, 0) for an unused slot.
  """

  pixel_values: jax.Array
  grid: jax.Array


def slot_layout(grid: jax.Array, num_patches: int,
                spatial_merge_size: int) -> tuple[jax.Array, jax.Array]:
  """(segment ids int32 [..., P], (row, column) int32 [..., P, 2]) of slots of grids [..., 3].

  Traceable `vision_positions` for one image per slot: patch p of frame p // (h w) is segment
  frame + 1, or 0 past the slot's t h w patches (padding, never read); its (row, column) follow
  the processor's merge-block order.
  """
  m = spatial_merge_size
  p = jnp.arange(num_patches, dtype=jnp.int32)
  t, h, w = (grid[..., i, None].astype(jnp.int32) for i in range(3))
  frame_size = jnp.maximum(h * w, 1)
  segment = jnp.where(p < t * h * w, p // frame_size + 1, 0)
  q = p % frame_size
  block, within = q // (m * m), q % (m * m)
  blocks_per_row = jnp.maximum(w // m, 1)
  row = (block // blocks_per_row) * m + within // m
  col = (block % blocks_per_row) * m + within % m
  return segment.astype(jnp.int32), jnp.stack([row, col], axis=-1).astype(jnp.int32)


def vision_positions(grid_thw: Any, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-patch (segment id [N], (row, column) [N, 2]) for images of grids [n, 3] (t, h, w).

  The patch order is the processor's: merge blocks row-major, and inside each block its
  spatial_merge_size^2 patches row-major, so the merger fuses consecutive patches. Each of an
  entry's t frames is its own segment (transformers' cu_seqlens: frames never see each other).
  """
  m = spatial_merge_size
  segments, positions = [], []
  for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist():
    if h % m or w % m or t < 1:
      raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of "
                       f"spatial_merge_size {m} and t >= 1")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hw = np.stack([rows.reshape(block).transpose(0, 2, 1, 3).ravel(),
                   cols.reshape(block).transpose(0, 2, 1, 3).ravel()], axis=-1)
    for _ in range(t):
      segments.append(np.full(h * w, len(segments) + 1, np.int32))
      positions.append(hw)
  if not segments:
    return np.zeros((0,), np.int32), np.zeros((0, 2), np.int32)
  return np.concatenate(segments), np.concatenate(positions).astype(np.int32)


def vision_batch(pixel_values: Any, grid_thw: Any, spatial_merge_size: int = 2,
                 pad_to: int | None = None) -> VisionBatch:
  """A `VisionBatch` from the processor's outputs, optionally padded to `pad_to` patches.

  Why pad: the patch count is part of the compiled shape; a fixed `pad_to` (a multiple of
  spatial_merge_size^2) compiles one program for every mix of image sizes.
  """
  pixels = np.asarray(pixel_values, np.float32)
  segments, positions = vision_positions(grid_thw, spatial_merge_size)
  n = segments.shape[0]
  if pixels.shape[0] != n:
    raise ValueError(f"pixel_values has {pixels.shape[0]} patches, image_grid_thw describes {n}")
  if pad_to is not None:
    if pad_to < n or pad_to % spatial_merge_size**2:
      raise ValueError(f"pad_to {pad_to} must be >= {n} patches and a multiple of "
                       f"{spatial_merge_size**2}")
    extra = pad_to - n
    pixels = np.pad(pixels, ((0, extra), (0, 0)))
    segments = np.pad(segments, (0, extra))
    positions = np.pad(positions, ((0, extra), (0, 0)))
  return VisionBatch(jnp.asarray(pixels), jnp.asarray(segments), jnp.asarray(positions))


def num_image_tokens(grid_thw: Any, spatial_merge_size: int = 2) -> np.ndarray:
  """LM tokens of each image [n] (patches / spatial_merge_size^2)."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return grid.prod(axis=-1) // spatial_merge_size**2


# ---------------------------------------------------------------- vision tower


def vision_rope_cos_sin(positions: jax.Array, head_dim: int,
                        theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [..., N, head_dim] for patch (row, column) positions [..., N, 2].

  The first head_dim / 4 frequencies turn with the row, the next head_dim / 4 with the column,
  and that half is repeated (HF's rotate_half layout), as `Qwen2VLVisionRotaryEmbedding`.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., N, 2, head_dim / 4]
  freqs = freqs.reshape(freqs.shape[:-2] + (-1,))  # Row frequencies, then column frequencies.
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _layer_norm(dim: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2 (parity, bf16 safety).
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Patch embedding as one bias-free Linear over flattened patches.

  transformers uses a Conv3d whose kernel equals its stride, applied to one patch at a time: that
  is exactly a matmul over the patch's C x T x p x p values in (C, T, p, p) order, the order the
  processor flattens them in. The checkpoint's 5-D weight is reshaped on load and save.
  """

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.proj = nnx.Linear(config.patch_dim, config.embed_dim, use_bias=False, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    return self.proj(pixel_values.astype(self.dtype))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention of scaled q [G, T, heads, hd] over k, v [G, N, heads, hd]; mask [G, T, N]."""
  scores = jnp.einsum("gqhd,gkhd->ghqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.where(mask[:, None], scores, _NEG), axis=-1).astype(v.dtype)
  return jnp.einsum("ghqk,gkhd->gqhd", probs, v)


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`_attention` one query block (`query_block_size`) at a time, in a `lax.map`, so that one
  block's scores [G, heads, block, N] are live, not [G, heads, N, N] (Qwen2-VL-2B's 2304-patch
  slots: 7.6 GiB per device). A loop, because XLA scheduled unrolled blocks' score products
  together. Padded query rows see no key (uniform, finite) and are dropped.
  """
  g, n = q.shape[:2]
  block = query_block_size(n)
  blocks = -(-n // block)
  if blocks == 1:
    return _attention(q, k, v, mask)
  pad = blocks * block - n
  split = lambda x: jnp.moveaxis(  # noqa: E731  [G, n, ...] -> [blocks, G, block, ...]
      jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
          g, blocks, block, *x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda qm: _attention(qm[0], k, v, qm[1]), (split(q), split(mask)))
  return jnp.moveaxis(out, 0, 1).reshape(g, blocks * block, *out.shape[3:])[:, :n]


class VisionAttention(nnx.Module):
  """Bidirectional attention over the packed patches, masked to each frame; 2-D rotary q and k."""

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    d = config.embed_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, **kw)
    self.proj = nnx.Linear(d, d, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """x [G, N, D], cos/sin [G, N, head_dim], mask bool [G, N, N] -> [G, N, D].

    G independent groups of patches (one for the packed form, one per image slot for `RowImages`).
    """
    g, n = x.shape[:2]
    # HF's reshape(N, 3, heads, head_dim): q, k, v each take a contiguous third of qkv's output.
    qkv = dense(self.qkv, x).reshape(g, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rope(q, cos, sin) * self.head_dim**-0.5
    k = apply_rope(k, cos, sin)
    return dense(self.proj, _blocked_attention(q, k, v, mask).reshape(g, n, -1))


class VisionMlp(nnx.Module):

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # A name, not a function: keeps the graphdef hashable and equal across instances.
    self.hidden_act = config.hidden_act
    self.fc1 = nnx.Linear(config.embed_dim, config.mlp_dim, **kw)
    self.fc2 = nnx.Linear(config.mlp_dim, config.embed_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.fc2, activation(self.hidden_act)(dense(self.fc1, x)))


class Qwen2VLVisionBlock(nnx.Module):
  """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(config.embed_dim, **kw)
    self.norm2 = _layer_norm(config.embed_dim, **kw)
    self.attn = VisionAttention(config, **kw)
    self.mlp = VisionMlp(config, **kw)

  def __call__(self, x, cos, sin, mask):
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class _Gelu(nnx.Module):
  """Parameter-free stand-in for `nn.GELU()` at index 1 of HF's merger `nn.Sequential`, so the
  Linears keep their checkpoint indices (`mlp.0`, `mlp.2`)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
  """LayerNorm; each spatial_merge_size^2 consecutive patches concatenated -> MLP -> LM width."""

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.embed_dim * config.merge_unit
    self.width = width
    self.ln_q = _layer_norm(config.embed_dim, **kw)
    self.mlp = nnx.List([nnx.Linear(width, width, **kw), _Gelu(),
                         nnx.Linear(width, config.hidden_size, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., N, embed_dim] -> [..., N / merge_unit, hidden_size]."""
    # Consecutive patches are one merge block (processor order): a reshape fuses them.
    x = self.ln_q(x).reshape(x.shape[:-2] + (-1, self.width))
    return dense(self.mlp[2], self.mlp[1](dense(self.mlp[0], x)))


class Qwen2VisionTransformer(nnx.Module):
  """HF `Qwen2VisionTransformerPretrainedModel`: patch_embed -> blocks -> merger."""

  def __init__(self, config: Qwen2VLVisionConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = PatchEmbed(config, **kw)
    self.blocks = nnx.List([Qwen2VLVisionBlock(config, **kw) for _ in range(config.depth)])
    self.merger = PatchMerger(config, **kw)

  def hidden_states(self, batch: VisionBatch) -> list[jax.Array]:
    """[patch embedding, block 1 output, ..., block depth output], each [(G,) N, embed_dim].

    `batch` holds one packed sequence ([N, ...] arrays) or G independent ones ([G, N, ...]).
    """
    grouped = batch.pixel_values.ndim == 3
    pixels, seg, pos = (batch.pixel_values, batch.segment_ids, batch.positions) if grouped else (
        batch.pixel_values[None], batch.segment_ids[None], batch.positions[None])
    x = self.patch_embed(pixels)
    cos, sin = vision_rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
    mask = seg[:, :, None] == seg[:, None, :]
    states = [x]
    for block in self.blocks:
      x = block(x, cos, sin, mask)
      states.append(x)
    return states if grouped else [h[0] for h in states]

  def __call__(self, batch: VisionBatch) -> jax.Array:
    """Merged image tokens [(G,) N / merge_unit, hidden_size] (HF `pooler_output`)."""
    return self.merger(self.hidden_states(batch)[-1])


# ---------------------------------------------------------------- language model


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, head_dim] for M-RoPE positions int [B, 3, T].

  Frequency j of run i of `mrope_section` turns with component i % 3 of the position, as
  `Qwen2VLRotaryEmbedding` (its freqs of all three components, then a per-run pick).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  component = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
  pos = jnp.moveaxis(positions, 1, -1)[..., component]  # [B, T, head_dim / 2]
  freqs = pos.astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class Qwen2VLTextModel(LlamaModel):
  """The Llama decoder of llama.py driven by M-RoPE positions [B, 3, T] instead of [B, T].

  Same parameters, masks, cache and remat as `LlamaModel`; only the rotary tables differ.
  """

  def __init__(self, config: TextConfig, mrope_section: Sequence[int], **kwargs: Any):
    super().__init__(config, **kwargs)
    self.mrope_section = tuple(int(s) for s in mrope_section)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """As `LlamaModel.__call__`, with positions int [B, 3, T] (or [B, T]: the same for all 3)."""
    if positions.ndim == 2:
      positions = jnp.broadcast_to(positions[:, None], (positions.shape[0], 3, positions.shape[1]))
    cos, sin = mrope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                             self.mrope_section)
    return self.run_layers(inputs_embeds, cos, sin, segment_ids, cache)


# ---------------------------------------------------------------- the multimodal model


def splice_features(text_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                    token_id: int) -> jax.Array:
  """Replaces placeholder embeddings by `features` in row-major order over the whole batch.

  As transformers' masked_scatter: the k-th placeholder token of the batch (row by row) takes
  feature k, so images of any sizes need no per-row padding. More placeholders than features is a
  data bug; the excess reuse the last feature rather than failing inside jit.

  Args:
    text_embeds: [B, L, D].
    input_ids: int [B, L].
    features: [K, D].
    token_id: the placeholder id.
  """
  is_token = input_ids == token_id
  idx = jnp.cumsum(is_token.reshape(-1), dtype=jnp.int32) - 1
  idx = jnp.clip(idx, 0, features.shape[0] - 1).reshape(is_token.shape)
  return jnp.where(is_token[..., None], features[idx].astype(text_embeds.dtype), text_embeds)


def splice_row_features(text_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                        slot_tokens: jax.Array, token_id: int) -> jax.Array:
  """Replaces each row's placeholder embeddings by its own slots' features, in slot order.

  The k-th placeholder of row b is token k - start(s) of slot s, the slot whose token range
  [start(s), start(s) + slot_tokens[b, s]) holds k: slots are filled in order and only their first
  slot_tokens features are real. Excess placeholders reuse the last feature, as
  `splice_features`.

  Args:
    text_embeds: [B, L, D].
    input_ids: int [B, L].
    features: [B, M, Q, D], Q merged tokens per slot (padding included).
    slot_tokens: int [B, M], real merged tokens of each slot.
    token_id: the placeholder id.
  """
  b, m, q, d = features.shape
  is_token = input_ids == token_id
  k = jnp.cumsum(is_token, axis=1, dtype=jnp.int32) - 1  # [B, L]
  ends = jnp.cumsum(slot_tokens.astype(jnp.int32), axis=1)  # [B, M]
  slot = jnp.minimum(jnp.sum(k[:, :, None] >= ends[:, None, :], axis=-1), m - 1)  # [B, L]
  start = jnp.take_along_axis(ends - slot_tokens.astype(jnp.int32), slot, axis=1)
  idx = jnp.clip(slot * q + jnp.clip(k - start, 0, q - 1), 0, m * q - 1)
  picked = jnp.take_along_axis(features.reshape(b, m * q, d), idx[:, :, None], axis=1)
  return jnp.where(is_token[..., None], picked.astype(text_embeds.dtype), text_embeds)


def text_positions(input_ids: jax.Array) -> jax.Array:
  """arange M-RoPE positions [B, 3, L] (what text-only rows get)."""
  b, l = input_ids.shape
  return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, 3, l))


class Qwen2VLForConditionalGeneration(nnx.Module):
  """Qwen2-VL causal LM. Call: `model(input_ids, images, positions, segment_ids)`."""

  def __init__(self, config: Qwen2VLConfig, *, remat: bool = False,
               remat_policy: Callable[..., bool] | None = None, rngs: nnx.Rngs):
    """Builds the model; parameters in `config.param_dtype`, compute in `config.dtype`.

    Args:
      config: model shape.
      remat: rematerialise each decoder layer in the backward pass.
      remat_policy: optional `jax.checkpoint_policies` policy for `remat`.
      rngs: parameter initialisation.
    """
    self.config = config
    dtype = config.compute_dtype
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=config.params_dtype, rngs=rngs)
    self.visual = Qwen2VisionTransformer(config.vision, **kw)
    self.language_model = Qwen2VLTextModel(config.text, config.mrope_section, remat=remat,
                                           remat_policy=remat_policy, **kw)
    self.lm_head = make_lm_head(config.text, **kw)

  def image_features(self, images: VisionBatch | RowImages) -> jax.Array:
    """Merged image tokens: [N / merge_unit, D_text] of a packed `VisionBatch` (all images in
    order), or [B, M, P / merge_unit, D_text] of `RowImages` (padding tokens included)."""
    if isinstance(images, VisionBatch):
      return self.visual(images)
    b, m, p, d = images.pixel_values.shape
    segments, positions = slot_layout(images.grid, p, self.config.vision.spatial_merge_size)
    slots = VisionBatch(images.pixel_values.reshape(b * m, p, d), segments.reshape(b * m, p),
                        positions.reshape(b * m, p, 2))
    # All slots at once. A `lax.map` over them (one image's [heads, P, P] scores live instead of
    # all B M) made the Qwen2-VL-2B dry run worse: the FSDP-sharded tower was gathered again for
    # every slot (collectives 39x FSDP's minimum) and the loop kept its MLP activations.
    feats = self.visual(slots)
    return feats.reshape(b, m, *feats.shape[1:])

  def embed_inputs(self, input_ids: jax.Array,
                   images: VisionBatch | RowImages | None = None) -> jax.Array:
    """Token embeddings [B, L, D] with the images' features spliced into the image tokens.

    A `VisionBatch` fills the batch's placeholders in row-major order (transformers'
    masked_scatter); `RowImages` fills each row's from its own slots.
    """
    embeds = self.language_model.embed_tokens(input_ids).astype(self.dtype)
    if images is None:
      return embeds
    feats = self.image_features(images)
    token_id = self.config.image_token_id
    if isinstance(images, VisionBatch):
      return splice_features(embeds, input_ids, feats, token_id)
    slot_tokens = jnp.prod(images.grid, axis=-1) // self.config.vision.merge_unit
    return splice_row_features(embeds, input_ids, feats, slot_tokens, token_id)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 logits [..., V]."""
    return lm_logits(hidden, self.lm_head, self.language_model.embed_tokens)

  def hidden_states(self, input_ids: jax.Array, images: VisionBatch | RowImages | None = None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm decoder output [B, L, D].

    Args:
      input_ids: int [B, L].
      images: the batch's images (None: text only).
      positions: int [B, 3, L] from `get_rope_index` (None: arange, right for text only).
      segment_ids: int [B, L] (None: one sample per row, no padding).
    """
    if positions is None:
      positions = text_positions(input_ids)
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    hidden, _ = self.language_model(self.embed_inputs(input_ids, images), positions, segment_ids)
    return hidden

  def __call__(self, input_ids: jax.Array, images: VisionBatch | RowImages | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, L, V]; arguments as `hidden_states`."""
    return self.logits(self.hidden_states(input_ids, images, positions, segment_ids))

  @staticmethod
  def batch_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """`hidden_states` keyword arguments from a training Batch (data/image_format.py,
    `NativeImages`): per-row `images` + `image_grid`, positions [B, 3, L], segment ids."""
    images = None
    if batch.get("images") is not None:
      images = RowImages(batch["images"], batch["image_grid"])
    return dict(images=images, positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"))

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """Empty KV cache for generation (compute dtype)."""
    return self.language_model.init_cache(batch_size, max_len)

  def decode(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: KVCache, *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends T tokens (embeddings, positions [B, 3, T]) to `cache`; returns their logits."""
    hidden, cache = self.language_model(inputs_embeds, positions, segment_ids, cache)
    if last_only:
      hidden = hidden[:, -1:]
    return self.logits(hidden), cache


# ---------------------------------------------------------------- greedy generation


def greedy_generate(model: Qwen2VLForConditionalGeneration, prompt_ids: Any, prompt_mask: Any,
                    positions: Any, pixel_values: Any = None, image_grid_thw: Any = None, *,
                    max_new_tokens: int, eos_id: int, pad_id: int,
                    pad_patches_to: int | None = None) -> np.ndarray:
  """Greedy decoding of left-padded prompts with a KV cache, images in the processor's packed form
  (single device; the pipeline decodes `RowImages` through `generate.greedy_generate`).

  Each generated token takes the previous token's position + 1 in every M-RoPE component, which is
  what transformers' `generate` does (for a prompt that ends in text, all three components are
  max position + 1 + step, its rope-delta rule).

  Args:
    model: the model.
    prompt_ids: int [B, L], left-padded, image placeholders expanded (one per merged token).
    prompt_mask: int [B, L], 1 on real tokens, 0 on (left) padding.
    positions: int [B, 3, L], the prompts' M-RoPE positions (`qwen2vl_image.get_rope_index` with
      `prompt_mask`).
    pixel_values: float [N, patch_dim], every row's images in order (processor output), or None.
    image_grid_thw: int [n_images, 3] for `pixel_values`.
    max_new_tokens: tokens to generate per row.
    eos_id: stops a row; not included in the output (a negative id never stops).
    pad_id: fills a row after its EOS.
    pad_patches_to: pad the patches to this count (one compile across image sizes).

  Returns:
    np.int32 [B, max_new_tokens], as `generate.greedy_generate`.
  """
  ids, mask = generate_lib.check_prompt(prompt_ids, prompt_mask, max_new_tokens)
  merge = model.config.vision.spatial_merge_size
  vision = None
  if pixel_values is not None:
    vision = vision_batch(pixel_values, image_grid_thw, merge, pad_to=pad_patches_to)
  return generate_lib.greedy_generate(model, ids, mask, vision, positions=positions,
                                      max_new_tokens=max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id)
