"""Tests of image loading (pad to square with the CLIP mean colour, resize) and normalisation."""

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import images


def test_square_image_is_unchanged(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "a.png")
  out = images.load_image(tmp_path / "a.png", 8)
  assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def test_wide_image_is_padded_centred_with_the_mean_colour(tmp_path):
  pixels = np.full((2, 6, 3), 10, np.uint8)
  Image.fromarray(pixels).convert("L").save(tmp_path / "wide.png")  # Grey: converted to RGB.
  out = images.load_image(tmp_path / "wide.png", 6)
  assert out.shape == (6, 6, 3)
  assert images.PAD_COLOR == (122, 116, 104)
  assert np.all(out[:2] == images.PAD_COLOR) and np.all(out[4:] == images.PAD_COLOR)
  assert np.all(out[2:4] == 10)


def test_resize_to_size(tmp_path):
  # 40 x 20 (H x W) pads to 40 x 40 (image in columns 10..29), then halves to 20 x 20.
  Image.fromarray(np.full((40, 20, 3), 200, np.uint8)).save(tmp_path / "t.png")
  out = images.load_image(tmp_path / "t.png", 20)
  assert out.shape == (20, 20, 3)
  # Bicubic may overshoot by a level at edges; the centre keeps the image colour, the sides the pad.
  assert np.all(np.abs(out[:, 7:13].astype(int) - 200) <= 2)
  assert np.all(np.abs(out[:, 0].astype(int) - images.PAD_COLOR) <= 2)


def test_missing_or_unreadable_image_is_named(tmp_path):
  with pytest.raises(images.ImageError, match="nope.png"):
    images.load_image(tmp_path / "nope.png", 4)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="bad.png"):
    images.load_image(tmp_path / "bad.png", 4)


def test_load_images_stacks():
  assert images.load_images([], 5).shape == (0, 5, 5, 3)


def test_normalize_uses_clip_statistics():
  x = np.array([[[0, 255, 128]]], np.uint8)
  out = images.normalize(x)
  mean, std = np.array(images.OPENAI_CLIP_MEAN), np.array(images.OPENAI_CLIP_STD)
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  np.testing.assert_allclose(out[0, 0], (np.array([0, 1, 128 / 255]) - mean) / std, rtol=1e-6)
