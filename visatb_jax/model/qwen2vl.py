"""Qwen2-VL in Flax NNX: ViT with 2-D rotary -> 2x2 patch merger -> Qwen2 decoder with M-RoPE.

Module paths follow transformers' `Qwen2VLForConditionalGeneration` (without its `model.` level):
`visual.patch_embed.proj`, `visual.blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}`, `visual.merger.{ln_q, mlp[0], mlp[2]}`, `language_model.*` (the Llama decoder of
llama.py, Qwen2 flavour: q/k/v biases) and `lm_head` (None when tied). Leaves use NNX names
(`kernel` [in, out], `bias`, `scale`, `embedding`); qwen2vl_io maps them to the checkpoint.

Images arrive as transformers' processor emits them (data/qwen2vl_image.py): every image cut into
patches of C x temporal_patch x patch x patch values, the patches of all images concatenated in
order ([N, patch_dim]), each image's patches in 2x2 merge-block order, plus `image_grid_thw`
[n_images, 3] in patches. The vision tower runs on the whole packed sequence at once: each frame
attends only to itself (transformers' cu_seqlens, here a block-diagonal mask from per-patch
segment ids), so its cost is O(N^2) in the total patch count.

Grids vary per image, so everything shape-dependent is computed on the host from `grid_thw`
(`vision_batch`, `get_rope_index`) and enters the jitted model as arrays: a static patch count
(padded with `pad_to`) compiles once.

Rotary positions of the decoder are M-RoPE: int [3, B, L] (temporal, height, width); text tokens
carry the same value in all three, image tokens their (t, h, w) grid coordinates offset by the
text before them. `mrope_section` splits the head_dim / 2 rotary frequencies into three runs, run
i rotated by component i % 3.

Design note: the pipeline adapter (not built yet). What works today: the model, its checkpoints
(qwen2vl_io), sharding rules (runtime/sharding.py), LoRA on the decoder and the trainable filters
(model/lora.py), and `model.factory` choosing this model for a config.json with `model_type:
qwen2_vl`. The pipeline still cannot reach it: `pipeline/config.py::_check_checkpoint` calls
`hf_io.check_checkpoint`, which rejects Qwen2-VL before the factory runs. What it needs, and where:

1. Batch layout, row-major (here). The train step splits every batch array on axis 0 (rows over
   the mesh's batch axes in `sharding.shard_batch`, strided accumulation micro-batches in
   `train/step.py::micro_batches`), but `VisionBatch` packs the whole batch's patches into one
   sequence and positions are [3, B, L]. Add a per-row form: pixel_values [B, P, patch_dim],
   patch segment ids [B, P] and (row, column) [B, P, 2] with P a fixed per-row patch budget,
   positions [B, 3, L]; run the tower over rows (block-diagonal mask per row, O(B P^2) instead of
   O((B P)^2)) and splice per row (cumsum along each row, not over the batch). The packed form
   stays for `greedy_generate`.
2. Model call signature (here, or a shim in train/step.py): `forward_sums` calls
   `model.hidden_states(input_ids, images=, positions=, segment_ids=)`; accept the per-row arrays
   under the batch's keys so step.py stays model-agnostic.
3. Data (data/template.py, packing.py, loader.py, pipeline/data.py). Phase A, fixed square
   `image_size` (a multiple of 28): every image has the same grid, hence the same
   `num_image_tokens` ((size / 28)^2) and patch count, so template, packing (`max_images`) and
   the loader keep their contracts; only `rows_to_batch` changes: `data/qwen2vl_image.py`
   patches per image slot instead of normalised pixels, `<|vision_start|>` / `<|vision_end|>`
   around each block, and positions from `get_rope_index(..., segment_ids=)` per packed row.
   Phase B, native resolution: `Example` carries each image's grid, the template expands each
   `<image>` to its own token count (`qwen2vl_image.num_image_tokens`), and the packer budgets
   patches per row (`_FirstFitTree` / `_BestFill` track patches instead of images; P above).
   pipeline/data.py reads `mc.num_image_tokens` / `mc.vision.image_size` from the model config,
   which `Qwen2VLConfig` lacks: derive them from the data config for this model.
4. Evaluation (pipeline/evaluation.py): prompts carry per-sample patches and grids instead of
   uint8 [n, M, H, W, 3]; answer with `greedy_generate` here (single device; a mesh variant
   would shard the prompt rows as generate.py does and replicate the packed patches).
5. Training filters (train/state.py): the projector-only setting names `multi_modal_projector`;
   use `lora.projector_filter` (LLaVA's projector or Qwen2-VL's `visual.merger`), as
   `lora.trainable_filter` does. cli/dryrun.py's parameter accounting names LLaVA modules too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visatb_jax.model import generate as generate_lib
from visatb_jax.model.clip import activation
from visatb_jax.model.config import TextConfig, to_jnp_dtype
from visatb_jax.model.llama import (KVCache, LlamaModel, apply_rope, dense, lm_logits,
                                    make_lm_head)

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


def _runs(is_image: np.ndarray) -> Iterator[tuple[bool, int, int]]:
  """(is image run, start, end) for each maximal run of equal values."""
  if is_image.size == 0:
    return
  edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
  bounds = [0, *edges.tolist(), is_image.size]
  for a, z in zip(bounds[:-1], bounds[1:]):
    yield bool(is_image[a]), a, z


def _sequence_positions(ids: np.ndarray, grids: Iterator[list[int]], image_token_id: int,
                        spatial_merge_size: int) -> np.ndarray:
  """M-RoPE positions [3, n] of one sequence (transformers' `get_rope_index` for one row).

  Text continues from the running position in all three components; an image of LLM grid
  (t, h, w) takes (t, row, column) offsets from the running position and then advances it by
  max(h, w) (the grid in merged tokens), as transformers does.
  """
  m = spatial_merge_size
  out, cur = [], 0
  for is_image, a, z in _runs(ids == image_token_id):
    if not is_image:
      out.append(np.broadcast_to(np.arange(cur, cur + z - a), (3, z - a)))
      cur += z - a
      continue
    while a < z:  # Adjacent images share a run: each takes as many tokens as its grid has.
      try:
        t, h, w = next(grids)
      except StopIteration:
        raise ValueError("more image placeholder runs than image_grid_thw rows") from None
      lt, lh, lw = t, h // m, w // m
      if a + lt * lh * lw > z:
        raise ValueError(f"an image of grid {(t, h, w)} needs {lt * lh * lw} image tokens, the "
                         f"sequence has {z - a} at position {a}")
      tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
      out.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
      cur += max(h, w) // m
      a += lt * lh * lw
  if not out:
    return np.zeros((3, 0), np.int64)
  return np.concatenate(out, axis=1)


def get_rope_index(input_ids: Any, image_grid_thw: Any = None, attention_mask: Any = None, *,
                   image_token_id: int, spatial_merge_size: int = 2,
                   segment_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions for a batch, as transformers' `Qwen2VLModel.get_rope_index`.

  Args:
    input_ids: int [B, L].
    image_grid_thw: int [n_images, 3], the images of all rows in order of appearance.
    attention_mask: int [B, L], 0 on padding (anywhere in the row); positions skip padding and
      padding gets position 0.
    image_token_id: the image placeholder id.
    spatial_merge_size: patches merged per LM token along each side.
    segment_ids: int [B, L] for packed rows (1, 2, ... per sample, 0 padding): each sample's
      positions start at 0, as if it were alone in its row. Overrides `attention_mask`.

  Returns:
    (positions int32 [3, B, L], rope deltas int32 [B]: max position + 1 - real tokens, the offset
    transformers adds to later text positions; for packed rows, the last sample's).

  Raises:
    ValueError: image tokens and grids disagree (counts or leftovers).
  """
  ids = np.asarray(input_ids)
  b, l = ids.shape
  if segment_ids is None:
    mask = np.ones((b, l), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    segments = mask.astype(np.int64)
  else:
    segments = np.asarray(segment_ids)
  grids = iter([] if image_grid_thw is None else
               np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist())
  positions = np.zeros((3, b, l), np.int64)
  deltas = np.zeros((b,), np.int64)
  for r in range(b):
    row_segments = segments[r]
    for s in dict.fromkeys(row_segments[row_segments > 0].tolist()):  # In order of appearance.
      cols = np.flatnonzero(row_segments == s)
      pos = _sequence_positions(ids[r, cols], grids, image_token_id, spatial_merge_size)
      positions[:, r, cols] = pos
      deltas[r] = pos.max() + 1 - cols.size
  leftover = sum(1 for _ in grids)
  if leftover:
    raise ValueError(f"{leftover} image_grid_thw rows have no image tokens in input_ids")
  return positions.astype(np.int32), deltas.astype(np.int32)


def num_image_tokens(grid_thw: Any, spatial_merge_size: int = 2) -> np.ndarray:
  """LM tokens of each image [n] (patches / spatial_merge_size^2)."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return grid.prod(axis=-1) // spatial_merge_size**2


# ---------------------------------------------------------------- vision tower


def vision_rope_cos_sin(positions: jax.Array, head_dim: int,
                        theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [N, head_dim] for patch (row, column) positions [N, 2].

  The first head_dim / 4 frequencies turn with the row, the next head_dim / 4 with the column,
  and that half is repeated (HF's rotate_half layout), as `Qwen2VLVisionRotaryEmbedding`.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim / 4]
  freqs = freqs.reshape(freqs.shape[0], -1)  # Row frequencies, then column frequencies.
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
    """x [N, D], cos/sin [N, head_dim], mask bool [N, N] -> [N, D]."""
    n = x.shape[0]
    # HF's reshape(N, 3, heads, head_dim): q, k, v each take a contiguous third of qkv's output.
    qkv = dense(self.qkv, x).reshape(n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = apply_rope(q[None], cos[None], sin[None])[0]
    k = apply_rope(k[None], cos[None], sin[None])[0]
    scores = jnp.einsum("qhd,khd->hqk", q * self.head_dim**-0.5, k,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask[None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
    return dense(self.proj, out)


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
    """[N, embed_dim] -> [N / merge_unit, hidden_size]."""
    # Consecutive patches are one merge block (processor order): a reshape fuses them.
    x = self.ln_q(x).reshape(-1, self.width)
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
    """[patch embedding, block 1 output, ..., block depth output], each [N, embed_dim]."""
    x = self.patch_embed(batch.pixel_values)
    cos, sin = vision_rope_cos_sin(batch.positions, self.config.head_dim, self.config.rope_theta)
    seg = batch.segment_ids
    mask = seg[:, None] == seg[None, :]
    states = [x]
    for block in self.blocks:
      x = block(x, cos, sin, mask)
      states.append(x)
    return states

  def __call__(self, batch: VisionBatch) -> jax.Array:
    """Merged image tokens [N / merge_unit, hidden_size] (HF `pooler_output`)."""
    return self.merger(self.hidden_states(batch)[-1])


# ---------------------------------------------------------------- language model


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, head_dim] for M-RoPE positions int [3, B, T].

  Frequency j of run i of `mrope_section` turns with component i % 3 of the position, as
  `Qwen2VLRotaryEmbedding` (its freqs of all three components, then a per-run pick).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  component = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
  pos = jnp.moveaxis(positions, 0, -1)[..., component]  # [B, T, head_dim / 2]
  freqs = pos.astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class Qwen2VLTextModel(LlamaModel):
  """The Llama decoder of llama.py driven by M-RoPE positions [3, B, T] instead of [B, T].

  Same parameters, masks, cache and remat as `LlamaModel`; only the rotary tables differ.
  """

  def __init__(self, config: TextConfig, mrope_section: Sequence[int], **kwargs: Any):
    super().__init__(config, **kwargs)
    self.mrope_section = tuple(int(s) for s in mrope_section)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """As `LlamaModel.__call__`, with positions int [3, B, T] (or [B, T]: the same for all 3)."""
    if positions.ndim == 2:
      positions = jnp.broadcast_to(positions, (3,) + positions.shape)
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


def text_positions(input_ids: jax.Array) -> jax.Array:
  """arange M-RoPE positions [3, B, L] (what text-only rows get)."""
  b, l = input_ids.shape
  return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (3, b, l))


class Qwen2VLForConditionalGeneration(nnx.Module):
  """Qwen2-VL causal LM. Call: `model(input_ids, vision, positions, segment_ids)`."""

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

  def image_features(self, vision: VisionBatch) -> jax.Array:
    """Merged image tokens [N / merge_unit, D_text], all images in order."""
    return self.visual(vision)

  def embed_inputs(self, input_ids: jax.Array, image_features: jax.Array | None = None
                   ) -> jax.Array:
    """Token embeddings [B, L, D] with `image_features` [K, D] spliced into the image tokens."""
    embeds = self.language_model.embed_tokens(input_ids).astype(self.dtype)
    if image_features is None:
      return embeds
    return splice_features(embeds, input_ids, image_features, self.config.image_token_id)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 logits [..., V]."""
    return lm_logits(hidden, self.lm_head, self.language_model.embed_tokens)

  def hidden_states(self, input_ids: jax.Array, vision: VisionBatch | None = None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm decoder output [B, L, D].

    Args:
      input_ids: int [B, L].
      vision: the batch's images (None: text only).
      positions: int [3, B, L] from `get_rope_index` (None: arange, right for text only).
      segment_ids: int [B, L] (None: one sample per row, no padding).
    """
    if positions is None:
      positions = text_positions(input_ids)
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    feats = None if vision is None else self.image_features(vision)
    hidden, _ = self.language_model(self.embed_inputs(input_ids, feats), positions, segment_ids)
    return hidden

  def __call__(self, input_ids: jax.Array, vision: VisionBatch | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, L, V]; arguments as `hidden_states`."""
    return self.logits(self.hidden_states(input_ids, vision, positions, segment_ids))

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """Empty KV cache for generation (compute dtype)."""
    return self.language_model.init_cache(batch_size, max_len)

  def decode(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: KVCache, *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends T tokens (embeddings, positions [3, B, T]) to `cache`; returns their logits."""
    hidden, cache = self.language_model(inputs_embeds, positions, segment_ids, cache)
    if last_only:
      hidden = hidden[:, -1:]
    return self.logits(hidden), cache


# ---------------------------------------------------------------- greedy generation


def _greedy(model: Qwen2VLForConditionalGeneration, prompt_ids, prompt_mask, prompt_positions,
            vision, eos_id, pad_id, *, max_new_tokens: int):
  """Traceable greedy decoding: prefill, then a while_loop of one-token decode steps.

  Each generated token takes the previous token's position + 1 in every M-RoPE component, which is
  what transformers' `generate` does with its [4, B, L] position ids (for a prompt that ends in
  text, all three components are max position + 1 + step, i.e. the rope-delta rule).
  """
  b, prompt_len = prompt_ids.shape
  # The last generated token is never fed back, hence max_new_tokens - 1 decode slots.
  cache = model.init_cache(b, prompt_len + max_new_tokens - 1)
  feats = None if vision is None else model.image_features(vision)
  logits, cache = model.decode(model.embed_inputs(prompt_ids, feats), prompt_positions,
                               prompt_mask, cache, last_only=True)
  last = prompt_positions[:, :, -1]  # [3, B]: left padding puts every row's last token here.

  # Token i - 1 (just produced) sits at last + i.
  return generate_lib.decode_greedily(model, logits, cache, lambda i: (last + i)[:, :, None],
                                      eos_id, pad_id, max_new_tokens=max_new_tokens)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: nnx.GraphDef, max_new_tokens: int):
  """One jitted function per model structure and output length; jit caches per shape."""

  def run(state, prompt_ids, prompt_mask, prompt_positions, vision, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    return _greedy(model, prompt_ids, prompt_mask, prompt_positions, vision, eos_id, pad_id,
                   max_new_tokens=max_new_tokens)

  return jax.jit(run)


def greedy_generate(model: Qwen2VLForConditionalGeneration, prompt_ids: Any, prompt_mask: Any,
                    pixel_values: Any = None, image_grid_thw: Any = None, *,
                    max_new_tokens: int, eos_id: int, pad_id: int,
                    pad_patches_to: int | None = None) -> np.ndarray:
  """Greedy decoding of left-padded prompts with a KV cache (single device).

  Args:
    model: the model.
    prompt_ids: int [B, L], left-padded, image placeholders expanded (one per merged token).
    prompt_mask: int [B, L], 1 on real tokens, 0 on (left) padding.
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
  positions, _ = get_rope_index(ids, image_grid_thw, mask,
                                image_token_id=model.config.image_token_id,
                                spatial_merge_size=merge)
  vision = None
  if pixel_values is not None:
    vision = vision_batch(pixel_values, image_grid_thw, merge, pad_to=pad_patches_to)
  graphdef, state = nnx.split(model)
  run = _compiled(graphdef, int(max_new_tokens))
  out = run(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions), vision,
            jnp.int32(eos_id), jnp.int32(pad_id))
  return np.asarray(out, np.int32)
