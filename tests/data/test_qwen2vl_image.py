"""Our Qwen2-VL image preprocessing equals transformers' `Qwen2VLImageProcessorPil`.

Both sides resize with PIL's bicubic filter on the uint8 image and scale / normalise in the same
arithmetic order, so the patches agree to float32 rounding. (The torchvision-backed
`Qwen2VLImageProcessor` resizes with torch's own bicubic and differs slightly; torchvision is not
installed here, and the PIL class is what transformers falls back to without it.)
"""

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import qwen2vl_image as qi
from visatb_jax.data.images import ImageError

transformers = pytest.importorskip("transformers")
hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

# (height, width, PIL mode): tiny (scaled up to min_pixels), wide, tall, large (scaled down to
# max_pixels), already a multiple of 28, greyscale, transparent.
SHAPES = [(20, 30, "RGB"), (61, 143, "RGB"), (200, 45, "RGB"), (301, 517, "RGB"),
          (56, 84, "RGB"), (70, 33, "L"), (45, 90, "RGBA")]
SMALL_MAX = 28 * 28 * 12  # Forces the downscaling branch on the larger images.


def _image(height, width, mode, seed):
  """Noise over a gradient: a wrong filter, crop or patch order shows."""
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
  ramp = np.linspace(0, 180, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
  arr = np.clip(ramp + rng.integers(0, 60, (height, width, channels)), 0, 255).astype(np.uint8)
  if mode == "RGBA":
    arr[..., 3] = rng.integers(0, 256, (height, width))
  return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


IMAGES = [_image(h, w, mode, seed=i) for i, (h, w, mode) in enumerate(SHAPES)]


@pytest.mark.parametrize("max_pixels", [qi.MAX_PIXELS, SMALL_MAX], ids=["default", "small"])
def test_matches_transformers_processor(max_pixels):
  hf = hf_pil.Qwen2VLImageProcessorPil(min_pixels=qi.MIN_PIXELS, max_pixels=max_pixels,
                                       patch_size=14, temporal_patch_size=2, merge_size=2)
  ref = hf(images=IMAGES, return_tensors="np")
  pixels, grids = qi.preprocess_images(IMAGES, max_pixels=max_pixels)
  np.testing.assert_array_equal(grids, ref["image_grid_thw"])
  assert pixels.dtype == np.float32 and pixels.shape == ref["pixel_values"].shape
  np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
  for image, grid in zip(IMAGES, grids):
    assert qi.num_image_tokens(image.height, image.width, max_pixels=max_pixels) == (
        grid.prod() // 4)
    assert hf.get_number_of_image_patches(image.height, image.width,
                                          {"max_pixels": max_pixels}) == grid.prod()
  if max_pixels == SMALL_MAX:
    assert (grids[:, 1:].prod(axis=1) * 14 * 14 <= SMALL_MAX).all()


def test_smart_resize_matches_transformers():
  rng = np.random.default_rng(0)
  sizes = [(h, w) for h, w in rng.integers(10, 3000, (300, 2)).tolist()
           if max(h, w) / min(h, w) <= 200] + [(28, 28), (14, 14), (42, 70), (1, 150)]
  for h, w in sizes:
    for lo, hi in ((qi.MIN_PIXELS, qi.MAX_PIXELS), (28 * 28 * 4, 28 * 28 * 64)):
      got = qi.smart_resize(h, w, 28, lo, hi)
      assert got == hf_pil.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
      assert got[0] % 28 == 0 and got[1] % 28 == 0
  with pytest.raises(ValueError, match="aspect ratio"):
    qi.smart_resize(10, 2500)


def test_patch_order_and_arrays():
  # A 28x56 image whose pixel values encode their coordinates: check the layout directly.
  rows, cols = np.meshgrid(np.arange(28), np.arange(56), indexing="ij")
  image = np.stack([rows, cols, rows * 0], axis=-1).astype(np.float32)
  patches, gh, gw = qi.patchify(image)
  assert (gh, gw) == (2, 4) and patches.shape == (8, 3 * 2 * 14 * 14)
  p = patches.reshape(8, 3, 2, 14, 14)
  np.testing.assert_array_equal(p[:, :, 0], p[:, :, 1])  # The frame, repeated.
  # Merge block 0 holds patches (0,0), (0,1), (1,0), (1,1); block 1 starts at patch column 2.
  tops = p[:, 0, 0, 0, 0]
  lefts = p[:, 1, 0, 0, 0]
  np.testing.assert_array_equal(tops, [0, 0, 14, 14, 0, 0, 14, 14])
  np.testing.assert_array_equal(lefts, [0, 14, 0, 14, 28, 42, 28, 42])
  with pytest.raises(ValueError, match="blocks"):
    qi.patchify(np.zeros((28, 42, 3), np.float32))
  # uint8 arrays are accepted like PIL images.
  arr = np.asarray(IMAGES[1])
  np.testing.assert_array_equal(qi.preprocess(arr)[0], qi.preprocess(IMAGES[1])[0])
  with pytest.raises(ValueError, match="uint8"):
    qi.preprocess(arr.astype(np.float32))


def test_load_image(tmp_path):
  path = tmp_path / "a.png"
  IMAGES[6].save(path)
  patches, grid = qi.load_image(path, max_pixels=SMALL_MAX)
  want, want_grid = qi.preprocess(Image.open(path), max_pixels=SMALL_MAX)
  assert grid == want_grid
  np.testing.assert_array_equal(patches, want)
  with pytest.raises(ImageError, match="missing.png"):
    qi.load_image(tmp_path / "missing.png")
