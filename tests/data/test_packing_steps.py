"""Tests of PackedDataset's steps: batch_size samples a step, static rows, exact epochs, resume."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.data import packing
from visatb_jax.data.packing import Example, PackedDataset

PAD = 3
SEQ_LEN, MAX_IMAGES = 12, 2


def _examples(n=23, seed=123):
  rng = np.random.default_rng(seed)
  exs = []
  for i in range(n):
    length = int(rng.integers(2, 9))
    ids = np.arange(length) + 10 * i + 100  # Never equal to PAD; tells the sample apart.
    exs.append(Example(ids.astype(np.int32), rng.random(length) < 0.5, i % 3,
                       np.full((i % 2, 2, 2, 3), i, np.uint8)))
  return exs


def _dataset(seed=0, n=23, batch_size=5):
  return PackedDataset(_examples(n), seq_len=SEQ_LEN, max_images=MAX_IMAGES, pad_id=PAD,
                       seed=seed, batch_size=batch_size)


def _samples_in(batch):
  """The sample numbers (ids // 10 - 10) of a batch's segments, row by row."""
  out = []
  for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
    out += [int(ids[seg == s][0]) // 10 - 10 for s in range(1, seg.max() + 1)]
  return out


def test_step_arithmetic():
  assert packing.steps_per_epoch(23, 5) == 5 and packing.steps_per_epoch(20, 5) == 4
  assert packing.num_steps(23, 5, 1.0) == 5
  assert packing.num_steps(23, 5, 3.0) == 15  # each epoch ends on its own short step
  assert packing.num_steps(30, 1, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
  assert packing.num_steps(23, 100, 0.01) == 1
  assert [packing.round_up(v, 4) for v in (0, 1, 4, 5)] == [4, 4, 4, 8]
  assert packing.rows_for_samples(128, 1.0, 32) == 128
  assert packing.rows_for_samples(128, 2.6, 32) == 64  # ceil(49.2) = 50 -> 64
  assert packing.rows_for_samples(10, 2.5) == 4
  with pytest.raises(ValueError, match="batch_size >= 1"):
    packing.steps_per_epoch(5, 0)
  with pytest.raises(ValueError, match="samples_per_row must be > 0"):
    packing.rows_for_samples(5, 0.0)


def test_paper_scale_epoch_is_ceil_samples_over_batch():
  """The issue's case: 665k samples at the paper's 128 a step, about 5.2k steps an epoch (not the
  ~1.4k of 128 rows of 2.6 samples), within 1 % of ceil(samples / batch) (here exactly)."""
  n = 665_298
  steps = packing.num_steps(n, 128, 1.0)
  assert steps == math.ceil(n / 128) == 5198
  assert abs(steps - n / 128) / (n / 128) < 0.01


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 3), st.integers(0, 3))
def test_every_epoch_holds_every_sample_once_in_ceil_steps(n, batch, epochs, seed):
  ds = PackedDataset(_examples(n), seq_len=SEQ_LEN, max_images=MAX_IMAGES, pad_id=PAD,
                     seed=seed, batch_size=batch)
  per_epoch = math.ceil(n / batch)
  assert ds.steps_per_epoch == per_epoch and ds.num_steps(epochs) == epochs * per_epoch
  for e in range(epochs):
    steps = [ds.sample_indices(s) for s in range(e * per_epoch, (e + 1) * per_epoch)]
    assert [len(x) for x in steps] == [batch] * (per_epoch - 1) + [n - batch * (per_epoch - 1)]
    assert sorted(np.concatenate(steps).tolist()) == list(range(n))
    for s in range(e * per_epoch, (e + 1) * per_epoch):  # packing loses and repeats none
      assert sorted(i for row in ds.step_rows(s) for i in row) == sorted(ds.sample_indices(s))


def test_epochs_have_their_own_order_and_seeds_matter():
  ds = _dataset()
  first = np.concatenate([ds.sample_indices(s) for s in range(5)])
  second = np.concatenate([ds.sample_indices(s) for s in range(5, 10)])
  assert first.tolist() != second.tolist()
  other = _dataset(seed=1)
  assert ds.sample_indices(0).tolist() != other.sample_indices(0).tolist()


def test_batches_have_static_rows_and_padding_rows_carry_nothing():
  ds = _dataset(n=23, batch_size=7)
  steps = ds.num_steps(2.0)
  needed = ds.rows_needed(steps)
  assert len(needed) == steps == 8 and needed.min() < needed.max()  # steps differ in rows
  assert ds.rows_per_step(steps) == needed.max()
  rows = ds.rows_per_step(steps, multiple=4)
  assert rows % 4 == 0 and rows - 4 < needed.max() <= rows
  total_tokens = 0
  for s in range(steps):
    batch = ds.batch_at(s, rows)
    assert all(v.shape[0] == rows for v in batch.values())  # one shape for every step
    assert sorted(_samples_in(batch)) == sorted(ds.sample_indices(s))
    empty = batch["segment_ids"].max(axis=1) == 0
    assert empty.sum() == rows - needed[s]
    assert not batch["loss_mask"][empty].any() and (batch["task_ids"][empty] == -1).all()
    assert (batch["input_ids"][empty] == PAD).all() and not batch["images"][empty].any()
    if s < ds.steps_per_epoch:
      total_tokens += int((batch["segment_ids"] > 0).sum())
  assert total_tokens == sum(len(ex) for ex in ds.examples)  # one epoch: every token once
  pad = ds.padding(steps, rows)
  assert pad["empty_rows"] == pytest.approx(1 - needed.sum() / (steps * rows))
  assert pad["non_pad"] == pytest.approx(2 * total_tokens / (steps * rows * SEQ_LEN))
  assert pad["samples_per_row"] == pytest.approx(2 * 23 / needed.sum())


def test_too_few_rows_is_an_error_naming_the_step():
  ds = _dataset(batch_size=10)
  need = int(ds.rows_needed(1)[0])
  with pytest.raises(ValueError, match=f"step 0 packs into {need} rows, more than "
                                       f"rows_per_step={need - 1}"):
    ds.batch_at(0, need - 1)


def test_batch_at_is_a_pure_function_of_seed_and_step():
  """What exact resume needs: a fresh dataset (a resumed process) gives the same batch."""
  a, b = _dataset(), _dataset()
  b.batch_at(7, 8)
  b.rows_needed(12)  # Call history must not matter.
  for step in (0, 3, 11):
    for key, value in a.batch_at(step, 8).items():
      np.testing.assert_array_equal(value, b.batch_at(step, 8)[key])
  other = _dataset(seed=1)
  assert not all(np.array_equal(a.batch_at(s, 8)["input_ids"], other.batch_at(s, 8)["input_ids"])
                 for s in range(3))


def test_bad_examples_fail_when_the_dataset_is_built():
  exs = _examples(4) + [Example(np.arange(SEQ_LEN + 1, dtype=np.int32),
                                np.ones(SEQ_LEN + 1, bool), 0, np.zeros((0, 2, 2, 3), np.uint8))]
  with pytest.raises(ValueError, match="example 4 has 13 tokens"):
    PackedDataset(exs, seq_len=SEQ_LEN, max_images=MAX_IMAGES, pad_id=PAD, seed=0, batch_size=2)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    PackedDataset(exs[:4], seq_len=SEQ_LEN, max_images=MAX_IMAGES, pad_id=PAD, seed=0,
                  batch_size=0)
