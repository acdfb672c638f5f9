"""Tests of image_format.py: native images equal the Qwen2-VL processor; square ones, today."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visatb_jax.data import images as images_lib
from visatb_jax.data import qwen2vl_image as qi
from visatb_jax.data.image_format import NativeImages, SquareImages, describe
from visatb_jax.data.packing import Example, pack

from test_qwen2vl_image import _image  # noise over a gradient, the processor tests' images

IMAGE_ID = 7
SMALL_MAX = 28 * 28 * 256  # Forces the downscaling branch on the large image; P = 1024 patches.
# (height, width, PIL mode): tiny (scaled up to min_pixels), transparent, large greyscale.
SHAPES = [(20, 30, "RGB"), (61, 143, "RGBA"), (400, 620, "L")]

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  out = []
  for i, (h, w, mode) in enumerate(SHAPES):
    out.append(root / f"{i}.png")
    _image(h, w, mode, seed=i).save(out[-1])
  return out


def _filled(fmt, images):
  """The format's arrays of one row holding ``images`` in slots 0.. ."""
  arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype)
            in fmt.batch_shapes(1, len(images)).items()}
  for slot, image in enumerate(images):
    fmt.fill(arrays, 0, slot, image)
  return arrays


@pytest.mark.parametrize("max_pixels", [qi.MAX_PIXELS, SMALL_MAX], ids=["default", "small"])
def test_native_load_and_fill_equal_the_processor(paths, max_pixels):
  fmt = NativeImages(IMAGE_ID, max_pixels=max_pixels)
  loaded = [fmt.load(p) for p in paths]
  for p, image in zip(paths, loaded):
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    np.testing.assert_array_equal(fmt.decode(p.read_bytes(), name=str(p)), image)
  arrays = _filled(fmt, loaded)
  assert set(arrays) == {"images", "image_grid"}
  assert arrays["images"].shape == (1, 3, fmt.max_patches, 3 * 2 * 14 * 14)
  assert arrays["images"].dtype == np.float32 and arrays["image_grid"].dtype == np.int32
  want = [qi.preprocess(Image.open(p), max_pixels=max_pixels) for p in paths]
  for slot, (patches, grid) in enumerate(want):
    n = patches.shape[0]
    assert tuple(arrays["image_grid"][0, slot]) == grid
    np.testing.assert_array_equal(arrays["images"][0, slot, :n], patches)  # to the bit
    assert not arrays["images"][0, slot, n:].any()
    assert fmt.num_tokens(loaded[slot]) == n // 4 == fmt.num_tokens_of_file(paths[slot])
  if max_pixels == SMALL_MAX:  # the large image was scaled down, the tiny one up
    assert want[2][1][1] * want[2][1][2] * 14 * 14 <= SMALL_MAX
    assert want[0][1][1] * want[0][1][2] * 14 * 14 >= qi.MIN_PIXELS > 20 * 30


def test_native_fill_equals_transformers_processor(paths):
  hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
  hf = hf_pil.Qwen2VLImageProcessorPil(min_pixels=qi.MIN_PIXELS, max_pixels=SMALL_MAX,
                                       patch_size=14, temporal_patch_size=2, merge_size=2)
  ref = hf(images=[Image.open(p) for p in paths], return_tensors="np")
  fmt = NativeImages(IMAGE_ID, max_pixels=SMALL_MAX)
  arrays = _filled(fmt, [fmt.load(p) for p in paths])
  np.testing.assert_array_equal(arrays["image_grid"][0], ref["image_grid_thw"])
  counts = ref["image_grid_thw"].prod(axis=1)
  ours = np.concatenate([arrays["images"][0, k, :n] for k, n in enumerate(counts)])
  # Same PIL resize and arithmetic order: equal to float32 rounding (tests/data/test_qwen2vl_image).
  np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6, rtol=0)


def test_native_errors(tmp_path):
  fmt = NativeImages(IMAGE_ID)
  with pytest.raises(images_lib.ImageError, match="missing.png"):
    fmt.load(tmp_path / "missing.png")
  with pytest.raises(images_lib.ImageError, match="missing.png"):
    fmt.num_tokens_of_file(tmp_path / "missing.png")
  with pytest.raises(images_lib.ImageError, match="cannot decode bad.png"):
    fmt.decode(b"not an image", name="bad.png")
  # With a small max_pixels an extreme aspect ratio resizes past the slot's budget: refused.
  thin = tmp_path / "thin.png"
  Image.new("RGB", (1400, 14), (1, 2, 3)).save(thin)
  small = NativeImages(IMAGE_ID, max_pixels=28 * 28 * 12)
  with pytest.raises(images_lib.ImageError, match="thin.png.*more than the 12 merge blocks"):
    small.load(thin)
  with pytest.raises(images_lib.ImageError, match="thin.png"):
    small.num_tokens_of_file(thin)
  assert fmt.num_tokens(fmt.load(thin)) == fmt.num_tokens_of_file(thin)
  with pytest.raises(ValueError, match="multiples of 28"):
    fmt.num_tokens(np.zeros((30, 28, 3), np.uint8))
  with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
    NativeImages(IMAGE_ID, min_pixels=10, max_pixels=5)


# Settings whose max_pixels is at least 200 merge blocks (the largest aspect ratio smart_resize
# takes), for which the per-slot budget P always suffices.
_SETTINGS = [(qi.MIN_PIXELS, qi.MAX_PIXELS), (qi.MIN_PIXELS, 28 * 28 * 200),
             (28 * 28 * 16, SMALL_MAX), (qi.MIN_PIXELS, 28 * 28 * 1000 + 500)]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20000), st.floats(-np.log(200), np.log(200)), st.sampled_from(_SETTINGS))
def test_native_patch_budget_holds(height, log_ratio, pixels):
  width = max(1, round(height * np.exp(log_ratio)))
  if max(height, width) / min(height, width) > 200:
    return
  min_pixels, max_pixels = pixels
  fmt = NativeImages(IMAGE_ID, min_pixels=min_pixels, max_pixels=max_pixels)
  h, w = qi.smart_resize(height, width, 28, min_pixels, max_pixels)
  shapes = fmt.batch_shapes(2, 3)
  p = max_pixels // (28 * 28) * 4
  assert shapes == {"images": ((2, 3, p, 1176), np.dtype(np.float32)),
                    "image_grid": ((2, 3, 3), np.dtype(np.int32))}
  assert (h // 14) * (w // 14) <= p
  assert qi.num_image_tokens(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == (
      fmt.num_tokens(np.zeros((h, w, 3), np.uint8))) <= fmt.max_blocks


def test_native_positions_equal_get_rope_index(paths):
  fmt = NativeImages(IMAGE_ID, max_pixels=SMALL_MAX)
  images = [fmt.load(p) for p in paths]
  counts = [fmt.num_tokens(im) for im in images]
  # Text, image 0, text, images 1 and 2 back to back, text.
  ids = np.concatenate([[1, 2, 3], [IMAGE_ID] * counts[0], [4, 5], [IMAGE_ID] * counts[1],
                        [IMAGE_ID] * counts[2], [6]]).astype(np.int32)
  pos = fmt.positions(ids, images)
  grids = [qi.preprocess(Image.open(p), max_pixels=SMALL_MAX)[1] for p in paths]
  want, _ = qi.get_rope_index(ids[None], grids, image_token_id=IMAGE_ID)
  assert pos.dtype == np.int32 and pos.shape == (3, len(ids))
  np.testing.assert_array_equal(pos, want[0])  # [B, 3, L]
  np.testing.assert_array_equal(fmt.positions(ids[:3], []), np.tile(np.arange(3), (3, 1)))
  with pytest.raises(ValueError):
    fmt.positions(ids, images[:2])  # a block without its image


def test_formats_pickle_and_describe():
  for fmt in (SquareImages(336, 576), NativeImages(151655, max_pixels=SMALL_MAX)):
    again = pickle.loads(pickle.dumps(fmt))
    assert again == fmt and hash(again) == hash(fmt) and type(again) is type(fmt)
  assert describe(SquareImages(336, 576)) == {"class": "SquareImages", "image_size": 336,
                                               "num_image_tokens": 576}
  assert describe(NativeImages(5)) == {
      "class": "NativeImages", "image_token_id": 5, "min_pixels": qi.MIN_PIXELS,
      "max_pixels": qi.MAX_PIXELS, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def test_square_equals_todays_arrays(paths, tmp_path):
  fmt = SquareImages(12, 5)
  for p in paths:
    want = images_lib.load_image(p, 12)
    np.testing.assert_array_equal(fmt.load(p), want)
    np.testing.assert_array_equal(fmt.decode(p.read_bytes(), name="x"), want)
    assert fmt.num_tokens(want) == 5
  assert fmt.num_tokens_of_file(tmp_path / "never-read.png") == 5  # no file access
  assert fmt.batch_shapes(2, 3) == {"images": ((2, 3, 12, 12, 3), np.dtype(np.float32))}
  assert fmt.positions_shape(2, 9) == (2, 9)
  np.testing.assert_array_equal(fmt.positions(np.zeros(4, np.int32), []), np.arange(4))
  arrays = _filled(fmt, [fmt.load(p) for p in paths])
  np.testing.assert_array_equal(arrays["images"][0],
                                images_lib.normalize(images_lib.load_images(paths, 12)))
  with pytest.raises(ValueError, match=r"image shape \(8, 8, 3\) differs from \(12, 12, 3\)"):
    fmt.fill(arrays, 0, 0, np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(images_lib.ImageError, match="cannot decode y.png"):
    fmt.decode(b"nope", name="y.png")
  # The default of packing (image_size=) and the explicit format give the same batch, from
  # arrays, lists of arrays or files.
  ids, mask = np.arange(10, 16, dtype=np.int32), np.ones(6, bool)
  stacked = images_lib.load_images(paths[:2], 12)
  batches = [pack([Example(ids, mask, 0, stacked)], seq_len=8, max_images=2, pad_id=0),
             pack([Example(ids, mask, 0, list(stacked))], seq_len=8, max_images=2, pad_id=0),
             pack([Example(ids, mask, 0, paths[:2])], seq_len=8, max_images=2, pad_id=0,
                  image_format=fmt)]
  for batch in batches[1:]:
    assert batch.keys() == batches[0].keys()
    for k in batch:
      assert batch[k].dtype == batches[0][k].dtype
      np.testing.assert_array_equal(batch[k], batches[0][k], err_msg=k)
  with pytest.raises(ValueError, match="not both"):
    pack([Example(ids, mask, 0, stacked)], seq_len=8, max_images=2, pad_id=0, image_size=12,
         image_format=fmt)
