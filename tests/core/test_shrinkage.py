"""Tests of evidence shrinkage (docs/method.md §14) and of the automatic T's bound warning.

`balancing.shrink_toward_mean` and `spread`, `bootstrap_report(..., shrinkage="evidence")`, and
`TemperatureAtBoundWarning`.
"""

from __future__ import annotations

import collections
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import balancing as B
from visatb_jax.core import bootstrap as BS

from score_tables import REAL, TASKS

# Two units alike up to ~0.001 in C and D: D = 1 − 0.5/0.700 = 0.2857 and 1 − 0.5/0.701 = 0.2867,
# C[a→b] = 0.05/0.201 = 0.249 and C[b→a] = 0.05/0.2 = 0.25.
ALIKE = {"mini": {"a": 0.50, "b": 0.50}, "a+mini": {"a": 0.70, "b": 0.55},
         "b+mini": {"a": 0.55, "b": 0.701}}
# Two units apart by D = 0.286 vs 0.375 and C[a→b] = 0.17 vs C[b→a] = 0.25: "auto" puts a on the
# lower bound; with per-sample noise 1.0 on 50 samples these differences are within noise.
APART = ALIKE | {"b+mini": {"a": 0.55, "b": 0.80}}


def per_sample(table: dict, seed: int = 0, noise: float = 0.1, n: int = 40) -> dict:
  """Per-sample scores whose means are exactly the table's (a per-sample effect shared by every
  model plus a smaller noise of each model, centred)."""
  rng = np.random.default_rng(seed)
  tasks = dict.fromkeys(t for row in table.values() for t in row)
  common = {t: rng.normal(0.0, noise, n) for t in tasks}
  out = {}
  for model, row in table.items():
    out[model] = {}
    for task, value in row.items():
      e = common[task] + rng.normal(0.0, noise / 3, n)
      out[model][task] = list(value + e - e.mean())
  return out


def _quiet(fn, *args, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", B.TemperatureAtBoundWarning)
    return fn(*args, **kw)


# ----------------------------------------------------------------------------------------------
# shrink_toward_mean: examples and properties.


def test_shrink_examples():
  x = jnp.array([0.0, 1.0, 2.0])  # mean 1, deviations −1, 0, 1
  np.testing.assert_allclose(B.shrink_toward_mean(x, jnp.array([0.5, 0.5, 0.5])),
                             [1 - 0.75, 1.0, 1 + 0.75])          # z = ±2: factor 3/4
  np.testing.assert_allclose(B.shrink_toward_mean(x, 1.0), [1.0, 1.0, 1.0])  # |z| = 1: the mean
  np.testing.assert_array_equal(B.shrink_toward_mean(x, 0.0), x)  # sd = 0: no shrinkage
  np.testing.assert_allclose(B.shrinkage_factor(x, jnp.array([0.5, 0.5, 2.0])), [0.75, 0.0, 0.0])
  # Leading batch axes: each row about its own mean.
  batch = B.shrink_toward_mean(jnp.stack([x, 2 * x]), jnp.array([0.5, 0.5, 0.5]))
  np.testing.assert_allclose(batch[1], [2 - 2 * (1 - 1 / 16), 2.0, 2 + 2 * (1 - 1 / 16)],
                             rtol=1e-6)
  np.testing.assert_allclose(B.shrink_toward_mean(x, jnp.array([jnp.inf, 0.0, 0.0])),
                             [1.5, 1.0, 2.0])   # sd = inf: the mean of the others, kept (sd 0)
  with pytest.raises(ValueError, match=r"sd must be >= 0 \(or inf\)"):
    B.shrink_toward_mean(x, jnp.array([0.1, -0.1, 0.1]))
  with pytest.raises(ValueError, match=r"does not broadcast"):
    B.shrink_toward_mean(x, jnp.array([0.1, 0.1]))


# No subnormals: XLA:CPU flushes them to zero, so a float32 7e-45 comes back as 0 from any jnp
# op (x itself included), which says nothing about the rule.
_values = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def shrink_cases(draw) -> tuple[np.ndarray, np.ndarray]:
  n = draw(st.integers(1, 6))
  x = np.array([draw(_values) for _ in range(n)], dtype=np.float32)
  sd = np.array([draw(st.one_of(st.just(0.0), st.floats(0, 5, allow_subnormal=False, width=32)))
                 for _ in range(n)], dtype=np.float32)
  return x, sd


@settings(max_examples=60, deadline=None)
@given(shrink_cases())
def test_prop_shrinks_toward_the_mean(case):
  x, sd = case
  shrunk = np.asarray(B.shrink_toward_mean(x, sd), dtype=np.float64)
  factor = np.asarray(B.shrinkage_factor(x, sd), dtype=np.float64)
  mean = np.float64(np.asarray(jnp.mean(jnp.asarray(x))))
  dev, new = x.astype(np.float64) - mean, shrunk - mean
  tol = 1e-5 * (1 + np.abs(x).max())
  assert np.all((factor >= 0) & (factor <= 1))
  assert np.all(np.abs(new) <= np.abs(dev) + tol)              # never further from the mean
  assert np.all((np.sign(new) == np.sign(dev)) | (np.abs(new) <= tol))  # same side, or on it
  np.testing.assert_array_equal(shrunk[sd == 0], x[sd == 0])    # sd = 0: x itself
  within = (sd > 0) & (np.abs(dev) <= sd)                        # |z| <= 1: the mean itself
  np.testing.assert_allclose(shrunk[within], mean, atol=1e-6 * (1 + abs(mean)))
  # z → ∞ (sd tiny next to the deviation): x.
  far = B.shrink_toward_mean(x, 1e-4 * np.maximum(np.abs(dev), 1e-3).astype(np.float32))
  np.testing.assert_allclose(far, x, atol=1e-5 * (1 + np.abs(x).max()))


_shrink_jit = jax.jit(B.shrink_toward_mean)


@settings(max_examples=30, deadline=None)
@given(shrink_cases(), st.integers(0, 2 ** 16))
def test_prop_jit_and_grad(case, seed):
  x, sd = case
  np.testing.assert_allclose(_shrink_jit(x, sd), B.shrink_toward_mean(x, sd), rtol=1e-6,
                             atol=1e-6)
  w = jnp.asarray(np.random.default_rng(seed).normal(size=x.shape), dtype=jnp.float32)
  gx, gsd = jax.grad(lambda a, s: jnp.sum(w * B.shrink_toward_mean(a, s)), argnums=(0, 1))(
      jnp.asarray(x), jnp.asarray(sd))
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gsd))


def test_grad_at_the_special_points():
  # dev = 0 (x at its mean), sd = 0 and |z| = 1 exactly: gradients finite, no NaN.
  for x, sd in (([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]), ([0.0, 1.0, 2.0], [0.0, 0.0, 0.0]),
                ([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]), ([0.0, 1.0, 2.0], [0.5, 0.0, 2.0])):
    g = jax.grad(lambda a: jnp.sum(jnp.arange(3.0) * B.shrink_toward_mean(a, jnp.asarray(sd))))(
        jnp.asarray(x))
    assert np.all(np.isfinite(g)), (x, sd, g)
  # Where the factor is 1 (sd = 0), x̃ = x: the identity's gradient.
  g = jax.grad(lambda a: B.shrink_toward_mean(a, 0.0)[1])(jnp.array([0.0, 1.0, 3.0]))
  np.testing.assert_allclose(g, [0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------------
# spread in balancing.


def _spread(value: float) -> dict:
  return {k: {u: value for u in TASKS} for k in B.SPREAD_COMPONENTS}


def test_spread_none_and_zero_are_the_paper():
  plain = B.balance_report(REAL, tasks=TASKS)
  assert "shrinkage" not in plain and "d_shrunk" not in plain
  zero = B.balance_report(REAL, tasks=TASKS, spread=_spread(0.0))
  assert zero["lambda"] == plain["lambda"]  # sd = 0: nothing is shrunk, bit for bit
  assert zero["d_shrunk"] == zero["d"] == plain["d"]
  assert all(f == 1.0 for comp in zero["shrinkage"].values() for f in comp.values())


def test_spread_large_gives_ones_and_is_reported():
  r = B.balance_report(REAL, tasks=TASKS, spread=_spread(10.0))
  assert r["lambda"] == pytest.approx({t: 1.0 for t in TASKS}, abs=1e-6)
  assert r["c_out"] == B.balance_report(REAL, tasks=TASKS)["c_out"]  # the plain values stay
  for k in B.SPREAD_COMPONENTS:
    mean = np.mean(list(r[k].values()))
    assert r[f"{k}_shrunk"] == pytest.approx({u: mean for u in TASKS}, abs=1e-6)
    assert r["shrinkage"][k] == {u: 0.0 for u in TASKS}
  json.dumps(r, allow_nan=False)


def test_spread_partial_shrinkage_by_hand():
  r = B.balance_report(REAL, tasks=TASKS)
  d = np.array([r["d"][u] for u in TASKS])
  sd = {"c_out": [0.0] * 3, "c_in": [0.0] * 3, "d": [0.05, 0.05, 0.05]}
  s = B.balance_report(REAL, tasks=TASKS, spread=sd)
  dev = d - d.mean()
  expected = d.mean() + dev * np.maximum(0, 1 - 0.05 ** 2 / dev ** 2)
  np.testing.assert_allclose([s["d_shrunk"][u] for u in TASKS], expected, rtol=1e-5)
  lam = B.compute_lambda(REAL, tasks=TASKS, spread=sd)
  l_out, l_in, l_d = B.lambda_components(
      np.array([r["c_out"][u] for u in TASKS]), np.array([r["c_in"][u] for u in TASKS]),
      expected, temperature=0.5)
  np.testing.assert_allclose([lam[u] for u in TASKS],
                             0.25 * l_out + 0.25 * l_in + 0.5 * l_d, rtol=1e-5)


def test_spread_jit_and_grad():
  sd = {"c_out": [0.05] * 3, "c_in": [0.02] * 3, "d": [0.05] * 3}
  eager = B.compute_lambda(REAL, tasks=TASKS, spread=sd)
  jitted = jax.jit(lambda s: B.compute_lambda(s, tasks=TASKS, spread=sd))(REAL)
  assert {t: float(v) for t, v in jitted.items()} == pytest.approx(eager, rel=1e-5)
  grad = jax.grad(lambda s: B.compute_lambda(s, tasks=TASKS, spread=sd)["a"])(REAL)
  assert all(np.isfinite(float(v)) for row in grad.values() for v in row.values())
  # The sds may be traced too.
  g_sd = jax.grad(lambda v: B.compute_lambda(REAL, tasks=TASKS,
                                             spread={"c_out": v, "c_in": v, "d": v})["c"])(
      jnp.array([0.05, 0.05, 0.05]))
  assert np.all(np.isfinite(g_sd))


@pytest.mark.parametrize("spread, match", [
    ([0.1, 0.1, 0.1], r"spread must map each of \['c_out', 'c_in', 'd'\]"),
    ({"c_out": [0.1] * 3, "c_in": [0.1] * 3}, r"exactly the keys \['c_out', 'c_in', 'd'\]"),
    ({**_spread(0.1), "d": {"a": 0.1, "b": 0.1}}, r"spread\['d'\] must name exactly the balanced "
                                                  r"tasks \['a', 'b', 'c'\]; missing \['c'\]"),
    ({**_spread(0.1), "d": {"a": 0.1, "b": 0.1, "c": 0.1, "x": 0}}, r"unknown \['x'\]"),
    ({**_spread(0.1), "c_in": [0.1, 0.1]}, r"spread\['c_in'\] must hold one sd per balanced task"),
    ({**_spread(0.1), "c_in": [0.1, -1, float("nan")]},
     r"spread\['c_in'\] must be >= 0 \(or inf\), got b=-1.0, c=nan"),
    ({**_spread(0.1), "c_in": ["x", 1, 2]}, r"spread\['c_in'\] must hold 3 numbers"),
])
def test_bad_spread(spread, match):
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(REAL, tasks=TASKS, spread=spread)


# ----------------------------------------------------------------------------------------------
# bootstrap_report(..., shrinkage="evidence").


@pytest.mark.parametrize("temperature", [0.5, 1.0, "auto"])
@pytest.mark.parametrize("table, noise", [(ALIKE, 0.3), (APART, 1.0)], ids=["alike", "apart"])
def test_differences_within_noise_give_lambda_near_one(table, noise, temperature):
  # The two units' C and D differ by less than their bootstrap sd (|z| < 1): every component is
  # pulled to its mean and λ = 1. For APART the paper's λ with "auto" is 0.5 / 1.5.
  samples = per_sample(table, noise=noise, n=50)
  kw = dict(tasks=["a", "b"], resamples=300, temperature=temperature, on_degenerate="warn")
  report = _quiet(BS.bootstrap_report, samples, shrinkage="evidence", **kw)
  for u in ("a", "b"):
    assert 0.9 <= report["lambda"][u] <= 1.1, report["lambda"]
  shrink = report["shrinkage"]
  assert shrink["rule"] == "evidence" and report["bootstrap"]["shrinkage"] == "evidence"
  for k in B.SPREAD_COMPONENTS:
    assert all(abs(z) < 1 for z in shrink["z"][k].values())
    assert shrink["factor"][k] == {"a": 0.0, "b": 0.0}
    assert all(s > 0 for s in shrink["sd"][k].values())
  assert report["at_bound"] == []
  if table is APART and temperature == "auto":
    paper = _quiet(BS.bootstrap_report, samples, **kw)
    assert paper["at_bound"] == ["a"] and paper["lambda"]["a"] == pytest.approx(0.5, abs=1e-4)
  json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_clear_differences_keep_the_papers_lambda(temperature):
  # The hand example's differences with little noise: every |z| is large and λ stays within 5 %
  # of the paper's at the same T.
  samples = per_sample(REAL, noise=0.01, n=400)
  shrunk = BS.bootstrap_report(samples, tasks=TASKS, resamples=300, temperature=temperature,
                               shrinkage="evidence")
  paper = BS.bootstrap_report(samples, tasks=TASKS, resamples=300, temperature=temperature)
  assert shrunk["lambda"] == pytest.approx(paper["lambda"], rel=0.05)
  for k in B.SPREAD_COMPONENTS:
    assert min(abs(z) for z in shrunk["shrinkage"]["z"][k].values()) > 5
  # The paper's λ is in the report unchanged apart from "shrinkage" and the shrunk inputs.
  assert shrunk["c_out"] == paper["c_out"] and shrunk["d"] == paper["d"]


def test_evidence_point_and_resamples_use_the_same_sd():
  samples = per_sample(REAL, seed=3, noise=0.15)
  kw = dict(tasks=TASKS, resamples=60, seed=4)
  draws = BS.bootstrap_draws(samples, shrinkage="evidence", **kw)
  plain = BS.bootstrap_draws(samples, **kw)
  # The sd of each unit's deviation from the mean over units, across the resamples.
  for k in B.SPREAD_COMPONENTS:
    dev = plain[k] - plain[k].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(draws["spread"][k], dev.std(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(draws[k], plain[k])  # the components themselves are plain
  report = BS.bootstrap_report(samples, shrinkage="evidence", **kw)
  spread = {k: dict(zip(TASKS, v.tolist())) for k, v in draws["spread"].items()}
  means = {m: {t: float(np.mean(v)) for t, v in row.items()} for m, row in samples.items()}
  point = B.balance_report(means, tasks=TASKS, spread=spread)
  assert report["lambda"] == point["lambda"] and report["d_shrunk"] == point["d_shrunk"]
  assert report["shrinkage"]["factor"] == point["shrinkage"]
  assert report["shrinkage"]["sd"] == spread
  # Each resample's λ is compute_lambda on that resample's means with the same spread.
  idx = BS.resample_indices(draws["samples"], resamples=60, seed=4)
  loop = collections.defaultdict(list)
  for r in range(0, 60, 7):
    m = {mod: {t: float(np.mean(np.asarray(v)[idx[t][r]])) for t, v in row.items()}
         for mod, row in samples.items()}
    rep = B.balance_report(m, tasks=TASKS, spread=spread, on_degenerate="warn")
    loop["lambda"].append([rep["lambda"][u] for u in TASKS])
    loop["d_shrunk"].append([rep["d_shrunk"][u] for u in TASKS])
  np.testing.assert_allclose(draws["lambda"][::7], loop["lambda"], rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(draws["d_shrunk"][::7], loop["d_shrunk"], rtol=1e-5, atol=2e-6)
  # The intervals are those of the shrunk estimator.
  lo, hi = np.percentile(draws["lambda"], [5, 95], axis=0)
  np.testing.assert_allclose([report["intervals"]["lambda"][u] for u in TASKS],
                             np.stack([lo, hi], axis=1), rtol=1e-12)
  assert set(report["intervals"]) >= {"c_out_shrunk", "c_in_shrunk", "d_shrunk"}


def test_evidence_auto_temperature_per_resample_on_shrunk_inputs():
  samples = per_sample(REAL, seed=1, noise=0.2)
  draws = _quiet(BS.bootstrap_draws, samples, tasks=TASKS, resamples=20, temperature="auto",
                 shrinkage="evidence")
  t, _ = B.auto_temperature_batch(draws["c_out_shrunk"], draws["c_in_shrunk"], draws["d_shrunk"])
  np.testing.assert_allclose(draws["temperature"], t)


def test_evidence_needs_two_resamples():
  with pytest.raises(ValueError, match=r"shrinkage='evidence' needs resamples >= 2"):
    BS.bootstrap_report(per_sample(REAL), tasks=TASKS, resamples=1, shrinkage="evidence")


def test_evidence_point_errors_come_first():
  table = REAL | {"b+mini": {"a": 0.60, "b": 0.35, "c": 0.25}}
  with pytest.raises(ValueError, match=r"task 'b' did not improve with its own data"):
    BS.bootstrap_report(per_sample(table), tasks=TASKS, resamples=10, shrinkage="evidence")


# ----------------------------------------------------------------------------------------------
# The automatic T's bound warning.


def test_auto_temperature_bound_warning_two_units():
  scores = APART
  with pytest.warns(B.TemperatureAtBoundWarning,
                    match=r"temperature='auto' chose T=\S+, which puts the weight of task 'a' "
                    r"\(0\.5\) on a bound of \[0\.5, 2\].*fixed temperature.*"
                    r"shrinkage='evidence'"):
    r = B.balance_report(scores, tasks=["a", "b"], temperature="auto")
  assert r["at_bound"] == ["a"] and r["lambda"]["a"] == pytest.approx(0.5, abs=1e-5)
  assert len(r["warnings"]) == 1 and f"T={r['temperature']:.4g}" in r["warnings"][0]
  with pytest.warns(B.TemperatureAtBoundWarning):
    B.compute_lambda(scores, tasks=["a", "b"], temperature="auto")
  # A fixed T: nothing to warn, even if a weight happens to be near a bound.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fixed = B.balance_report(scores, tasks=["a", "b"], temperature=r["temperature"])
  assert fixed["at_bound"] == [] and fixed["warnings"] == []
  # The bootstrap report carries the point report's.
  with pytest.warns(B.TemperatureAtBoundWarning):
    boot = BS.bootstrap_report(per_sample(scores, noise=0.02), tasks=["a", "b"], resamples=20,
                               temperature="auto")
  assert boot["at_bound"] == ["a"] and len(boot["warnings"]) == 1


def test_auto_temperature_bound_warning_names_groups():
  scores = {"mini": {"a1": 0.4, "a2": 0.6, "b": 0.4}, "A+mini": {"a1": 0.6, "a2": 0.8, "b": 0.45},
            "B+mini": {"a1": 0.45, "a2": 0.65, "b": 0.9}}
  with pytest.warns(B.TemperatureAtBoundWarning, match=r"weight of group 'A'"):
    r = B.balance_report(scores, tasks=["a1", "a2", "b"], groups={"a1": "A", "a2": "A", "b": "B"},
                         temperature="auto")
  assert r["at_bound"] == ["A"]


def test_no_bound_warning_at_the_bottom_of_the_range():
  # Nearly identical units: every weight is ~1 at the lowest T, which is inside the bounds.
  scores = {"mini": {"a": 0.5, "b": 0.5}, "a+mini": {"a": 0.7, "b": 0.55},
            "b+mini": {"a": 0.55, "b": 0.7001}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    r = B.balance_report(scores, tasks=["a", "b"], temperature="auto")
  assert r["temperature"] == B.AUTO_T_RANGE[0] and r["at_bound"] == []
  assert B.bound_units([0.5, 1.5004, 1.999], ["a", "b", "c"]) == ["a", "c"]


# ----------------------------------------------------------------------------------------------
# A unit whose own-data gain is not clearly positive carries no evidence in C_in and D.

# c's preparation run did not learn c: V_c(c+mini) = V_c(mini) up to noise, so D_c ≈ 0 (read as
# "easy" by the formula) and c's column of C divides by a gain of ~0.
UNLEARNED = {
    "mini":   {"a": 0.50, "b": 0.40, "c": 0.30},
    "a+mini": {"a": 0.70, "b": 0.45, "c": 0.30},
    "b+mini": {"a": 0.60, "b": 0.60, "c": 0.30},
    "c+mini": {"a": 0.50, "b": 0.40, "c": 0.30},
}


def test_shrink_infinite_sd_is_the_mean_of_the_units_with_evidence():
  x = jnp.array([0.0, 1.0, 5.0])
  np.testing.assert_allclose(B.shrink_toward_mean(x, jnp.array([0.0, 0.0, jnp.inf])),
                             [0.0, 1.0, 0.5])   # c at the mean of a and b, which are kept
  np.testing.assert_allclose(B.shrinkage_factor(x, jnp.array([0.0, 0.0, jnp.inf])), [1, 1, 0])
  # Every sd infinite: the plain mean.
  np.testing.assert_allclose(B.shrink_toward_mean(x, jnp.inf), [2.0, 2.0, 2.0])


def test_unlearned_unit_gets_the_others_mean_c_in_and_d():
  samples = per_sample(UNLEARNED, seed=1, noise=0.05, n=200)
  kw = dict(tasks=TASKS, resamples=200, on_degenerate="warn")
  report = _quiet(BS.bootstrap_report, samples, shrinkage="evidence", **kw)
  assert report["noisy"] == ["c"] and report["shrinkage"]["no_evidence"] == ["c"]
  shrink = report["shrinkage"]
  for k in ("c_in", "d"):
    assert shrink["factor"][k]["c"] == 0.0
    assert shrink["sd"][k]["c"] is None and shrink["z"][k]["c"] is None
    assert report[f"{k}_shrunk"]["c"] == pytest.approx(np.mean([report[k]["a"], report[k]["b"]]))
  assert shrink["sd"]["c_out"]["c"] is not None  # C_out is measured on the other tasks
  # The paper's λ reads c as the easiest task and gives it the lowest λ_D; the rule does not.
  paper = _quiet(BS.bootstrap_report, samples, **kw)
  assert paper["lambda_d"]["c"] < min(paper["lambda_d"]["a"], paper["lambda_d"]["b"])
  assert report["lambda_d"]["c"] > min(report["lambda_d"]["a"], report["lambda_d"]["b"])
  json.dumps(report, allow_nan=False)
