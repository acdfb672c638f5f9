"""Image formats: how a model family sees images, from the file to the batch arrays.

A format turns an image file into the uint8 pixels the model sees (``load`` / ``decode``), says how
many LM tokens such an image becomes (``num_tokens``; ``num_tokens_of_file`` without decoding
pixels), gives the shapes of a batch's image arrays (``batch_shapes``, ``positions_shape``),
writes one image into a batch slot (``fill``) and computes one packed sample's rotary positions
(``positions``). ``packing.rows_to_batch`` and the loader call only these, so a model family is
one more class with the same methods (duck-typed; no base class):

* :class:`SquareImages`: LLaVA. Every image letterboxed to one square size, a fixed token count,
  ``images`` float32 [B, M, S, S, 3] (CLIP-normalised), ``positions`` int32 [B, L].
* :class:`NativeImages`: Qwen2-VL at native resolution. Token counts follow the image size,
  ``images`` float32 [B, M, P, patch_dim] (patches), ``image_grid`` int32 [B, M, 3], M-RoPE
  ``positions`` int32 [B, 3, L].

Formats are frozen dataclasses: hashable, comparable and picklable (grain worker processes
receive them), and ``dataclasses.asdict`` plus the class name describes one in a loader state.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from visatb_jax.data import images as images_lib
from visatb_jax.data import qwen2vl_image

# What PIL raises for a missing, truncated or corrupt file.
_DECODE_ERRORS = (OSError, Image.DecompressionBombError, ValueError)


@dataclasses.dataclass(frozen=True)
class SquareImages:
  """LLaVA's images: padded to a square with the CLIP mean colour, bicubic-resized to
  ``image_size``, each ``num_image_tokens`` LM tokens (the CLIP grid, fixed by the model).

  Every image of every batch has the same shape, so the batch holds the normalised pixels
  ([B, M, S, S, 3]) and positions are plain per-sample token indices ([B, L]).
  """
  image_size: int
  num_image_tokens: int

  def __post_init__(self):
    if self.image_size < 1 or self.num_image_tokens < 0:
      raise ValueError(f"SquareImages needs image_size >= 1 and num_image_tokens >= 0, got "
                       f"{self.image_size}, {self.num_image_tokens}")

  def _square(self, image: Image.Image) -> np.ndarray:
    image = images_lib.expand_to_square(image)
    if image.size != (self.image_size, self.image_size):
      image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)

  def load(self, path: str | os.PathLike) -> np.ndarray:
    """uint8 [S, S, 3] of an image file (``images.load_image``); ImageError names the file."""
    return images_lib.load_image(path, self.image_size)

  def decode(self, data: bytes, *, name: str = "image") -> np.ndarray:
    """uint8 [S, S, 3] from file bytes, exactly as :meth:`load` reads the file."""
    try:
      with Image.open(io.BytesIO(data)) as f:
        image = f.convert("RGB")
    except _DECODE_ERRORS as e:
      raise images_lib.ImageError(f"cannot decode {name}: {e}") from e
    return self._square(image)

  def num_tokens(self, image: np.ndarray) -> int:
    del image  # Every image is the same grid.
    return self.num_image_tokens

  def num_tokens_of_file(self, path: str | os.PathLike) -> int:
    del path  # No need to look at the file.
    return self.num_image_tokens

  def batch_shapes(self, rows: int, max_images: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    s = self.image_size
    return {"images": ((rows, max_images, s, s, 3), np.dtype(np.float32))}

  def positions_shape(self, rows: int, seq_len: int) -> tuple[int, ...]:
    return (rows, seq_len)

  def fill(self, arrays: dict[str, np.ndarray], row: int, slot: int, image: np.ndarray) -> None:
    """Writes the CLIP-normalised ``image`` into ``arrays["images"][row, slot]``."""
    want = (self.image_size, self.image_size, 3)
    if np.shape(image) != want:
      raise ValueError(f"image shape {np.shape(image)} differs from {want}")
    arrays["images"][row, slot] = images_lib.normalize(image)

  def positions(self, input_ids: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
    """int32 [n]: 0, 1, ... (image tokens count like text)."""
    del images
    return np.arange(len(input_ids), dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class NativeImages:
  """Qwen2-VL's images at (about) their own resolution (``qwen2vl_image``).

  Why another format: the token count follows the image size. ``smart_resize`` rounds each image
  to a multiple of patch_size * merge_size (28) with an area in [min_pixels, max_pixels], so an
  image becomes (h / 14) * (w / 14) patches and a quarter as many LM tokens, and its M-RoPE
  positions (t, row, column) depend on its grid. Samples therefore have different lengths, which
  packing already handles, and the batch carries patches instead of pixels.

  Why a per-slot patch budget: the train step needs static shapes and splits every batch array on
  axis 0 (rows over devices, accumulation micro-batches), so patches are stored per image slot,
  ``images`` [B, M, P, patch_dim] with P the most patches any image can have, and the slot's grid
  (1, h, w) in ``image_grid`` [B, M, 3] (zeros: an unused slot). ``smart_resize`` keeps an image
  within floor(max_pixels / 28^2) merge blocks for the usual settings (max_pixels of at least
  200 blocks, the largest aspect ratio it accepts); with smaller ones an extreme aspect ratio can
  exceed it, and such an image is refused with an ImageError when it is loaded.
  """
  image_token_id: int
  min_pixels: int = qwen2vl_image.MIN_PIXELS
  max_pixels: int = qwen2vl_image.MAX_PIXELS
  patch_size: int = qwen2vl_image.PATCH_SIZE
  merge_size: int = qwen2vl_image.MERGE_SIZE
  temporal_patch_size: int = qwen2vl_image.TEMPORAL_PATCH_SIZE

  def __post_init__(self):
    if min(self.patch_size, self.merge_size, self.temporal_patch_size) < 1:
      raise ValueError("patch_size, merge_size and temporal_patch_size must be >= 1")
    if not 0 < self.min_pixels <= self.max_pixels or self.max_blocks < 1:
      raise ValueError(f"need 0 < min_pixels <= max_pixels and room for one "
                       f"{self.factor}x{self.factor} block, got {self.min_pixels}, "
                       f"{self.max_pixels}")

  @property
  def factor(self) -> int:
    """Side of a merge block in pixels: image sides are multiples of it."""
    return self.patch_size * self.merge_size

  @property
  def max_blocks(self) -> int:
    """Merge blocks (LM tokens) of the largest image a slot holds."""
    return self.max_pixels // self.factor**2

  @property
  def max_patches(self) -> int:
    """P, the patch budget of one image slot."""
    return self.max_blocks * self.merge_size**2

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size**2

  def _size(self, height: int, width: int, name: str) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to; ImageError when it is refused."""
    try:
      h, w = qwen2vl_image.smart_resize(height, width, self.factor, self.min_pixels,
                                        self.max_pixels)
    except ValueError as e:  # an aspect ratio over 200
      raise images_lib.ImageError(f"cannot use image {name}: {e}") from e
    if h * w > self.max_blocks * self.factor**2:
      raise images_lib.ImageError(
          f"cannot use image {name}: {width}x{height} resizes to {w}x{h}, more than the "
          f"{self.max_blocks} merge blocks of an image slot (max_pixels={self.max_pixels})")
    return h, w

  def _resize(self, image: Image.Image, name: str) -> np.ndarray:
    """qwen2vl_image.preprocess up to (not including) the normalisation, as uint8 [h, w, 3]."""
    rgb = qwen2vl_image.to_rgb(image)
    h, w = self._size(rgb.height, rgb.width, name)
    return np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)

  def load(self, path: str | os.PathLike) -> np.ndarray:
    """uint8 [h, w, 3] of an image file, sides multiples of 28; ImageError names the file."""
    path = os.fspath(path)
    try:
      with Image.open(path) as f:
        f.load()
        rgb = qwen2vl_image.to_rgb(f)
    except _DECODE_ERRORS as e:
      raise images_lib.ImageError(f"cannot read image {path}: {e}") from e
    return self._resize(rgb, path)

  def decode(self, data: bytes, *, name: str = "image") -> np.ndarray:
    """uint8 [h, w, 3] from file bytes, exactly as :meth:`load` reads the file."""
    try:
      with Image.open(io.BytesIO(data)) as f:
        f.load()
        rgb = qwen2vl_image.to_rgb(f)
    except _DECODE_ERRORS as e:
      raise images_lib.ImageError(f"cannot decode {name}: {e}") from e
    return self._resize(rgb, name)

  def _grid(self, image: np.ndarray) -> tuple[int, int]:
    """(rows, columns) of patches of a loaded image."""
    h, w = np.shape(image)[:2]
    if h % self.factor or w % self.factor:
      raise ValueError(f"image {h}x{w} was not loaded by this format: its sides are not "
                       f"multiples of {self.factor}")
    return h // self.patch_size, w // self.patch_size

  def num_tokens(self, image: np.ndarray) -> int:
    gh, gw = self._grid(image)
    return gh * gw // self.merge_size**2

  def num_tokens_of_file(self, path: str | os.PathLike) -> int:
    """:meth:`num_tokens` of :meth:`load`, from the header alone (PIL reads the size lazily)."""
    path = os.fspath(path)
    try:
      with Image.open(path) as f:
        width, height = f.size
    except _DECODE_ERRORS as e:
      raise images_lib.ImageError(f"cannot read image {path}: {e}") from e
    h, w = self._size(height, width, path)
    return h * w // self.factor**2

  def batch_shapes(self, rows: int, max_images: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"images": ((rows, max_images, self.max_patches, self.patch_dim), np.dtype(np.float32)),
            "image_grid": ((rows, max_images, 3), np.dtype(np.int32))}

  def positions_shape(self, rows: int, seq_len: int) -> tuple[int, ...]:
    return (rows, 3, seq_len)

  def fill(self, arrays: dict[str, np.ndarray], row: int, slot: int, image: np.ndarray) -> None:
    """Writes the image's patches (processor layout) into the first h * w patches of the slot
    and its grid (1, h, w); the rest of the slot stays zero."""
    gh, gw = self._grid(image)
    if gh * gw > self.max_patches:
      raise ValueError(f"image {np.shape(image)[:2]} has {gh * gw} patches, more than the "
                       f"{self.max_patches} of a slot")
    patches, _, _ = qwen2vl_image.patchify(qwen2vl_image.normalize(np.asarray(image)),
                                           self.patch_size, self.merge_size,
                                           self.temporal_patch_size)
    arrays["images"][row, slot, :gh * gw] = patches
    arrays["image_grid"][row, slot] = (1, gh, gw)

  def positions(self, input_ids: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
    """int32 [3, n]: the sample's M-RoPE positions from 0 (``get_rope_index`` on it alone).

    Raises:
      ValueError: the image token blocks do not match the images' grids.
    """
    grids = np.asarray([(1, *self._grid(im)) for im in images], np.int64).reshape(-1, 3)
    return qwen2vl_image.sequence_positions(np.asarray(input_ids), grids,
                                            image_token_id=self.image_token_id,
                                            spatial_merge_size=self.merge_size)


def describe(image_format: object) -> dict[str, object]:
  """JSON-ready settings of a format (class name and fields), e.g. for a loader's resume check."""
  if dataclasses.is_dataclass(image_format) and not isinstance(image_format, type):
    return {"class": type(image_format).__name__, **dataclasses.asdict(image_format)}
  return {"class": type(image_format).__name__, "repr": repr(image_format)}
