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
from collections.abc import Iterable, Sequence
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
