"""Tests of the preparation replicates in visatb_jax.core.bootstrap (docs/method.md §13).

The two-level bootstrap against a plain loop, R = 1 against the single-level bootstrap, the
variance shares against known variances, pairing of the replicates, and the per-sample files.
"""

from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import pytest

from visatb_jax.core import balancing as B
from visatb_jax.core import bootstrap as BS

from score_tables import REAL, TASKS, UNIT_KEYS, append_resample

N_SAMPLES = {"a": 30, "b": 24, "c": 40}


def replicated(table: dict, replicates: int, seed: int = 0, noise: float = 0.1,
               training: float = 0.03, n: dict | None = None) -> dict:
  """[R, n] per-sample scores: the table's score + a replicate offset of the model (training
  noise, sd `training`) + a per-sample effect shared by every model (what the pairing of samples
  is about) + a smaller noise of each (replicate, model, sample)."""
  rng = np.random.default_rng(seed)
  n = n or N_SAMPLES
  tasks = dict.fromkeys(t for row in table.values() for t in row)
  common = {t: rng.normal(0.0, noise, n[t]) for t in tasks}
  out = {}
  for model, row in table.items():
    offset = rng.normal(0.0, training, replicates)
    out[model] = {}
    for task, value in row.items():
      e = rng.normal(0.0, noise / 3, (replicates, n[task]))
      out[model][task] = (value + offset[:, None] + common[task][None] + e).tolist()
  return out


def _two_level_loop(samples: dict, resamples: int, seed: int, **kw) -> tuple[dict, dict]:
  """(bootstrap_draws, the same quantities from balance_report on explicitly indexed means)."""
  draws = BS.bootstrap_draws(samples, resamples=resamples, seed=seed, **kw)
  idx = BS.resample_indices(draws["samples"], resamples=resamples, seed=seed)
  reps = BS.replicate_indices(draws["replicates"], resamples=resamples, seed=seed)
  units = draws["units"]
  out = collections.defaultdict(list)
  for r in range(resamples):
    # The mean over the drawn replicates and samples, each drawn one counted as often as drawn.
    means = {m: {t: float(np.mean(np.asarray(v)[reps[r]][:, idx[t][r]])) for t, v in row.items()
                 if t in idx} for m, row in samples.items()}
    append_resample(out, means, units, units, **kw)
    out["gain"].append([means[f"{u}+mini"][u] - means["mini"][u] for u in units])
  return draws, {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("temperature", [0.5, "auto"])
def test_two_level_matches_loop(temperature):
  samples = replicated(REAL, replicates=4, seed=2)
  draws, loop = _two_level_loop(samples, resamples=12, seed=5, tasks=TASKS,
                                temperature=temperature)
  assert draws["replicates"] == 4
  tol = dict(rtol=1e-4, atol=1e-5)
  for key in ("C", "temperature") + UNIT_KEYS:
    np.testing.assert_allclose(draws[key], loop[key], err_msg=key, **tol)
  # Replicates are drawn with replacement, the same for every model: some resample repeats one.
  reps = BS.replicate_indices(4, resamples=12, seed=5)
  assert reps.shape == (12, 4) and any(len(set(row)) < 4 for row in reps.tolist())


def test_point_values_are_the_mean_over_replicates_and_samples():
  samples = replicated(REAL, replicates=3)
  means = {m: {t: float(np.mean(v)) for t, v in row.items()} for m, row in samples.items()}
  report = BS.bootstrap_report(samples, tasks=TASKS, resamples=20)
  expected = B.balance_report(means, tasks=TASKS)
  np.testing.assert_allclose(report["C"], expected["C"], rtol=1e-6)
  for key in ("c_out", "c_in", "d", "lambda"):
    np.testing.assert_allclose(list(report[key].values()), list(expected[key].values()),
                               rtol=1e-6)
  assert report["bootstrap"]["replicates"] == 3


def _flat(samples: dict) -> dict:
  return {m: {t: list(np.asarray(v)[0]) for t, v in row.items()} for m, row in samples.items()}


@pytest.mark.parametrize("kw", [
    dict(tasks=TASKS),
    dict(tasks=TASKS, temperature="auto"),
    dict(tasks=TASKS + ["chat"], fixed={"chat": 0.7}, form="real", drop=["b"]),
])
def test_one_replicate_as_nested_lists_is_the_flat_input_exactly(kw):
  nested = replicated(REAL, replicates=1, seed=3)
  flat = _flat(nested)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", B.TemperatureAtBoundWarning)
    a = BS.bootstrap_report(flat, resamples=40, seed=9, **kw)
    b = BS.bootstrap_report(nested, resamples=40, seed=9, **kw)
  assert a == b
  assert a["bootstrap"]["replicates"] == 1
  # Training variance is invisible with one replicate: share 0.0 (null where nothing varies).
  share = a["variance"]["training_share"]
  assert all(v == 0.0 for v in share["c_out"].values())
  assert all(v == 0.0 for t, v in share["lambda"].items() if t != "chat")
  assert all(v == 0.0 for v in a["variance"]["training_var"]["gain"].values())
  assert share["C"][0][0] is None  # C's diagonal is 1 in every resample
  if "fixed" in kw:
    assert share["lambda"]["chat"] is None and a["variance"]["sampling_var"]["lambda"]["chat"] == 0
  # The sampling variance is that of the main resamples.
  draws = BS.bootstrap_draws(flat, resamples=40, seed=9, **{k: v for k, v in kw.items()})
  np.testing.assert_allclose(list(a["variance"]["sampling_var"]["lambda_d"].values()),
                             np.var(draws["lambda_d"], axis=0, ddof=1), rtol=1e-12)
  json.dumps(a, allow_nan=False)


def test_variance_shares_recover_known_variances():
  # The own-data gain of unit a, V_a(a+mini) − V_a(mini), with s[r, k] = μ + b_r + e_k + ε only
  # for a+mini on task a (every other score constant): between replicates its variance is
  # σ_b²/R, within them σ_w²/n (b and e are centred and scaled to exactly σ_b and σ_w, so the
  # known values are exact; ε adds ~σ_ε²/(R·n) to each).
  r, n, sigma_b, sigma_w = 200, 400, 0.02, 0.1
  rng = np.random.default_rng(0)
  b = rng.normal(size=r)
  b = (b - b.mean()) / b.std() * sigma_b
  e = rng.normal(size=n)
  e = (e - e.mean()) / e.std() * sigma_w
  table = {"mini": {"a": 0.5, "b": 0.4}, "a+mini": {"a": 0.7, "b": 0.45},
           "b+mini": {"a": 0.55, "b": 0.6}}
  samples = {m: {t: np.full((r, n), v) for t, v in row.items()} for m, row in table.items()}
  samples["a+mini"]["a"] = 0.7 + b[:, None] + e[None, :] + rng.normal(0.0, 0.005, (r, n))
  report = BS.bootstrap_report(samples, tasks=["a", "b"], resamples=2000, seed=1)
  v = report["variance"]
  assert report["bootstrap"]["replicates"] == r
  assert v["training_var"]["gain"]["a"] == pytest.approx(sigma_b ** 2 / r, rel=0.2)
  assert v["sampling_var"]["gain"]["a"] == pytest.approx(sigma_w ** 2 / n, rel=0.2)
  expected_share = (sigma_b ** 2 / r) / (sigma_b ** 2 / r + sigma_w ** 2 / n)
  assert v["training_share"]["gain"]["a"] == pytest.approx(expected_share, rel=0.2)
  # Unit b's gain is constant: no variance at either level, no share.
  assert v["training_var"]["gain"]["b"] == 0.0 and v["sampling_var"]["gain"]["b"] == 0.0
  assert v["training_share"]["gain"]["b"] is None
  # Layout: C as a matrix, per-unit dicts, λ per task.
  assert np.asarray(v["training_share"]["C"], dtype=object).shape == (2, 2)
  assert set(v["training_var"]) == set(BS.VARIANCE_KEYS)
  assert list(v["sampling_var"]["lambda"]) == ["a", "b"]


def test_two_level_intervals_are_wider_when_replicates_differ():
  # Replicates whose own-data gains differ (training noise on the a+mini, b+mini, c+mini runs):
  # the two-level intervals of the gain are wider than those of the sample-only bootstrap of the
  # same means (the replicate-averaged per-sample scores, resampled over samples only).
  samples = replicated(REAL, replicates=5, seed=4, noise=0.05, training=0.04)
  averaged = {m: {t: list(np.mean(v, axis=0)) for t, v in row.items()}
              for m, row in samples.items()}
  two = BS.bootstrap_report(samples, tasks=TASKS, resamples=400, seed=0)
  one = BS.bootstrap_report(averaged, tasks=TASKS, resamples=400, seed=0)
  assert two["gain"] == pytest.approx(one["gain"], rel=1e-9)
  for u in TASKS:
    width2 = np.diff(two["intervals"]["gain"][u])[0]
    width1 = np.diff(one["intervals"]["gain"][u])[0]
    assert width2 > 1.5 * width1, (u, width1, width2)
    assert two["variance"]["training_share"]["gain"][u] > 0.5


def test_paired_replicates_cancel_offsets_shared_by_every_model():
  # An offset o[r, task] added to every model's replicate r (a seed that makes every run better
  # or worse on a task) leaves every difference between models, hence C, unchanged in every
  # resample: the replicate draw is the same for every model. Unpaired offsets do not.
  samples = replicated(REAL, replicates=4, seed=6, training=0.02)
  rng = np.random.default_rng(1)
  offset = {t: rng.normal(0.0, 0.1, 4) for t in TASKS}
  shifted = {m: {t: (np.asarray(v) + offset[t][:, None]).tolist() for t, v in row.items()}
             for m, row in samples.items()}
  base = BS.bootstrap_report(samples, tasks=TASKS, resamples=200, seed=2)
  paired = BS.bootstrap_report(shifted, tasks=TASKS, resamples=200, seed=2)
  np.testing.assert_allclose(paired["intervals"]["C"], base["intervals"]["C"], atol=1e-9)
  np.testing.assert_allclose(paired["C"], base["C"], atol=1e-5)
  for key in ("c_out", "c_in", "gain"):
    np.testing.assert_allclose(list(paired["intervals"][key].values()),
                               list(base["intervals"][key].values()), atol=1e-9)
  unpaired = {m: {t: (np.asarray(v) + rng.normal(0.0, 0.1, 4)[:, None]).tolist()
                  for t, v in row.items()} for m, row in samples.items()}
  other = BS.bootstrap_report(unpaired, tasks=TASKS, resamples=200, seed=2)
  assert not np.allclose(other["intervals"]["C"], base["intervals"]["C"], atol=1e-3)


def test_bootstrap_section_and_json():
  samples = replicated(REAL, replicates=3)
  report = BS.bootstrap_report(samples, tasks=TASKS, resamples=30, seed=1)
  assert report["bootstrap"]["replicates"] == 3 and report["bootstrap"]["shrinkage"] == "none"
  assert json.loads(json.dumps(report, allow_nan=False)) == report
  # Variance shares are in [0, 1] or null.
  for section in ("c_out", "c_in", "d", "lambda", "gain"):
    for v in report["variance"]["training_share"][section].values():
      assert v is None or 0.0 <= v <= 1.0


# ----------------------------------------------------------------------------------------------
# Errors.


def _with(samples: dict, model: str, task: str, value) -> dict:
  out = {m: dict(row) for m, row in samples.items()}
  out[model][task] = value
  return out


_GOOD = replicated(REAL, replicates=2)


@pytest.mark.parametrize("samples, match", [
    (_with(_GOOD, "b+mini", "a", _GOOD["b+mini"]["a"] * 2),
     r"model 'b\+mini' has 4 replicates on task 'a' but model 'mini' has 2 \(on task 'a'\)"),
    (_with(_GOOD, "c+mini", "c", _GOOD["c+mini"]["c"][:1]),
     r"model 'c\+mini' has 1 replicate on task 'c' but model 'mini' has 2"),
    (_with(_GOOD, "mini", "b", _GOOD["mini"]["b"] + _GOOD["mini"]["b"][:1]),
     r"model 'mini' has 3 replicates on task 'b' but 2 on task 'a'"),
    (_with(_GOOD, "a+mini", "b", [_GOOD["a+mini"]["b"][0], _GOOD["a+mini"]["b"][1][:-1]]),
     r"replicate 1 of model 'a\+mini' on task 'b' has 23 samples but replicate 0 has 24"),
    (_with(_GOOD, "a+mini", "b", [row[:-1] for row in _GOOD["a+mini"]["b"]]),
     r"model 'a\+mini' on task 'b' must be a flat sequence of 24 samples \(or 2 replicate lists "
     r"of 24\), as model 'mini' has, got 2 lists of 23"),
    (_with(_GOOD, "a+mini", "b", [_GOOD["a+mini"]["b"][0],
                                  _GOOD["a+mini"]["b"][1][:5] + [float("nan")]
                                  + _GOOD["a+mini"]["b"][1][6:]]),
     r"sample 5 of replicate 1 of model 'a\+mini' on task 'b' is not finite: nan"),
    (_with(_GOOD, "a+mini", "b", [["x"] * 24, _GOOD["a+mini"]["b"][1]]),
     r"sample 0 of replicate 0 of model 'a\+mini' on task 'b' is not a number: 'x'"),
    (_with(_GOOD, "a+mini", "b", [[[0.1]] * 24] * 2),
     r"must be a flat sequence of numbers \[n\], or one such sequence per replicate \[R, n\]"),
])
def test_bad_replicates(samples, match):
  with pytest.raises(ValueError, match=match):
    BS.bootstrap_report(samples, tasks=TASKS, resamples=5)


def test_flat_mixed_with_replicates_is_an_error():
  samples = _with(_GOOD, "b+mini", "a", _GOOD["b+mini"]["a"][0])
  with pytest.raises(ValueError, match=r"model 'b\+mini' has 1 replicate on task 'a' but model "
                     r"'mini' has 2"):
    BS.bootstrap_draws(samples, tasks=TASKS, resamples=5)


def test_bad_shrinkage_and_replicate_arguments():
  with pytest.raises(ValueError, match=r"unknown shrinkage 'lots'"):
    BS.bootstrap_report(_GOOD, tasks=TASKS, resamples=5, shrinkage="lots")
  with pytest.raises(ValueError, match=r"replicates must be an integer >= 1"):
    BS.replicate_indices(0, resamples=5, seed=0)
  assert (BS.replicate_indices(1, resamples=3, seed=0) == 0).all()


# ----------------------------------------------------------------------------------------------
# Per-sample files: align_by_id and stack_replicates.


def _by_id(lists: dict, task_ids: dict) -> dict:
  """{model: {task: [n] or [R, n]}} → {model: {task: {id: score or [score per replicate]}}}."""
  out = {}
  for model, row in lists.items():
    out[model] = {}
    for task, values in row.items():
      arr = np.asarray(values)
      columns = arr.T.tolist() if arr.ndim == 2 else arr.tolist()
      out[model][task] = dict(zip(task_ids[task], columns))
  return out


IDS = {t: [f"{t}-{k:03d}" for k in range(n)] for t, n in N_SAMPLES.items()}


def test_align_by_id_with_replicate_lists():
  aligned = BS.align_by_id(_by_id(_GOOD, IDS))
  np.testing.assert_array_equal(np.asarray(aligned["b+mini"]["c"]),
                                np.asarray(_GOOD["b+mini"]["c"]))
  assert np.asarray(aligned["mini"]["a"]).shape == (2, 30)
  by_id = {"mini": {"a": {"s2": [0.0, 0.5], "s1": [1.0, 0.25]}},
           "a+mini": {"a": {"s1": [1.0, 1.0], "s2": [1.0, 0.0]}}}
  assert BS.align_by_id(by_id) == {"mini": {"a": [[1.0, 0.0], [0.25, 0.5]]},
                                   "a+mini": {"a": [[1.0, 1.0], [1.0, 0.0]]}}
  by_id["a+mini"]["a"]["s2"] = [1.0]
  with pytest.raises(ValueError, match=r"model 'a\+mini', task 'a', sample 's2' has 1 replicate "
                     r"scores but model 'mini', task 'a', sample 's1' has 2"):
    BS.align_by_id(by_id)
  by_id["a+mini"]["a"]["s2"] = 1.0
  with pytest.raises(ValueError, match=r"model 'a\+mini', task 'a': sample 's2' has one score but "
                     r"sample 's1' a list"):
    BS.align_by_id(by_id)
  by_id["a+mini"]["a"] = {"s1": [], "s2": []}
  with pytest.raises(ValueError, match=r"sample 's1': empty list of replicate scores"):
    BS.align_by_id(by_id)


def test_stack_replicates_round_trip():
  files = [_by_id({m: {t: v[r] for t, v in row.items()} for m, row in _GOOD.items()}, IDS)
           for r in range(2)]
  stacked = BS.stack_replicates(files)
  assert stacked == _by_id(_GOOD, IDS)
  assert BS.align_by_id(stacked) == BS.align_by_id(_by_id(_GOOD, IDS))
  # A file that already holds replicate lists adds its replicates in order.
  assert BS.stack_replicates([stacked, files[0]])["mini"]["a"]["a-000"] == [
      _GOOD["mini"]["a"][0][0], _GOOD["mini"]["a"][1][0], _GOOD["mini"]["a"][0][0]]
  # One file is itself.
  assert BS.stack_replicates(files[:1]) == {m: {t: {i: [v] for i, v in s.items()}
                                                for t, s in row.items()}
                                            for m, row in files[0].items()}


def test_stack_replicates_names_what_differs():
  one = {"mini": {"a": {"s1": 0.1, "s2": 0.2}}, "a+mini": {"a": {"s1": 0.3, "s2": 0.4}}}
  no_model = {"mini": one["mini"]}
  with pytest.raises(ValueError, match=r"file 0 and file 1 disagree on the models: 1 only in "
                     r"file 0 \('a\+mini'\)"):
    BS.stack_replicates([one, no_model])
  other_task = {"mini": {"b": {"s1": 0.1, "s2": 0.2}}, "a+mini": one["a+mini"]}
  with pytest.raises(ValueError, match=r"file 0 \(r0.json\) and file 2 \(r2.json\) disagree on "
                     r"the tasks of model 'mini': 1 only in file 0 \(r0.json\) \('a'\); 1 only "
                     r"in file 2 \(r2.json\) \('b'\)"):
    BS.stack_replicates([one, one, other_task], names=["r0.json", "r1.json", "r2.json"])
  other_ids = {"mini": one["mini"], "a+mini": {"a": {"s1": 0.3, "s3": 0.4}}}
  with pytest.raises(ValueError, match=r"disagree on the sample ids of model 'a\+mini', task "
                     r"'a': 1 only in file 0 \('s2'\); 1 only in file 1 \('s3'\)"):
    BS.stack_replicates([one, other_ids])
  with pytest.raises(ValueError, match=r"non-empty list"):
    BS.stack_replicates([])
  with pytest.raises(ValueError, match=r"file 1: model 'mini' must map task"):
    BS.stack_replicates([one, {"mini": [1]}])
