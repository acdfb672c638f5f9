"""Image preprocessing for Qwen2-VL, as transformers' `Qwen2VLImageProcessor` (PIL backend).

Each image keeps (about) its aspect ratio: `smart_resize` picks the nearest size whose sides are
multiples of patch_size * merge_size (28) and whose area lies in [min_pixels, max_pixels]; PIL
bicubic resizes it, values are scaled to [0, 1] and CLIP-normalised, and the image is cut into
14 x 14 patches, each repeated temporal_patch_size (2) times (a still image is a 2-frame clip)
and flattened in (C, T, p, p) order. Patches are ordered merge block by merge block, so the
model's merger fuses consecutive patches. An image of grid (1, h, w) patches becomes
h * w / merge_size^2 LM tokens.

Outputs are numpy, for the host-side data pipeline: `pixel_values` float32 [N, 3 * 2 * 14 * 14]
(the images' patches concatenated) and `image_grid_thw` int64 [n_images, 3].
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from visatb_jax.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
_MAX_ASPECT = 200


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor`, rescaled into [min_pixels, max_pixels].

  transformers' `smart_resize`, line for line (Python's round: halves go to even).

  Raises:
    ValueError: an aspect ratio over 200.
  """
  if max(height, width) / min(height, width) > _MAX_ASPECT:
    raise ValueError(f"absolute aspect ratio must be smaller than {_MAX_ASPECT}, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """An RGB PIL image; transparency is composited onto white (as transformers' convert_to_rgb).

  Arrays must be uint8 [H, W] or [H, W, C] with C in (1, 3, 4).
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
      raise ValueError(f"expected a uint8 [H, W(, 1|3|4)] array, got {image.dtype} "
                       f"{image.shape}")
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def normalize(image: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std, in transformers' arithmetic order.

  The scaling runs in float64 and is then cast, the normalisation in float32, as transformers'
  rescale and normalize do, so the values agree to the bit.
  """
  x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def patchify(image: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, int, int]:
  """float [H, W, C] -> (patches [gh * gw, C * T * p * p], gh, gw) in merge-block order.

  Patch order: merge blocks row-major, then the merge_size^2 patches of a block row-major; each
  patch's values in (channel, frame, row, column) order, the one frame repeated T times.
  """
  h, w, c = image.shape
  gh, gw = h // patch_size, w // patch_size
  if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
    raise ValueError(f"image {h}x{w} is not a whole number of {merge_size}x{merge_size} blocks "
                     f"of {patch_size}-pixel patches")
  m, p = merge_size, patch_size
  x = image.reshape(gh // m, m, p, gw // m, m, p, c)
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, C, p, p]
  x = np.broadcast_to(x[..., None, :, :], x.shape[:5] + (temporal_patch_size, p, p))
  return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * p * p), gh, gw


def preprocess(image: Image.Image | np.ndarray, *, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, patch_size: int = PATCH_SIZE,
               merge_size: int = MERGE_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
               mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One image -> (patches float32 [h * w, patch_dim], its grid (1, h, w) in patches)."""
  rgb = to_rgb(image)
  height, width = smart_resize(rgb.height, rgb.width, patch_size * merge_size, min_pixels,
                               max_pixels)
  rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
  patches, gh, gw = patchify(normalize(np.asarray(rgb), mean, std), patch_size, merge_size,
                             temporal_patch_size)
  return patches, (1, gh, gw)


def preprocess_images(images: Iterable[Image.Image | np.ndarray],
                      **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixel_values float32 [N, patch_dim], image_grid_thw int64 [n, 3]).

  Keyword arguments as `preprocess`. The processor's `pixel_values` / `image_grid_thw`.
  """
  patches, grids = [], []
  for image in images:
    p, grid = preprocess(image, **kwargs)
    patches.append(p)
    grids.append(grid)
  if not patches:
    raise ValueError("no images")
  return np.concatenate(patches), np.asarray(grids, np.int64)


def num_image_tokens(height: int, width: int, *, min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS, patch_size: int = PATCH_SIZE,
                     merge_size: int = MERGE_SIZE) -> int:
  """LM tokens an image of this size becomes (for sizing sequences before decoding pixels)."""
  h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
  return (h // patch_size) * (w // patch_size) // merge_size**2


def load_image(path: str | os.PathLike, **kwargs: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Reads and preprocesses one image file (keyword arguments as `preprocess`).

  Raises:
    ImageError: the file is missing or unreadable (named).
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as f:
      f.load()
      image = to_rgb(f)
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from e
  return preprocess(image, **kwargs)


# ---------------------------------------------------------------- M-RoPE positions

# Host-side, like the pixels: the model takes the positions as an array (model/qwen2vl.py), and
# the data pipeline needs them for every packed row.


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
    (positions int32 [B, 3, L] (transformers' [3, B, L] with the batch first, as every batch
    array here), rope deltas int32 [B]: max position + 1 - real tokens, the offset
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
  return positions.transpose(1, 0, 2).astype(np.int32), deltas.astype(np.int32)


def sequence_positions(input_ids: Any, grid_thw: Any, *, image_token_id: int,
                       spatial_merge_size: int = 2) -> np.ndarray:
  """M-RoPE positions int32 [3, n] of one sample starting at 0 (its images' grids [k, 3] in order).

  What `get_rope_index` gives a sample alone in its row, or one segment of a packed row.
  """
  grids = iter(np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist())
  pos = _sequence_positions(np.asarray(input_ids).reshape(-1), grids, image_token_id,
                            spatial_merge_size)
  leftover = sum(1 for _ in grids)
  if leftover:
    raise ValueError(f"{leftover} image grids have no image tokens in the sample")
  return pos.astype(np.int32)
