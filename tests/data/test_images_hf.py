"""Our LLaVA-1.5 image pipeline equals transformers' image processors on generated test images.

LLaVA-1.5 pads every image to a square with the CLIP mean colour (`expand2square`), then runs the
CLIP processor: shortest edge -> size (bicubic), centre crop to size (a no-op on a square),
rescale by 1/255, normalise with the CLIP mean/std. Both sides resize with PIL's bicubic filter
(`load_image` uses `Image.Resampling.BICUBIC`, the processors `resample=3`, the same filter), so
the outputs agree to float32 rounding; no resampling difference needs to be tolerated.
"""

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data.images import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PAD_COLOR, expand_to_square,
                                    load_image, normalize)

transformers = pytest.importorskip("transformers")

# (height, width, PIL mode): wide, tall, odd padding split (19 = 9 + 10), square, greyscale, RGBA.
SHAPES = [(23, 37, "RGB"), (50, 20, "RGB"), (21, 40, "RGB"), (30, 30, "RGB"), (17, 29, "L"),
          (26, 15, "RGBA")]


def _write_image(path, height, width, mode, seed):
  """Noise over a gradient: every pixel differs, so a shifted pad or a wrong filter shows."""
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
  ramp = np.linspace(0, 180, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
  arr = np.clip(ramp + rng.integers(0, 15, (height, width, channels)), 0, 255).astype(np.uint8)
  Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  paths = []
  for i, (h, w, mode) in enumerate(SHAPES):
    path = root / f"{i}_{h}x{w}_{mode}.png"
    _write_image(path, h, w, mode, seed=i)
    paths.append(path)
  return paths


def _processors(size):
  """The CLIP processor (LLaVA's own code pads first) and transformers' LLaVA one (pads itself)."""
  try:  # transformers >= 5 without torchvision: the PIL backends, named explicitly.
    from transformers import CLIPImageProcessorPil as Clip, LlavaImageProcessorPil as Llava
  except ImportError:  # transformers 4: the slow processors are the PIL ones.
    from transformers import CLIPImageProcessor as Clip, LlavaImageProcessor as Llava
  kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  return Clip(**kw), Llava(do_pad=True, **kw)


@pytest.mark.parametrize("size", [32, 336])
def test_matches_transformers_processors(images, size):
  clip, llava = _processors(size)
  assert clip.resample == llava.resample == Image.Resampling.BICUBIC
  np.testing.assert_allclose(clip.image_mean, OPENAI_CLIP_MEAN)
  np.testing.assert_allclose(clip.image_std, OPENAI_CLIP_STD)
  for path in images:
    ours = normalize(load_image(path, size))
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    with Image.open(path) as f:
      rgb = f.convert("RGB")
    # LLaVA-1.5 (llava/mm_utils.py): expand2square with the processor's mean colour, then process.
    padded = expand_to_square(rgb, tuple(int(x * 255) for x in clip.image_mean))
    ref = clip(images=padded, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0, err_msg=str(path))
    ref = llava(images=rgb, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0, err_msg=str(path))


def test_padding_is_the_clip_mean_colour(images):
  assert PAD_COLOR == (122, 116, 104)
  tall = images[1]  # 50 x 20: padded left and right by 15 pixels each.
  side = 50
  out = load_image(tall, side)  # No resize: the padded square itself.
  np.testing.assert_array_equal(out[:, :15], np.broadcast_to(PAD_COLOR, (side, 15, 3)))
  np.testing.assert_array_equal(out[:, 35:], np.broadcast_to(PAD_COLOR, (side, 15, 3)))
  with Image.open(tall) as f:
    np.testing.assert_array_equal(out[:, 15:35], np.asarray(f.convert("RGB")))
