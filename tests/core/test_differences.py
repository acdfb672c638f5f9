"""Paired-bootstrap intervals of the difference between two models on the same test samples."""

import numpy as np
import pytest

from visatb_jax.core import differences, metrics


def test_hand_computed_difference_and_identical_models():
  a, b = [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]
  out = differences.paired_difference(a, b, resamples=200, seed=3)
  assert out["difference"] == pytest.approx(0.5)
  assert out["n"] == 4
  lo, hi = out["interval"]
  assert 0.0 <= lo <= 0.5 <= hi <= 1.0  # every resampled mean of {1, 0, 0, 1} lies in [0, 1]
  same = differences.paired_difference(a, a, resamples=50)
  assert same["difference"] == 0.0 and same["interval"] == [0.0, 0.0]


def test_pairing_removes_the_shared_sample_difficulty():
  """A constant +0.05 on every sample is certain when paired, whatever the samples' spread."""
  rng = np.random.default_rng(0)
  a = rng.uniform(0.0, 1.0, size=300)
  out = differences.paired_difference(a, a + 0.05, resamples=300)
  assert out["interval"] == pytest.approx([0.05, 0.05])


def test_interval_covers_a_known_difference_at_about_its_level():
  """Coverage of the 90 % interval over many synthetic test sets: within [0.8, 0.97]."""
  rng = np.random.default_rng(1)
  hits = 0
  for k in range(200):
    a = rng.binomial(1, 0.5, size=200).astype(float)
    b = np.where(rng.random(200) < 0.2, 1.0 - a, a)  # flips a fifth of the answers
    # The true mean difference of this design is 0.2 · (P(a=0) − P(a=1)) = 0.
    lo, hi = differences.paired_difference(a, b, resamples=400, seed=k)["interval"]
    hits += lo <= 0.0 <= hi
  assert 0.8 <= hits / 200 <= 0.97


def test_aligned_orders_by_sample_id_and_refuses_different_samples():
  a, b = differences.aligned({"s2": 1.0, "s1": 0.0}, {"s1": 0.5, "s2": 0.25}, what="x")
  assert a.tolist() == [0.0, 1.0] and b.tolist() == [0.5, 0.25]
  with pytest.raises(ValueError, match="different samples"):
    differences.aligned({"s1": 1.0}, {"s2": 1.0}, what="stl vs ew on count")


def test_aligned_three_models_share_one_order_and_the_third_is_checked_too():
  a, b, c = differences.aligned({"s2": 1.0, "s1": 0.0}, {"s1": 0.5, "s2": 0.25},
                                {"s2": 3.0, "s1": 2.0}, what="x")
  assert (a.tolist(), b.tolist(), c.tolist()) == ([0.0, 1.0], [0.5, 0.25], [2.0, 3.0])
  with pytest.raises(ValueError, match="different samples"):
    differences.aligned({"s1": 1.0}, {"s1": 1.0}, {"s3": 1.0}, what="x")


def test_delta_from_improvements_is_delta_metrics_formula():
  rel = np.array([[0.1, -0.2, 0.05], [-0.5, 0.0, 0.3]])
  d_i, d_e = metrics.delta_from_improvements(rel, axis=-1)
  assert np.allclose(d_i, [100 * (0.1 - 0.2 + 0.05) / 3, 100 * (-0.5 + 0.3) / 3])
  assert np.allclose(d_e, [100 * 0.2 / 3, 100 * 0.5 / 3])


@pytest.mark.parametrize("a, b, match", [
    ([], [], "non-empty"),
    ([1.0], [1.0, 2.0], "one length"),
    ([float("nan")], [1.0], "finite"),
])
def test_bad_input_is_one_clear_error(a, b, match):
  with pytest.raises(ValueError, match=match):
    differences.paired_difference(a, b)


def test_delta_difference_matches_delta_metrics_and_is_paired():
  from visatb_jax.core import metrics
  rng = np.random.default_rng(0)
  stl = {"a": rng.uniform(0.2, 1, 50), "b": rng.uniform(0.2, 1, 40)}
  ew = {t: v + 0.1 for t, v in stl.items()}
  visatb = {"a": stl["a"] + 0.2, "b": stl["b"] - 0.05}
  scores = {"stl": stl, "ew": ew, "visatb": visatb}
  out = differences.paired_delta_difference(scores, "visatb", "ew", resamples=300)
  means = {m: {t: float(np.mean(v)) for t, v in row.items()} for m, row in scores.items()}
  want = {k: metrics.delta_metrics(means["stl"], means["visatb"])[k]
          - metrics.delta_metrics(means["stl"], means["ew"])[k] for k in ("delta_i", "delta_e")}
  for key in ("delta_i", "delta_e"):
    assert out[key]["difference"] == pytest.approx(want[key])
    lo, hi = out[key]["interval"]
    assert lo <= out[key]["difference"] <= hi
  # A method equal to the other: a zero-width interval at 0.
  same = differences.paired_delta_difference(scores, "ew", "ew", resamples=50)
  assert same["delta_i"] == {"difference": 0.0, "interval": [0.0, 0.0]}
  with pytest.raises(ValueError, match="sample counts"):
    differences.paired_delta_difference({**scores, "ew": {"a": ew["a"], "b": ew["b"][:5]}},
                                        "visatb", "ew")
