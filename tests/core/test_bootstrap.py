"""Tests of visatb_jax.core.bootstrap: the vectorised paired bootstrap against a plain loop."""

from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import balancing as B
from visatb_jax.core import bootstrap as BS

from score_tables import REAL, TASKS, UNIT_KEYS, append_resample

REPORT_KEYS = {"tasks", "balanced", "form", "temperature", "alpha", "C", "c_out", "c_in", "d",
               "lambda_out", "lambda_in", "lambda_d", "lambda", "fixed", "groups", "warnings",
               "at_bound"}

PRECISE = REAL | {"a": {"a": 0.80}, "mini_a": {"a": 0.60}, "b": {"b": 0.50},
                  "mini_b": {"b": 0.40}, "c": {"c": 0.40}, "mini_c": {"c": 0.10}}
BASE = {
    "base": {"a": 0.2, "b": 0.1, "c": 0.3},
    "a":    {"a": 0.6, "b": 0.2, "c": 0.3},
    "b":    {"a": 0.3, "b": 0.5, "c": 0.2},
    "c":    {"a": 0.2, "b": 0.3, "c": 0.5},
    "mini_a": {"a": 0.30}, "mini_b": {"b": 0.40}, "mini_c": {"c": 0.25},
}
GROUPED = {
    "mini":   {"a1": 0.4, "a2": 0.6, "b": 0.40, "c": 0.20, "chat": 0.3},
    "A+mini": {"a1": 0.6, "a2": 0.8, "b": 0.45, "c": 0.10, "chat": 0.3},
    "B+mini": {"a1": 0.5, "a2": 0.7, "b": 0.60, "c": 0.25, "chat": 0.3},
    "C+mini": {"a1": 0.3, "a2": 0.5, "b": 0.40, "c": 0.60, "chat": 0.3},
}
GROUPS = {"a1": "A", "b": "B", "a2": "A", "c": "C"}
# Base form with groups AB = {a, b} and C = {c}.
BASE_GROUPED = {
    "base": {"a": 0.2, "b": 0.1, "c": 0.3},
    "AB":   {"a": 0.6, "b": 0.5, "c": 0.25},
    "C":    {"a": 0.25, "b": 0.2, "c": 0.5},
    "mini_AB": {"a": 0.3, "b": 0.4}, "mini_C": {"c": 0.25},
}
# Different sample counts per task; "chat" (fixed, ignored by balancing) has its own.
N_SAMPLES = {"a": 30, "b": 24, "c": 40, "a1": 20, "a2": 26, "chat": 7}


def per_sample(table: dict, seed: int = 0, noise: float = 0.1, n: int | None = None) -> dict:
  """Per-sample scores whose means are the scores of `table` (to rounding).

  Each sample has a difficulty shared by every model (what the pairing is about) plus a smaller
  noise of its own per model; each list is centred so that its mean is the table's score.
  """
  rng = np.random.default_rng(seed)
  tasks = dict.fromkeys(t for row in table.values() for t in row)
  common = {t: rng.normal(0.0, noise, n or N_SAMPLES.get(t, 20)) for t in tasks}
  out = {}
  for model, row in table.items():
    out[model] = {}
    for task, value in row.items():
      e = common[task] + rng.normal(0.0, noise / 3, common[task].size)
      out[model][task] = list(value + e - e.mean())
  return out


def _means(samples: dict) -> dict:
  return {m: {t: float(np.mean(v)) for t, v in row.items()} for m, row in samples.items()}


def _members(kw: dict, units: list[str]) -> dict[str, list[str]]:
  groups = kw.get("groups")
  if groups is None:
    return {u: [u] for u in units}
  return {u: [t for t in kw["tasks"] if groups.get(t) == u] for u in units}


def loop_reference(samples: dict, resamples: int, seed: int, **kw) -> tuple[dict, dict]:
  """(bootstrap_draws, the same quantities from balance_report on one resample at a time).

  The loop uses the same indices (`resample_indices`) and balance_report's on_degenerate="warn".
  """
  draws = BS.bootstrap_draws(samples, resamples=resamples, seed=seed, **kw)
  idx = BS.resample_indices(draws["samples"], resamples=resamples, seed=seed)
  units = draws["units"]
  members = _members(kw, units)
  form = kw.get("form", "real")
  own = (lambda u: u) if form == "base" else (lambda u: f"{u}+mini")
  ref = "base" if form == "base" else "mini"
  out = collections.defaultdict(list)
  for r in range(resamples):
    means = {m: {t: float(np.mean(np.asarray(v)[idx[t][r]])) for t, v in row.items() if t in idx}
             for m, row in samples.items()}
    append_resample(out, means, units, [members[u][0] for u in units], **kw)
    out["gain"].append([np.mean([means[own(u)][t] for t in members[u]])
                        - np.mean([means[ref][t] for t in members[u]]) for u in units])
  return draws, {k: np.asarray(v) for k, v in out.items()}


CASES = {
    "real": (REAL, dict(tasks=TASKS)),
    "precise": (PRECISE, dict(tasks=TASKS, form="precise", temperature=1.0)),
    "base": (BASE, dict(tasks=TASKS, form="base", alpha=(0.5, 0.25, 0.25))),
    "groups_fixed": (GROUPED, dict(tasks=["a1", "b", "a2", "c", "chat"], groups=GROUPS,
                                   fixed={"chat": 1.5})),
    "fixed": (REAL, dict(tasks=TASKS + ["chat"], fixed={"chat": 0.7})),
    "auto": (REAL, dict(tasks=TASKS, temperature="auto")),
    "auto_base_groups": (BASE_GROUPED, dict(tasks=TASKS, form="base", temperature="auto",
                                    groups={"a": "AB", "b": "AB", "c": "C"})),
    "drop": (REAL, dict(tasks=TASKS, drop=["b"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vectorised_matches_loop(case):
  table, kw = CASES[case]
  samples = per_sample(table, seed=len(case))
  draws, loop = loop_reference(samples, resamples=16, seed=3, **kw)
  # float64 numpy (vectorised) against balance_report in float32; an automatic T is found by a
  # bisection to 1e-6 relative from the float32 or float64 components.
  tol = dict(rtol=1e-4, atol=1e-5) if kw.get("temperature") == "auto" else dict(rtol=1e-5,
                                                                                 atol=2e-6)
  for key in ("C", "temperature") + UNIT_KEYS:
    np.testing.assert_allclose(draws[key], loop[key], err_msg=key, **tol)
  assert draws["temperature_feasible"].all() and not draws["degenerate"].any()
  # The report's intervals are the percentiles of those values.
  report = BS.bootstrap_report(samples, resamples=16, seed=3, **kw)
  lo, hi = np.percentile(loop["lambda"], [5, 95], axis=0)
  got = np.array([report["intervals"]["lambda"][_members(kw, draws["units"])[u][0]]
                  for u in draws["units"]])
  np.testing.assert_allclose(got, np.stack([lo, hi], axis=1), **tol)


def test_degenerate_resamples_are_masked_like_warn():
  # b barely improves with its own data (0.402 vs 0.40, noise ~0.01 on the mean difference):
  # many resamples have a gain <= 0 and are masked, as balance_report(on_degenerate="warn").
  table = REAL | {"b+mini": {"a": 0.60, "b": 0.402, "c": 0.25}}
  samples = per_sample(table, seed=1)
  for temperature in (0.5, "auto"):
    draws, loop = loop_reference(samples, resamples=16, seed=0, tasks=TASKS,
                                 temperature=temperature)
    assert draws["degenerate"].any() and not draws["degenerate"].all()
    tol = dict(rtol=1e-4, atol=1e-5)
    for key in ("C", "temperature") + UNIT_KEYS:
      np.testing.assert_allclose(draws[key], loop[key], err_msg=key, **tol)
  report = BS.bootstrap_report(samples, tasks=TASKS, resamples=200, on_degenerate="warn")
  assert report["noisy"] == ["b"]
  lo, hi = report["intervals"]["gain"]["b"]
  assert lo < 0 < hi
  assert 0 < report["bootstrap"]["degenerate_resamples"] < 200
  json.dumps(report, allow_nan=False)  # nothing infinite or NaN anywhere


def test_point_values_are_balance_report_on_the_means():
  for case in ("real", "groups_fixed", "auto", "drop"):
    table, kw = CASES[case]
    samples = per_sample(table)
    report = BS.bootstrap_report(samples, resamples=10, **kw)
    assert {k: report[k] for k in REPORT_KEYS} == B.balance_report(_means(samples), **kw)
  # The per-sample means are the table's scores, so the point values are the table's report.
  report = BS.bootstrap_report(per_sample(REAL), tasks=TASKS, resamples=10)
  np.testing.assert_allclose(report["C"], B.balance_report(REAL, tasks=TASKS)["C"], atol=1e-6)
  assert report["gain"] == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.4}, abs=1e-12)


def test_report_layout_and_json():
  table, kw = CASES["groups_fixed"]
  report = BS.bootstrap_report(per_sample(table), resamples=50, seed=7, level=0.8, **kw)
  assert set(report) == REPORT_KEYS | {"gain", "intervals", "noisy", "variance", "bootstrap"}
  iv = report["intervals"]
  assert set(iv) == {"C", "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d", "gain",
                     "lambda", "temperature"}
  assert np.asarray(iv["C"]).shape == (3, 3, 2)
  for key in UNIT_KEYS[:-2] + ("gain",):
    assert list(iv[key]) == ["A", "B", "C"]
  assert list(iv["lambda"]) == kw["tasks"]
  assert iv["lambda"]["chat"] == [1.5, 1.5] and iv["lambda"]["a1"] == iv["lambda"]["a2"]
  assert iv["temperature"] == [0.5, 0.5]
  assert report["bootstrap"] == {
      "resamples": 50, "seed": 7, "level": 0.8,
      "samples": {"a1": 20, "b": 24, "a2": 26, "c": 40}, "replicates": 1, "shrinkage": "none",
      "drop": [],
      "degenerate_resamples": 0, "infeasible_temperature_resamples": 0}
  assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_paired_resampling():
  # V_a(c+mini) is scored on exactly the samples of V_a(mini), with the same scores: every paired
  # resample gives them the same mean, so C[c→a] is 0 in every resample. Resampling each model
  # on its own would spread it by ~noise/√n / gain ≈ 0.1.
  table = REAL | {"c+mini": {"a": 0.50, "b": 0.40, "c": 0.60}}
  samples = per_sample(table)
  samples["c+mini"]["a"] = list(samples["mini"]["a"])
  draws = BS.bootstrap_draws(samples, tasks=TASKS, resamples=200)
  np.testing.assert_allclose(draws["C"][:, 2, 0], 0.0, atol=1e-12)
  assert np.ptp(draws["C"][:, 1, 0]) > 0.05  # the others do vary
  # Precise-form models that copy the real-form ones (V_u(u) = V_u(u+mini) and
  # V_u(mini_u) = V_u(mini), sample by sample): D is the same in every resample in both forms.
  samples = per_sample(REAL)
  for u in TASKS:
    samples[u] = {u: list(samples[f"{u}+mini"][u])}
    samples[f"mini_{u}"] = {u: list(samples["mini"][u])}
  real = BS.bootstrap_draws(samples, tasks=TASKS, resamples=100, seed=5)
  precise = BS.bootstrap_draws(samples, tasks=TASKS, form="precise", resamples=100, seed=5)
  np.testing.assert_allclose(precise["d"], real["d"], rtol=1e-12)
  assert np.ptp(real["d"], axis=0).min() > 0.01


def test_intervals_contain_the_point_when_well_conditioned():
  for table, kw in (CASES["real"], CASES["precise"], CASES["groups_fixed"], CASES["auto"]):
    report = BS.bootstrap_report(per_sample(table, noise=0.02, n=300), resamples=300, **kw)
    iv = report["intervals"]
    for key in UNIT_KEYS:
      point = report[key]
      for name, (lo, hi) in iv[key].items():
        assert lo - 1e-6 <= point[name] <= hi + 1e-6, (key, name, lo, point[name], hi)
    for row, row_iv in zip(report["C"], iv["C"]):
      for v, (lo, hi) in zip(row, row_iv):
        assert lo - 1e-6 <= v <= hi + 1e-6
    lo, hi = iv["temperature"]
    assert lo - 1e-6 <= report["temperature"] <= hi + 1e-6
    assert report["noisy"] == []


def test_drop_applies_to_point_and_resamples():
  samples = per_sample(REAL)
  report = BS.bootstrap_report(samples, tasks=TASKS, resamples=50, drop=["b"])
  assert report["c_in"]["b"] == 0.0 and report["intervals"]["c_in"]["b"] == [0.0, 0.0]
  assert report["bootstrap"]["drop"] == ["b"]
  assert report["c_out"] == B.balance_report(_means(samples), tasks=TASKS, drop=["b"])["c_out"]
  with pytest.raises(ValueError, match=r"drop names \['x'\]"):
    BS.bootstrap_report(samples, tasks=TASKS, drop=["x"])


def test_resample_indices():
  idx = BS.resample_indices({"a": 5, "b": 3}, resamples=4, seed=1)
  assert list(idx) == ["a", "b"] and idx["a"].shape == (4, 5) and idx["b"].shape == (4, 3)
  assert idx["a"].min() >= 0 and idx["a"].max() < 5 and idx["b"].max() < 3
  again = BS.resample_indices({"a": 5, "b": 3}, resamples=4, seed=1)
  assert all((idx[t] == again[t]).all() for t in idx)
  other = BS.resample_indices({"a": 5, "b": 3}, resamples=4, seed=2)
  assert any((idx[t] != other[t]).any() for t in idx)
  # Seeds give different intervals, the same seed the same ones.
  samples = per_sample(REAL)
  r1 = BS.bootstrap_report(samples, tasks=TASKS, resamples=30, seed=1)
  assert r1 == BS.bootstrap_report(samples, tasks=TASKS, resamples=30, seed=1)
  assert r1["intervals"] != BS.bootstrap_report(samples, tasks=TASKS, resamples=30,
                                                seed=2)["intervals"]


def test_point_keeps_on_degenerate():
  table = REAL | {"b+mini": {"a": 0.60, "b": 0.35, "c": 0.25}}
  samples = per_sample(table)
  with pytest.raises(ValueError, match=r"task 'b' did not improve with its own data"):
    BS.bootstrap_report(samples, tasks=TASKS, resamples=10)
  with pytest.warns(B.DegenerateScoresWarning):
    report = BS.bootstrap_report(samples, tasks=TASKS, resamples=10, on_degenerate="warn")
  assert len(report["warnings"]) == 1


def _with(samples: dict, model: str, task: str, value) -> dict:
  out = {m: dict(row) for m, row in samples.items()}
  out[model][task] = value
  return out


_GOOD = per_sample(REAL)


@pytest.mark.parametrize("samples, match", [
    (_with(_GOOD, "b+mini", "a", _GOOD["b+mini"]["a"][:-1]),
     r"model 'b\+mini' has 29 samples on task 'a' but model 'mini' has 30"),
    (_with(_GOOD, "c+mini", "b", _GOOD["c+mini"]["b"][:3] + [float("nan")]
           + _GOOD["c+mini"]["b"][4:]),
     r"sample 3 of model 'c\+mini' on task 'b' is not finite: nan"),
    (_with(_GOOD, "mini", "c", [0.1, float("inf")] * 20),
     r"sample 1 of model 'mini' on task 'c' is not finite"),
    (_with(_GOOD, "a+mini", "c", []),
     r"per-sample scores of model 'a\+mini' on task 'c' are empty"),
    (_with(_GOOD, "a+mini", "c", [0.1, "x"]), r"sample 1 of model 'a\+mini' on task 'c' is not a "
                                              r"number: 'x'"),
    (_with(_GOOD, "a+mini", "c", [True, False]), r"sample 0 of model 'a\+mini' on task 'c' is "
                                                 r"not a number: True"),
    (_with(_GOOD, "a+mini", "c", 0.5), r"model 'a\+mini' on task 'c' must be a sequence"),
    (_with(_GOOD, "a+mini", "c", "0.5"), r"model 'a\+mini' on task 'c' must be a sequence"),
    (_with(_GOOD, "a+mini", "c", [[0.5, 0.2]]), r"model 'a\+mini' on task 'c' must be a flat"),
    ({**_GOOD, "mini": [0.5]}, r"model 'mini' must map task -> per-sample scores"),
    ([1, 2], r"per_sample must be a mapping"),
    ({m: r for m, r in _GOOD.items() if m != "c+mini"}, r"missing model 'c\+mini'"),
])
def test_bad_per_sample(samples, match):
  with pytest.raises(ValueError, match=match):
    BS.bootstrap_report(samples, tasks=TASKS, resamples=5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(resamples=0), r"resamples must be an integer >= 1"),
    (dict(resamples=2.5), r"resamples must be an integer >= 1"),
    (dict(seed=-1), r"seed must be an integer >= 0"),
    (dict(level=1.0), r"level must be a number in \(0, 1\)"),
    (dict(level=0), r"level must be a number in \(0, 1\)"),
    (dict(form="fancy"), r"unknown form"),
    (dict(temperature="hot"), r"temperature must be"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BS.bootstrap_report(_GOOD, tasks=TASKS, **kwargs)


def test_level_nests_intervals():
  samples = per_sample(REAL)
  wide = BS.bootstrap_report(samples, tasks=TASKS, resamples=200, level=0.95)["intervals"]
  narrow = BS.bootstrap_report(samples, tasks=TASKS, resamples=200, level=0.5)["intervals"]
  for task in TASKS:
    (wlo, whi), (nlo, nhi) = wide["lambda"][task], narrow["lambda"][task]
    assert wlo <= nlo <= nhi <= whi and wlo < whi


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis).


@st.composite
def real_tables(draw) -> tuple[dict, list[str]]:
  """Random "real"-form score tables where each task clearly improves with its own data."""
  n = draw(st.integers(2, 4))
  tasks = [f"t{k}" for k in range(n)]
  mini = [draw(st.floats(0.2, 0.6)) for _ in range(n)]
  gain = [draw(st.floats(0.1, 0.3)) for _ in range(n)]
  transfer = [[1.0 if i == j else draw(st.floats(-1, 1)) for j in range(n)] for i in range(n)]
  table = {"mini": dict(zip(tasks, mini))}
  for i, ti in enumerate(tasks):
    table[f"{ti}+mini"] = {tj: mini[j] + transfer[i][j] * gain[j] for j, tj in enumerate(tasks)}
  return table, tasks


@settings(max_examples=15, deadline=None)
@given(real_tables(), st.integers(0, 1000), st.sampled_from([0.5, "auto"]))
def test_prop_intervals_are_ordered_and_finite(case, seed, temperature):
  table, tasks = case
  report = BS.bootstrap_report(per_sample(table, seed=seed, noise=0.05), tasks=tasks,
                               resamples=40, seed=seed, temperature=temperature,
                               on_degenerate="warn")
  iv = report["intervals"]
  flat = np.asarray(iv["C"]).reshape(-1, 2).tolist() + [iv["temperature"]]
  for key in UNIT_KEYS:
    flat += list(iv[key].values())
  for lo, hi in flat:
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
  assert report["noisy"] == B.noisy_units(iv["gain"])


@settings(max_examples=10, deadline=None)
@given(real_tables(), st.sampled_from([0.5, "auto"]))
def test_prop_no_noise_collapses_onto_the_point(case, temperature):
  table, tasks = case
  samples = {m: {t: [v] * 5 for t, v in row.items()} for m, row in table.items()}
  report = BS.bootstrap_report(samples, tasks=tasks, resamples=20, temperature=temperature,
                               on_degenerate="warn")
  for key in UNIT_KEYS[:-1]:
    for name, (lo, hi) in report["intervals"][key].items():
      # Equal up to the rounding of the resampled means (counts @ scores).
      assert lo == pytest.approx(hi, rel=1e-12, abs=1e-12)
      assert lo == pytest.approx(report[key][name], rel=1e-4, abs=1e-5)
  lo, hi = report["intervals"]["temperature"]
  assert lo == pytest.approx(hi, rel=1e-9)
  assert lo == pytest.approx(report["temperature"], rel=1e-4)


def test_align_by_id_orders_samples_alike_and_names_a_disagreement():
  by_id = {"mini": {"a": {"s2": 0.0, "s1": 1.0}}, "a+mini": {"a": {"s1": 1.0, "s2": 1.0}}}
  assert BS.align_by_id(by_id) == {"mini": {"a": [1.0, 0.0]}, "a+mini": {"a": [1.0, 1.0]}}
  by_id["a+mini"]["a"] = {"s1": 1.0, "s3": 1.0}
  with pytest.raises(ValueError, match=r"models 'mini' and 'a\+mini' disagree on the sample ids "
                     r"of task 'a': 1 only in 'mini' \('s2'\); 1 only in 'a\+mini' \('s3'\)"):
    BS.align_by_id(by_id)
