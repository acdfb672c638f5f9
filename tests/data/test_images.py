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


def _png(path, value=0):
  Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
  return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "corrupt_data", "missing"])
def test_check_images_names_the_first_bad_file_and_why(tmp_path, damage):
  good = [_png(tmp_path / f"good{i}.png", 40 * i) for i in range(3)]
  bad = tmp_path / "bad.png"
  data = _png(bad, 7).read_bytes()
  if damage == "truncated":  # the header opens; the pixels do not decode
    bad.write_bytes(data[:len(data) // 2])
  elif damage == "garbage":
    bad.write_bytes(b"not a png at all")
  elif damage == "corrupt_data":
    bad.write_bytes(data[:40] + bytes(20) + data[60:])
  else:
    bad.unlink()
  later_bad = tmp_path / "later.png"
  later_bad.write_bytes(b"also bad")
  with pytest.raises(ValueError, match=r"bad\.png: \S") as info:
    images.check_images([*good[:2], bad, later_bad, good[2]])
  assert isinstance(info.value, images.ImageError)
  assert "later.png" not in str(info.value) and "\n" not in str(info.value)


def test_check_images_accepts_good_files(tmp_path):
  images.check_images([_png(tmp_path / "a.png"), str(_png(tmp_path / "b.png", 255))])
  images.check_images([])


@pytest.mark.parametrize("damage", ["truncated", "corrupt_data"])
def test_check_images_refuses_damage_even_when_pil_tolerates_truncation(tmp_path, damage,
                                                                        monkeypatch):
  """tensorflow_datasets turns LOAD_TRUNCATED_IMAGES on for the whole process when imported."""
  from PIL import ImageFile
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  data = _png(tmp_path / "x.png", 9).read_bytes()
  bad = tmp_path / "bad.png"
  bad.write_bytes(data[:len(data) // 2] if damage == "truncated"
                  else data[:40] + bytes(20) + data[60:])
  with pytest.raises(images.ImageError, match="bad.png"):
    images.check_images([bad])
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the setting is left as it was
