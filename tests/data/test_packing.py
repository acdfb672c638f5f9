"""Tests of packing: the shift at every segment boundary, images, first-fit, best fill.

PackedDataset's steps of samples: test_packing_steps.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visatb_jax.data import images as img
from visatb_jax.data import qwen2vl_image as qi
from visatb_jax.data.image_format import NativeImages
from visatb_jax.data.packing import (Example, PackedDataset, pack, pack_rows, pack_rows_best_fill,
                                     rows_to_batch)

PAD = 3
H = 2


def _ex(ids, mask, task, n_images=0, value=0):
  return Example(np.asarray(ids, np.int32), np.asarray(mask, bool), task,
                 np.full((n_images, H, H, 3), value, np.uint8))


def test_two_segments_exact_arrays():
  a = _ex([10, 11, 12, 13], [0, 0, 1, 1], task=0, n_images=1, value=50)
  # b's first token is labelled: a leak across the boundary would show at a's last position.
  b = _ex([20, 21, 22], [1, 1, 1], task=2)
  batch = pack([a, b], seq_len=10, max_images=2, pad_id=PAD)
  assert set(batch) == {"input_ids", "targets", "loss_mask", "task_ids", "positions",
                        "segment_ids", "images"}
  np.testing.assert_array_equal(batch["input_ids"], [[10, 11, 12, 13, 20, 21, 22, 3, 3, 3]])
  np.testing.assert_array_equal(batch["targets"], [[11, 12, 13, 0, 21, 22, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["task_ids"], [[-1, 0, 0, -1, 2, 2, -1, -1, -1, -1]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]])
  assert batch["images"].shape == (1, 2, H, H, 3)
  np.testing.assert_allclose(batch["images"][0, 0], img.normalize(np.full((H, H, 3), 50, np.uint8)))
  assert not batch["images"][0, 1].any()
  dtypes = {k: v.dtype for k, v in batch.items()}
  assert dtypes == {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32,
                    "task_ids": np.int32, "positions": np.int32, "segment_ids": np.int32,
                    "images": np.float32}


def test_three_segments_filling_the_row_exactly():
  exs = [_ex([5, 6], [0, 1], 1), _ex([7], [1], 0), _ex([8, 9, 4], [1, 0, 1], 3)]
  batch = pack(exs, seq_len=6, max_images=1, pad_id=PAD)
  np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9, 4]])
  np.testing.assert_array_equal(batch["targets"], [[6, 0, 0, 9, 4, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 0, 0, 1, 0]])
  np.testing.assert_array_equal(batch["task_ids"], [[1, -1, -1, -1, 3, -1]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 0, 0, 1, 2]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 2, 3, 3, 3]])


def test_image_order_and_max_images():
  exs = [_ex([1, 2], [0, 1], 0, 1, value=10), _ex([1, 2], [0, 1], 0, 2, value=20),
         _ex([1, 2], [0, 1], 0, 1, value=30), _ex([1, 2], [0, 1], 0, 0)]
  rows = pack_rows([2, 2, 2, 2], [1, 2, 1, 0], seq_len=100, max_images=3)
  assert rows == [[0, 1, 3], [2]]  # Example 2 would be a 4th image; the text-only one still fits.
  batch = rows_to_batch(exs, rows, seq_len=100, max_images=3, pad_id=PAD)
  values = [img.normalize(np.full((H, H, 3), v, np.uint8)) for v in (10, 20, 20, 30)]
  np.testing.assert_allclose(batch["images"][0], np.stack(values[:3]))
  np.testing.assert_allclose(batch["images"][1, 0], values[3])
  assert not batch["images"][1, 1:].any()


def test_first_fit_uses_earlier_rows():
  assert pack_rows([6, 6, 4, 3, 1], [0] * 5, seq_len=10, max_images=0) == [[0, 2], [1, 3, 4]]
  assert pack_rows([10, 1], [0, 0], seq_len=10, max_images=1) == [[0], [1]]


def _reference_first_fit(lengths, counts, seq_len, max_images):
  rows, free = [], []
  for i, (n, k) in enumerate(zip(lengths, counts)):
    for r, (t, m) in enumerate(free):
      if t >= n and m >= k:
        free[r] = (t - n, m - k)
        rows[r].append(i)
        break
    else:
      rows.append([i])
      free.append((seq_len - n, max_images - k))
  return rows


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(0, 2)), min_size=1, max_size=40),
       st.integers(2, 3))
def test_pack_rows_matches_reference_first_fit(items, max_images):
  lengths, counts = zip(*items)
  rows = pack_rows(lengths, counts, seq_len=16, max_images=max_images)
  assert rows == _reference_first_fit(lengths, counts, 16, max_images)
  assert sorted(i for row in rows for i in row) == list(range(len(items)))
  for row in rows:
    assert sum(lengths[i] for i in row) <= 16 and sum(counts[i] for i in row) <= max_images


def test_pack_rejects_oversized_examples():
  with pytest.raises(ValueError, match="example 1 has 11 tokens"):
    pack_rows([3, 11], [0, 0], seq_len=10, max_images=1)
  with pytest.raises(ValueError, match="example 0 has 2 images"):
    pack_rows([3], [2], seq_len=10, max_images=1)



def _first_fit_decreasing(lengths, counts, seq_len, max_images):
  order = np.argsort(-np.asarray(lengths), kind="stable")
  rows = pack_rows([lengths[i] for i in order], [counts[i] for i in order], seq_len, max_images)
  return [sorted(int(order[i]) for i in row) for row in rows]


def test_best_fill_fills_rows_first_fit_decreasing_leaves_short():
  lengths = [4, 4, 3, 3, 3, 3]
  assert _first_fit_decreasing(lengths, [0] * 6, 10, 0) == [[0, 1], [2, 3, 4], [5]]
  # Row 1: the greedy fill (4 + 4) leaves 2 free, the best pair (3 + 3) none.
  assert pack_rows_best_fill(lengths, [0] * 6, 10, 0) == [[0, 2, 3], [1, 4, 5]]


def test_best_fill_respects_the_image_cap():
  # Tokens would fit one row; images (1 + 1 + 1) do not. Sample 0 opens, the fill takes sample 1,
  # and with the cap reached only the text-only sample still fits.
  assert pack_rows_best_fill([10, 10, 10, 10], [1, 1, 1, 0], 100, 2) == [[0, 1, 3], [2]]
  # The 2-image sample opens and fills the cap alone.
  assert pack_rows_best_fill([3, 3, 3], [2, 1, 1], 10, 2) == [[0], [1, 2]]
  assert pack_rows_best_fill([5, 5], [0, 0], 10, 0) == [[0, 1]]


def test_best_fill_ties_go_to_most_images_then_earliest_index():
  assert pack_rows_best_fill([5, 5, 5, 5], [0] * 4, 10, 0) == [[0, 1], [2, 3]]
  # The opener: of equal lengths, the most images first, whatever the index.
  assert pack_rows_best_fill([5, 5], [0, 1], 5, 1) == [[1], [0]]
  assert pack_rows_best_fill([5, 5], [1, 0], 5, 1) == [[0], [1]]
  # The greedy fill: 6 opens, and of the 4s that fit, the 2-image one joins it, or of the 1-image
  # ones the earliest.
  assert pack_rows_best_fill([6, 4, 4], [0, 0, 2], 10, 2) == [[0, 2], [1]]
  assert pack_rows_best_fill([6, 4, 4, 4], [0, 1, 0, 1], 10, 2) == [[0, 1], [2, 3]]
  # Row 1 opens with 10, the greedy fill (7) leaves 3 free; the pairs 6 + 4 and 5 + 5 both
  # fill it, and the earlier index pair wins.
  assert pack_rows_best_fill([10, 7, 6, 5, 5, 4], [0] * 6, 20, 0) == [[0, 2, 5], [1, 3, 4]]
  assert pack_rows_best_fill([10, 7, 5, 5, 6, 4], [0] * 6, 20, 0) == [[0, 2, 3], [1, 4, 5]]


def test_best_fill_is_not_always_within_first_fit_decreasing_rows():
  # A heuristic, no guarantee: row 3 takes 19 + 5 + 3 (full) where FFD takes 19 + 7, and the
  # rest then packs into 3 rows instead of 2.
  lengths = [24, 21, 19, 17, 12, 12, 7, 6, 5, 4, 3, 3]
  assert len(_first_fit_decreasing(lengths, [0] * 12, 27, 0)) == 5
  assert pack_rows_best_fill(lengths, [0] * 12, 27, 0) == [[0, 10], [1, 7], [2, 8, 11], [3, 6],
                                                           [4, 5], [9]]
  # With images: row 1 opens with 5 (1 image); the greedy fill (4, 1 image) leaves 1 free, the
  # best pair 3 + 2 (text-only) none, and the two 4s left (1 + 3 images) then exceed the cap
  # together. FFD puts the 1-image 4 with the 5, the text-only samples with the 3-image 4.
  lengths, counts = [4, 5, 2, 4, 3], [1, 1, 0, 3, 0]
  assert _first_fit_decreasing(lengths, counts, 10, 3) == [[0, 1], [2, 3, 4]]
  assert pack_rows_best_fill(lengths, counts, 10, 3) == [[1, 2, 4], [3], [0]]


def _reference_best_fill(lengths, counts, seq_len, max_images):
  """The definition, by brute force."""
  key = lambda i: (-lengths[i], -counts[i], i)  # noqa: E731

  def fill(left, r, m):
    taken = []
    while fits := [i for i in left if lengths[i] <= r and counts[i] <= m]:
      i = min(fits, key=key)
      left.remove(i)
      taken.append(i)
      r, m = r - lengths[i], m - counts[i]
    return taken, r

  left, rows = set(range(len(lengths))), []
  while left:
    opener = min(left, key=key)
    left.remove(opener)
    r, m = seq_len - lengths[opener], max_images - counts[opener]
    row, free = fill(set(left), r, m)
    pairs = [(i, j) for i in left for j in left if i < j and lengths[i] + lengths[j] <= r
             and counts[i] + counts[j] <= m]
    if pairs:
      i, j = min(pairs, key=lambda p: (-lengths[p[0]] - lengths[p[1]], p))
      rest, pair_free = fill(left - {i, j}, r - lengths[i] - lengths[j], m - counts[i] - counts[j])
      if pair_free < free:
        row = [i, j] + rest
    left -= set(row)
    rows.append(sorted([opener] + row))
  return rows


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 24), st.integers(0, 3), st.data())
def test_best_fill_matches_reference(seq_len, max_images, data):
  items = data.draw(st.lists(st.tuples(st.integers(1, seq_len), st.integers(0, max_images)),
                             min_size=0, max_size=30))
  lengths, counts = [n for n, _ in items], [k for _, k in items]
  rows = pack_rows_best_fill(lengths, counts, seq_len, max_images)
  assert rows == _reference_best_fill(lengths, counts, seq_len, max_images)
  assert sorted(i for row in rows for i in row) == list(range(len(items)))
  for row in rows:
    assert row and sum(lengths[i] for i in row) <= seq_len
    assert sum(counts[i] for i in row) <= max_images
  # A pure function of its inputs, whatever their container.
  assert pack_rows_best_fill(np.asarray(lengths, np.int64), tuple(counts), seq_len,
                             max_images) == rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2048), st.integers(0, 4)), min_size=1, max_size=400),
       st.integers(4, 8))
def test_best_fill_partitions_within_limits(items, max_images):
  lengths, counts = zip(*items)
  rows = pack_rows_best_fill(lengths, counts, 2048, max_images)
  assert sorted(i for row in rows for i in row) == list(range(len(items)))
  for row in rows:
    assert sum(lengths[i] for i in row) <= 2048 and sum(counts[i] for i in row) <= max_images
  assert rows == pack_rows_best_fill(lengths, counts, 2048, max_images)


def test_best_fill_rejects_oversized_examples():
  with pytest.raises(ValueError, match="example 1 has 11 tokens"):
    pack_rows_best_fill([3, 11], [0, 0], seq_len=10, max_images=1)
  with pytest.raises(ValueError, match="example 0 has 2 images"):
    pack_rows_best_fill([3], [2], seq_len=10, max_images=1)
  with pytest.raises(ValueError, match="example 0 has 0 tokens"):
    pack_rows_best_fill([0], [0], seq_len=10, max_images=1)
  with pytest.raises(ValueError, match="2 lengths but 1 image counts"):
    pack_rows_best_fill([3, 3], [0], seq_len=10, max_images=1)
  assert pack_rows_best_fill([], [], seq_len=10, max_images=1) == []


def test_image_files_are_loaded_when_batched(tmp_path):
  Image.fromarray(np.full((4, 4, 3), 77, np.uint8)).save(tmp_path / "a.png")
  ex = Example(np.array([4, 4, 9], np.int32), np.array([0, 0, 1], bool), 0, [tmp_path / "a.png"])
  batch = pack([ex], seq_len=4, max_images=1, pad_id=PAD, image_size=4)
  np.testing.assert_allclose(batch["images"][0, 0], img.normalize(np.full((4, 4, 3), 77, np.uint8)))
  with pytest.raises(ValueError, match="image_size is required"):
    pack([ex], seq_len=4, max_images=1, pad_id=PAD)


def test_native_images_of_different_sizes_share_a_row():
  image_id = 9
  fmt = NativeImages(image_id, max_pixels=28 * 28 * 8)  # P = 32 patches a slot
  rng = np.random.default_rng(0)
  # As the format loads them: sides multiples of 28, sizes differ (6, 2 and 3 LM tokens).
  pics = [rng.integers(0, 256, shape, dtype=np.uint8)
          for shape in [(56, 84, 3), (28, 56, 3), (84, 28, 3)]]
  a = Example(np.asarray([1, 2] + [image_id] * 6 + [3, 4], np.int32), np.ones(10, bool), 0,
              pics[:1])
  b = Example(np.asarray([5] + [image_id] * 2 + [6] + [image_id] * 3 + [7], np.int32),
              np.ones(8, bool), 1, pics[1:])
  batch = rows_to_batch([a, b], [[0, 1]], seq_len=20, max_images=4, pad_id=PAD,
                        image_format=fmt)
  assert {k: v.shape for k, v in batch.items()} == {
      "input_ids": (1, 20), "targets": (1, 20), "loss_mask": (1, 20), "task_ids": (1, 20),
      "segment_ids": (1, 20), "positions": (1, 3, 20), "images": (1, 4, 32, 1176),
      "image_grid": (1, 4, 3)}
  grids = [(1, 4, 6), (1, 2, 4), (1, 6, 2)]
  np.testing.assert_array_equal(batch["image_grid"][0], grids + [(0, 0, 0)])
  for slot, (pic, (_, gh, gw)) in enumerate(zip(pics, grids)):
    want, _, _ = qi.patchify(qi.normalize(pic))
    np.testing.assert_array_equal(batch["images"][0, slot, :gh * gw], want)
    assert not batch["images"][0, slot, gh * gw:].any()
  assert not batch["images"][0, 3].any()
  pos = batch["positions"][0]
  assert (pos[:, 0] == 0).all() and (pos[:, 10] == 0).all()  # each segment restarts at 0
  assert not pos[:, 18:].any()  # padding
  want, _ = qi.get_rope_index(batch["input_ids"], grids, image_token_id=image_id,
                                   segment_ids=batch["segment_ids"])
  np.testing.assert_array_equal(batch["positions"], want)  # [B, 3, L]
  # a alone: text 0, 1; its 2 x 3 token grid from 2; text continues at 2 + max(2, 3).
  np.testing.assert_array_equal(pos[:, :10], [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                                              [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                                              [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 10 + [2] * 8 + [0] * 2)
  # PackedDataset hands the format on.
  ds = PackedDataset([a, b], seq_len=20, max_images=4, pad_id=PAD, seed=0, batch_size=2,
                     image_format=fmt)
  assert ds.batch_at(0, 2)["image_grid"].shape == (2, 4, 3)
