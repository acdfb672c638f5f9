"""Image loading as LLaVA-1.5 does it: pad to square, resize, CLIP-normalise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-1.5 pads with the CLIP mean colour in 0..255: (122, 116, 104).
PAD_COLOR = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)


class ImageError(ValueError):
  """An image file that is missing or cannot be decoded."""


def expand_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
  """Pads an RGB image to a square, centred, with ``color`` (LLaVA's ``expand2square``)."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  result = Image.new(image.mode, (side, side), color)
  result.paste(image, ((side - width) // 2, (side - height) // 2))
  return result


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """Reads an image file as uint8 RGB ``[size, size, 3]``: padded to square, bicubic resize.

  Raises:
    ImageError: the file is missing or unreadable (the message names it).
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as f:
      image = f.convert("RGB")
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from e
  image = expand_to_square(image)
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def check_images(paths: Iterable[str | os.PathLike]) -> None:
  """Decodes every image file once, so that a bad one stops a run before training starts.

  A truncated or corrupt file often opens (PIL reads the header only) and fails only when its
  pixels are decoded, which is why each file is verified (structure and checksums) and fully
  loaded here, with truncated files refused whatever `ImageFile.LOAD_TRUNCATED_IMAGES` says.

  Raises:
    ImageError: (a ValueError) for the first file that is missing or cannot be decoded; the
      message names the file and says why.
  """
  with _strict_decoding():
    for path in paths:
      path = os.fspath(path)
      try:
        with Image.open(path) as f:
          f.verify()
        with Image.open(path) as f:  # verify() leaves the image unusable: decode a fresh one
          f.load()
      except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {_reason(e)}") from e


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
  """Truncated files fail to load while the block runs.

  tensorflow_datasets sets PIL's process-wide LOAD_TRUNCATED_IMAGES when imported, after which
  a truncated file loads without error, its missing rows grey.
  """
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _reason(error: BaseException) -> str:
  """What went wrong, without the path the message already names."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error) or type(error).__name__


def load_images(paths: Sequence[str | os.PathLike], size: int) -> np.ndarray:
  """Several images as uint8 ``[k, size, size, 3]`` (``k = 0`` gives an empty array)."""
  out = np.zeros((len(paths), size, size, 3), np.uint8)
  for i, path in enumerate(paths):
    out[i] = load_image(path, size)
  return out


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` with the OpenAI CLIP statistics."""
  x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
  mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(OPENAI_CLIP_STD, np.float32)
  return (x - mean) / std
