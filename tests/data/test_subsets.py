import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from visatb_jax.data import subsets


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), r_large=st.floats(0.05, 1.0), frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 10))
def test_mini_inside_large_and_sizes(n, r_large, frac, seed):
  r_mini = r_large * frac
  out = subsets.split_subsets({"a": n}, ["a"], r_large=r_large, r_mini=r_mini, seed=seed)["a"]
  assert set(out["mini"]) <= set(out["large"])
  assert len(out["large"]) == max(1, int(np.ceil(r_large * n)))
  assert len(out["mini"]) == max(1, int(np.ceil(r_mini * n)))
  assert len(set(out["large"])) == len(out["large"])


def test_deterministic_and_seed_dependent():
  a = subsets.split_subsets({"a": 100, "b": 100}, ["a", "b"], r_large=1.0, r_mini=0.1, seed=3)
  b = subsets.split_subsets({"a": 100, "b": 100}, ["a", "b"], r_large=1.0, r_mini=0.1, seed=3)
  c = subsets.split_subsets({"a": 100, "b": 100}, ["a", "b"], r_large=1.0, r_mini=0.1, seed=4)
  np.testing.assert_array_equal(a["a"]["mini"], b["a"]["mini"])
  assert not np.array_equal(a["a"]["mini"], c["a"]["mini"])
  # Tasks draw different samples even with the same seed.
  assert not np.array_equal(a["a"]["mini"], a["b"]["mini"])


def test_bad_rates_and_empty_task():
  with pytest.raises(ValueError, match="r_mini"):
    subsets.split_subsets({"a": 10}, ["a"], r_large=0.1, r_mini=0.5, seed=0)
  with pytest.raises(ValueError, match="rate"):
    subsets.split_subsets({"a": 10}, ["a"], r_large=1.5, r_mini=0.5, seed=0)
  with pytest.raises(ValueError, match="'b' has no training samples"):
    subsets.split_subsets({"a": 10}, ["a", "b"], r_large=1.0, r_mini=0.5, seed=0)


def test_size_warnings():
  s = subsets.split_subsets({"a": 50}, ["a"], r_large=1.0, r_mini=0.1, seed=0)
  with pytest.warns(UserWarning) as record:
    msgs = subsets.size_warnings(s)
  assert msgs == [str(w.message) for w in record]
  assert msgs == ["task 'a': mini subset has 5 samples (< 1000 recommended)",
                  "task 'a': large subset has 50 samples (< 10000 recommended)"]
