"""Tests of the VITW token loss (METHOD.md §1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax import loss


def _two_class_logits(probs):
  """[1, L, 2] logits whose class-0 probability is `probs[t]` (nll of target 0 = −log p)."""
  p = np.asarray(probs, np.float64)
  return jnp.asarray(np.stack([np.log(p), np.log1p(-p)], -1)[None], jnp.float32)


def _random_batch(seed, b=4, l=16, v=32, num_tasks=3, present=None):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(b, l, v)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, size=(b, l)), jnp.int32)
  mask = (rng.random((b, l)) < 0.6).astype(np.float32)
  tasks = rng.choice(present if present is not None else num_tasks, size=(b, l))
  task_ids = np.where(mask > 0, tasks, -1).astype(np.int32)
  return logits, targets, jnp.asarray(mask), jnp.asarray(task_ids)


def test_hand_computed_two_tasks():
  # Tokens: two of task 0 with p = 1/2 (nll ln 2 each), one of task 1 with p = 1/4
  # (nll 2 ln 2), and a padding token with NaN logits that must not leak anywhere.
  logits = _two_class_logits([0.5, 0.5, 0.25, 0.5]).at[0, 3].set(jnp.nan)
  targets = jnp.zeros((1, 4), jnp.int32)
  mask = jnp.array([[1, 1, 1, 0]], jnp.float32)
  task_ids = jnp.array([[0, 0, 1, -1]], jnp.int32)
  lam = jnp.array([2.0, 0.5], jnp.float32)
  weighted, weight, task_sum, task_count = loss.token_loss(logits, targets, mask, task_ids, lam)
  ln2 = math.log(2)
  # weighted = 2·ln2 + 2·ln2 + 0.5·2ln2 = 5 ln2;  weight = 2 + 2 + 0.5 = 4.5
  np.testing.assert_allclose(weighted, 5 * ln2, rtol=1e-6)
  np.testing.assert_allclose(weight, 4.5, rtol=0)
  # L_VITW = 5 ln2 / 4.5 = (10/9) ln2 ≈ 0.7702, whereas plain mean CE = 4 ln2 / 3 ≈ 0.9242.
  np.testing.assert_allclose(weighted / weight, 10 / 9 * ln2, rtol=1e-6)
  # Per task, unweighted: task 0 = ln2 + ln2, task 1 = 2 ln2; counts 2 and 1.
  np.testing.assert_allclose(task_sum, [2 * ln2, 2 * ln2], rtol=1e-6)
  np.testing.assert_array_equal(task_count, [2.0, 1.0])
  np.testing.assert_allclose(loss.per_task_mean(task_sum, task_count), [ln2, 2 * ln2], rtol=1e-6)


def test_minus_one_task_id_never_indexes_last_task():
  # A −1 task id with a (contract-violating) nonzero mask must get weight 0,
  # not wrap around to lam[-1].
  logits = _two_class_logits([0.5, 0.5])
  mask = jnp.ones((1, 2), jnp.float32)
  task_ids = jnp.array([[0, -1]], jnp.int32)
  _, weight, _, task_count = loss.token_loss(
      logits, jnp.zeros((1, 2), jnp.int32), mask, task_ids, jnp.array([1.0, 7.0]))
  assert float(weight) == 1.0
  np.testing.assert_array_equal(task_count, [1.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_jit", [False, True])
def test_lambda_one_is_mean_ce_bit_for_bit(dtype, use_jit):
  logits, targets, mask, task_ids = _random_batch(0)
  logits = logits.astype(dtype)

  def vitw(logits, targets, mask, task_ids):
    weighted, weight, _, _ = loss.token_loss(logits, targets, mask, task_ids, jnp.ones(3))
    return weighted / weight

  def mean_ce(logits, targets, mask):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(nll * mask) / jnp.sum(mask)

  if use_jit:
    vitw, mean_ce = jax.jit(vitw), jax.jit(mean_ce)
  got, want = vitw(logits, targets, mask, task_ids), mean_ce(logits, targets, mask)
  assert got.dtype == jnp.float32
  assert jnp.array_equal(got, want), (float(got), float(want))


def test_tla_equals_mean_of_per_task_means():
  # Task 2 of 3 is absent: it must get a finite λ and drop out of the mean.
  logits, targets, mask, task_ids = _random_batch(1, present=[0, 1])
  lam = loss.tla_lambda(task_ids, mask, 3)
  assert np.all(np.isfinite(lam)) and float(lam[2]) == 0.0
  weighted, weight, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam)
  # By hand, in float64: the mean over present tasks of each task's mean token loss.
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets), np.float64)
  ids, m = np.asarray(task_ids), np.asarray(mask)
  means = [nll[(ids == k) & (m > 0)].mean() for k in (0, 1)]
  np.testing.assert_allclose(weighted / weight, np.mean(means), rtol=1e-5)
  # λ_k is exactly 1 / count_k.
  np.testing.assert_allclose(lam[:2], [1 / np.sum((ids == k) & (m > 0)) for k in (0, 1)], rtol=1e-7)


def test_per_task_mean_is_nan_free():
  out = loss.per_task_mean(jnp.array([3.0, 0.0, 5.0]), jnp.array([2.0, 0.0, 0.0]))
  np.testing.assert_array_equal(out, [1.5, 0.0, 0.0])


def test_per_task_nan_stays_in_its_task():
  # Task 1's tokens have NaN logits: its sum is NaN, task 0's stays finite (divergence reports).
  logits = _two_class_logits([0.5, 0.5, 0.5]).at[0, 2].set(jnp.nan)
  _, _, task_sum, _ = loss.token_loss(
      logits, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)), jnp.array([[0, 0, 1]]),
      jnp.ones(2))
  assert np.isfinite(task_sum[0]) and np.isnan(task_sum[1])


def test_sums_add_over_row_splits():
  # The contract that makes global normalisation possible: the sums of two halves of a
  # batch add up to the sums of the whole batch.
  logits, targets, mask, task_ids = _random_batch(2)
  lam = jnp.array([2.0, 0.5, 1.0])
  whole = loss.token_loss(logits, targets, mask, task_ids, lam)
  halves = [loss.token_loss(logits[s], targets[s], mask[s], task_ids[s], lam)
            for s in (slice(0, 2), slice(2, 4))]
  for w, a, b in zip(whole, *halves):
    np.testing.assert_allclose(w, a + b, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 3))
def test_vitw_invariant_to_lambda_scale(scale, seed):
  logits, targets, mask, task_ids = _random_batch(seed)
  lam = jnp.array([2.0, 0.5, 1.0])
  w1, s1, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam)
  w2, s2, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam * scale)
  np.testing.assert_allclose(w1 / s1, w2 / s2, rtol=1e-5)
