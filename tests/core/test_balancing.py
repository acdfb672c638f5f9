"""Tests of visatb_jax.balancing: hand-worked examples, properties, errors, jit/grad, auto T."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import balancing as B

TOL = dict(rtol=1e-5, atol=1e-6)
REPORT_KEYS = {"tasks", "balanced", "form", "temperature", "alpha", "C", "c_out", "c_in", "d",
               "lambda_out", "lambda_in", "lambda_d", "lambda", "fixed", "groups", "warnings",
               "at_bound"}

# ----------------------------------------------------------------------------------------------
# The hand-worked 3-task example ("real" form, T = 0.5, α = (0.25, 0.25, 0.5)).

TASKS = ["a", "b", "c"]


def real_scores() -> dict:
  return {
      "mini":   {"a": 0.50, "b": 0.40, "c": 0.20},
      "a+mini": {"a": 0.70, "b": 0.45, "c": 0.10},
      "b+mini": {"a": 0.60, "b": 0.60, "c": 0.25},
      "c+mini": {"a": 0.40, "b": 0.40, "c": 0.60},
  }


# Denominators V_j(j+mini) − V_j(mini):
#   a: 0.70−0.50 = 0.20, b: 0.60−0.40 = 0.20, c: 0.60−0.20 = 0.40.
# C[a→b] = (0.45−0.40)/0.20 = 0.25    C[a→c] = (0.10−0.20)/0.40 = −0.25
# C[b→a] = (0.60−0.50)/0.20 = 0.5     C[b→c] = (0.25−0.20)/0.40 = 0.125
# C[c→a] = (0.40−0.50)/0.20 = −0.5    C[c→b] = (0.40−0.40)/0.20 = 0
EXPECTED_C = [[1.0, 0.25, -0.25],
              [0.5, 1.0, 0.125],
              [-0.5, 0.0, 1.0]]
# C_out = row means without the diagonal: a: (0.25 − 0.25)/2 = 0, b: (0.5 + 0.125)/2 = 0.3125,
#         c: (−0.5 + 0)/2 = −0.25.
EXPECTED_C_OUT = [0.0, 0.3125, -0.25]
# C_in = column means without the diagonal: a: (0.5 − 0.5)/2 = 0, b: (0.25 + 0)/2 = 0.125,
#        c: (−0.25 + 0.125)/2 = −0.0625.
EXPECTED_C_IN = [0.0, 0.125, -0.0625]
# D = 1 − V_i(mini)/V_i(i+mini): a: 1 − 0.5/0.7 = 2/7 ≈ 0.285714, b: 1 − 0.4/0.6 = 1/3,
#     c: 1 − 0.2/0.6 = 2/3.
EXPECTED_D = [2 / 7, 1 / 3, 2 / 3]


def _n_softmax(x: list[float]) -> list[float]:
  e = [math.exp(v) for v in x]
  return [len(x) * v / sum(e) for v in e]


# λ_out = 3·softmax(C_out/0.5) = 3·softmax([0, 0.625, −0.5]):
#   exp = [1, 1.868246, 0.606531], sum 3.474777 → [0.863365, 1.612978, 0.523657].
EXPECTED_L_OUT = _n_softmax([0.0, 0.625, -0.5])
# λ_in = 3·softmax(−C_in/0.5) = 3·softmax([0, −0.25, 0.125]):
#   exp = [1, 0.778801, 1.133148], sum 2.911949 → [1.030238, 0.802350, 1.167412].
EXPECTED_L_IN = _n_softmax([0.0, -0.25, 0.125])
# λ_D = 3·softmax(D/0.5) = 3·softmax([4/7, 2/3, 4/3]):
#   exp = [1.770795, 1.947734, 3.793668], sum 7.512197 → [0.707168, 0.777829, 1.515003].
EXPECTED_L_D = _n_softmax([4 / 7, 2 / 3, 4 / 3])
# λ = 0.25·λ_out + 0.25·λ_in + 0.5·λ_D:
#   a: 0.25·0.863365 + 0.25·1.030238 + 0.5·0.707168 = 0.826985
#   b: 0.25·1.612978 + 0.25·0.802350 + 0.5·0.777829 = 0.992747
#   c: 0.25·0.523657 + 0.25·1.167412 + 0.5·1.515003 = 1.180269
EXPECTED_LAMBDA = [0.25 * o + 0.25 * i + 0.5 * d
                   for o, i, d in zip(EXPECTED_L_OUT, EXPECTED_L_IN, EXPECTED_L_D)]


def _close(actual, expected, rtol=1e-5, atol=1e-6) -> None:
  np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                             np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


def _vals(d: dict, keys=TASKS) -> list[float]:
  return [d[k] for k in keys]


def test_hand_example_literal_numbers():
  # The library against the numbers worked out by hand in the comments above (not against the
  # EXPECTED_* expressions, which reuse a softmax written here).
  report = B.balance_report(real_scores(), tasks=TASKS)
  _close(_vals(report["lambda_out"]), [0.863365, 1.612978, 0.523657], atol=2e-6)
  _close(_vals(report["lambda_in"]), [1.030238, 0.802350, 1.167412], atol=2e-6)
  _close(_vals(report["lambda_d"]), [0.707168, 0.777829, 1.515003], atol=2e-6)
  _close(_vals(report["lambda"]), [0.826985, 0.992747, 1.180269], atol=2e-6)


def test_contribution_matrix_hand_example():
  _close(B.contribution_matrix(real_scores(), TASKS), EXPECTED_C)


def test_outward_inward_hand_example():
  c_out, c_in = B.outward_inward(jnp.asarray(EXPECTED_C))
  _close(c_out, EXPECTED_C_OUT)
  _close(c_in, EXPECTED_C_IN)


def test_difficulties_hand_example():
  _close(B.difficulties(real_scores(), TASKS), EXPECTED_D)


def test_lambda_components_hand_example():
  l_out, l_in, l_d = B.lambda_components(jnp.asarray(EXPECTED_C_OUT), jnp.asarray(EXPECTED_C_IN),
                                         jnp.asarray(EXPECTED_D), temperature=0.5)
  _close(l_out, EXPECTED_L_OUT)
  _close(l_in, EXPECTED_L_IN)
  _close(l_d, EXPECTED_L_D)
  lam = B.lambda_from_components(jnp.asarray(EXPECTED_C_OUT), jnp.asarray(EXPECTED_C_IN),
                                 jnp.asarray(EXPECTED_D), temperature=0.5)
  _close(lam, EXPECTED_LAMBDA)


def test_compute_lambda_hand_example():
  lam = B.compute_lambda(real_scores(), tasks=TASKS)
  assert list(lam) == TASKS
  assert all(type(v) is float for v in lam.values())
  _close(_vals(lam), EXPECTED_LAMBDA)


def test_balance_report_hand_example():
  r = B.balance_report(real_scores(), tasks=TASKS)
  assert set(r) == REPORT_KEYS
  json.dumps(r, allow_nan=False)  # JSON-serialisable, no NaN.
  assert r["tasks"] == TASKS and r["balanced"] == TASKS
  assert r["form"] == "real" and r["temperature"] == 0.5 and r["alpha"] == [0.25, 0.25, 0.5]
  assert r["fixed"] == {} and r["groups"] is None and r["warnings"] == []
  _close(r["C"], EXPECTED_C)
  for key, expected in [("c_out", EXPECTED_C_OUT), ("c_in", EXPECTED_C_IN), ("d", EXPECTED_D),
                        ("lambda_out", EXPECTED_L_OUT), ("lambda_in", EXPECTED_L_IN),
                        ("lambda_d", EXPECTED_L_D), ("lambda", EXPECTED_LAMBDA)]:
    assert list(r[key]) == TASKS
    _close(_vals(r[key]), expected)


def test_other_temperature_and_alpha_hand_example():
  # T = 1, α = (1, 0, 0): λ = λ_out = 3·softmax(C_out) = 3·softmax([0, 0.3125, −0.25]).
  lam = B.compute_lambda(real_scores(), tasks=TASKS, temperature=1.0, alpha=(1.0, 0.0, 0.0))
  _close(_vals(lam), _n_softmax([0.0, 0.3125, -0.25]))


# ----------------------------------------------------------------------------------------------
# Precise and base forms.


def test_precise_form_hand_example():
  scores = real_scores()
  # Extra models: task i alone ('i') and its mini subset alone ('mini_i'), scored on i only.
  scores |= {"a": {"a": 0.80}, "mini_a": {"a": 0.60},   # D_a = 1 − 0.6/0.8 = 0.25
             "b": {"b": 0.50}, "mini_b": {"b": 0.40},   # D_b = 1 − 0.4/0.5 = 0.2
             "c": {"c": 0.40}, "mini_c": {"c": 0.10}}   # D_c = 1 − 0.1/0.4 = 0.75
  r = B.balance_report(scores, tasks=TASKS, form="precise")
  _close(r["C"], EXPECTED_C)  # C is the same as in the real form.
  _close(_vals(r["d"]), [0.25, 0.2, 0.75])
  # λ_D = 3·softmax([0.5, 0.4, 1.5]); λ_out, λ_in as in the real form.
  l_d = _n_softmax([0.5, 0.4, 1.5])
  _close(_vals(r["lambda_d"]), l_d)
  _close(_vals(r["lambda"]), [0.25 * o + 0.25 * i + 0.5 * d
                              for o, i, d in zip(EXPECTED_L_OUT, EXPECTED_L_IN, l_d)])


def base_scores() -> dict:
  return {
      "base": {"a": 0.2, "b": 0.1, "c": 0.3},
      "a":    {"a": 0.6, "b": 0.2, "c": 0.3},
      "b":    {"a": 0.3, "b": 0.5, "c": 0.2},
      "c":    {"a": 0.2, "b": 0.3, "c": 0.5},
      "mini_a": {"a": 0.30}, "mini_b": {"b": 0.40}, "mini_c": {"c": 0.25},
  }


def test_base_form_hand_example():
  # Denominators V_j(j) − V_j(base): a: 0.6−0.2 = 0.4, b: 0.5−0.1 = 0.4, c: 0.5−0.3 = 0.2.
  # C[a→b] = (0.2−0.1)/0.4 = 0.25   C[a→c] = (0.3−0.3)/0.2 = 0
  # C[b→a] = (0.3−0.2)/0.4 = 0.25   C[b→c] = (0.2−0.3)/0.2 = −0.5
  # C[c→a] = (0.2−0.2)/0.4 = 0      C[c→b] = (0.3−0.1)/0.4 = 0.5
  # C_out = [0.125, −0.125, 0.25], C_in = [0.125, 0.375, −0.25]
  # D = 1 − V_i(mini_i)/V_i(i) = [1 − 0.3/0.6, 1 − 0.4/0.5, 1 − 0.25/0.5] = [0.5, 0.2, 0.5]
  # No 'mini' or '<i>+mini' model is needed.
  r = B.balance_report(base_scores(), tasks=TASKS, form="base")
  _close(r["C"], [[1, 0.25, 0], [0.25, 1, -0.5], [0, 0.5, 1]])
  _close(_vals(r["c_out"]), [0.125, -0.125, 0.25])
  _close(_vals(r["c_in"]), [0.125, 0.375, -0.25])
  _close(_vals(r["d"]), [0.5, 0.2, 0.5])
  l_out = _n_softmax([0.25, -0.25, 0.5])    # C_out / 0.5
  l_in = _n_softmax([-0.25, -0.75, 0.5])    # −C_in / 0.5
  l_d = _n_softmax([1.0, 0.4, 1.0])         # D / 0.5
  _close(_vals(r["lambda_out"]), l_out)
  _close(_vals(r["lambda_in"]), l_in)
  _close(_vals(r["lambda_d"]), l_d)
  _close(_vals(r["lambda"]), [0.25 * o + 0.25 * i + 0.5 * d for o, i, d in zip(l_out, l_in, l_d)])
  _close(B.contribution_matrix(base_scores(), TASKS, form="base"), r["C"])
  _close(B.difficulties(base_scores(), TASKS, form="base"), [0.5, 0.2, 0.5])


# ----------------------------------------------------------------------------------------------
# Fixed tasks and groups.


def test_fixed_task_keeps_its_weight_and_needs_no_scores():
  # 'chat' has no models and no scores at all; the others are balanced exactly as before.
  r = B.balance_report(real_scores(), tasks=["a", "chat", "b", "c"], fixed={"chat": 1.5})
  assert r["tasks"] == ["a", "chat", "b", "c"] and r["balanced"] == TASKS
  assert list(r["lambda"]) == ["a", "chat", "b", "c"]
  assert r["lambda"]["chat"] == 1.5 and r["fixed"] == {"chat": 1.5}
  _close(_vals(r["lambda"]), EXPECTED_LAMBDA)
  lam = B.compute_lambda(real_scores(), tasks=["a", "chat", "b", "c"], fixed={"chat": 1.5})
  assert lam == r["lambda"]


def test_fixed_task_with_scores_but_no_own_model():
  # Scores on the fixed task may be present (every model validated on every task) and are ignored.
  scores = real_scores()
  for row in scores.values():
    row["chat"] = 0.3
  lam = B.compute_lambda(scores, tasks=TASKS + ["chat"], fixed={"chat": 1.0})
  assert lam["chat"] == 1.0
  _close(_vals(lam), EXPECTED_LAMBDA)


def group_scores() -> dict:
  # Group A = {a1, a2}; its score is the mean of a1 and a2, and the means equal task 'a' of the
  # hand example (mini: (0.4+0.6)/2 = 0.5, A+mini: (0.6+0.8)/2 = 0.7, B+mini: (0.5+0.7)/2 = 0.6,
  # C+mini: (0.3+0.5)/2 = 0.4); groups B = {b}, C = {c} are tasks b and c of the example.
  return {
      "mini":   {"a1": 0.4, "a2": 0.6, "b": 0.40, "c": 0.20},
      "A+mini": {"a1": 0.6, "a2": 0.8, "b": 0.45, "c": 0.10},
      "B+mini": {"a1": 0.5, "a2": 0.7, "b": 0.60, "c": 0.25},
      "C+mini": {"a1": 0.3, "a2": 0.5, "b": 0.40, "c": 0.60},
  }


GROUPS = {"a1": "A", "b": "B", "a2": "A", "c": "C"}


def test_groups_hand_example():
  tasks = ["a1", "b", "a2", "c", "chat"]
  r = B.balance_report(group_scores(), tasks=tasks, groups=GROUPS, fixed={"chat": 1.0})
  assert r["balanced"] == ["A", "B", "C"]  # groups in order of first appearance
  assert r["groups"] == {"a1": "A", "b": "B", "a2": "A", "c": "C", "chat": None}
  _close(r["C"], EXPECTED_C, atol=1e-5)
  _close(_vals(r["d"], "ABC"), EXPECTED_D)
  _close(_vals(r["lambda_out"], "ABC"), EXPECTED_L_OUT, atol=1e-5)
  # Every task gets its group's λ.
  lam = r["lambda"]
  _close([lam["a1"], lam["a2"], lam["b"], lam["c"]], [EXPECTED_LAMBDA[0], EXPECTED_LAMBDA[0],
                                                        EXPECTED_LAMBDA[1], EXPECTED_LAMBDA[2]])
  assert lam["a1"] == lam["a2"] and lam["chat"] == 1.0
  json.dumps(r, allow_nan=False)


def test_groups_error_messages_name_the_group():
  scores = group_scores()
  del scores["B+mini"]
  with pytest.raises(ValueError, match=r"missing model 'B\+mini'.*group 'B'"):
    B.compute_lambda(scores, tasks=["a1", "a2", "b", "c"], groups=GROUPS)
  scores = group_scores()
  scores["A+mini"]["a1"] = 0.2  # group A: mean (0.2 + 0.8)/2 = 0.5 = V_A(mini)
  with pytest.raises(ValueError, match=r"group 'A' did not improve with its own data: "
                                       r"V_A\(A\+mini\)=0\.5 <= V_A\(mini\)=0\.5"):
    B.compute_lambda(scores, tasks=["a1", "a2", "b", "c"], groups=GROUPS)


@pytest.mark.parametrize("groups, fixed, match", [
    ({"a1": "A", "a2": "A", "b": "B"}, None, r"tasks \['c'\] have no group"),
    ({**GROUPS, "zzz": "Z"}, None, r"groups names task 'zzz'"),
    ({**GROUPS, "chat": "C"}, {"chat": 1.0}, r"task 'chat' has a fixed weight.*group 'C'"),
    ({"a1": "A", "a2": "A", "b": "A", "c": "A"}, None, r"at least 2 balanced groups"),
    ({**GROUPS, "c": 3}, None, r"group of task 'c' must be a non-empty string"),
])
def test_bad_groups(groups, fixed, match):
  tasks = ["a1", "a2", "b", "c"] + (list(fixed) if fixed else [])
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(group_scores(), tasks=tasks, groups=groups, fixed=fixed)


def test_balanced_units():
  assert B.balanced_units(["a", "s", "b"], {"s": 1.0}) == ["a", "b"]
  assert B.balanced_units(["a1", "b", "a2", "c"], None, GROUPS) == ["A", "B", "C"]


# ----------------------------------------------------------------------------------------------
# Bad input: always a ValueError naming the task and the model, never NaN/inf.


def _with(scores: dict, model: str, task: str, value) -> dict:
  scores = copy.deepcopy(scores)
  scores[model][task] = value
  return scores


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("b+mini"), r"missing model 'b\+mini'.*task 'b'"),
    (lambda s: s.pop("mini"), r"missing model 'mini' \(form 'real' needs it for every balanced "
                              r"task\)"),
    (lambda s: s["a+mini"].pop("c"), r"model 'a\+mini' has no score for task 'c'"),
    (lambda s: s["mini"].pop("b"), r"model 'mini' has no score for task 'b'"),
    (lambda s: s.__setitem__("c+mini", [0.1, 0.2]), r"model 'c\+mini' must map task -> score"),
])
def test_missing_model_or_task(mutate, match):
  scores = real_scores()
  mutate(scores)
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(scores, tasks=TASKS)
  with pytest.raises(ValueError, match=match):
    B.validate_scores(scores, TASKS)


def test_no_improvement_with_own_data():
  scores = _with(real_scores(), "b+mini", "b", 0.35)
  with pytest.raises(ValueError, match=r"task 'b' did not improve with its own data: "
                                       r"V_b\(b\+mini\)=0\.35 <= V_b\(mini\)=0\.4"):
    B.compute_lambda(scores, tasks=TASKS)
  scores = _with(real_scores(), "b+mini", "b", 0.40)  # exactly zero
  with pytest.raises(ValueError, match=r"task 'b' did not improve"):
    B.contribution_matrix(scores, TASKS)


def test_near_zero_improvement():
  scores = _with(real_scores(), "c+mini", "c", 0.20000001)
  with pytest.raises(ValueError, match=r"task 'c' barely improved with its own data: "
                                       r"V_c\(c\+mini\)=0\.2 - V_c\(mini\)=0\.2"):
    B.compute_lambda(scores, tasks=TASKS)


def test_all_problems_are_reported_together():
  scores = _with(_with(real_scores(), "a+mini", "a", 0.1), "c+mini", "c", 0.1)
  with pytest.raises(ValueError, match=r"task 'a' did not improve.*; task 'c' did not improve"):
    B.compute_lambda(scores, tasks=TASKS)


def test_base_form_no_improvement_over_base():
  scores = _with(base_scores(), "c", "c", 0.3)
  with pytest.raises(ValueError, match=r"task 'c' did not improve over 'base' with its own data: "
                                       r"V_c\(c\)=0\.3 <= V_c\(base\)=0\.3"):
    B.compute_lambda(scores, tasks=TASKS, form="base")


def test_non_positive_difficulty_denominator():
  # Task c on a negated metric: it improves (−0.5 → 0.0), but V_c(c+mini) = 0 cannot divide.
  scores = _with(_with(real_scores(), "mini", "c", -0.5), "c+mini", "c", 0.0)
  with pytest.raises(ValueError, match=r"difficulty of task 'c' needs V_c\(c\+mini\) > 0, "
                                       r"got V_c\(c\+mini\)=0"):
    B.compute_lambda(scores, tasks=TASKS)
  scores = _with(_with(real_scores(), "mini", "c", -0.5), "c+mini", "c", -0.1)
  with pytest.raises(ValueError, match=r"difficulty of task 'c' needs V_c\(c\+mini\) > 0"):
    B.difficulties(scores, TASKS)
  # Near zero next to the numerator: |V(mini)/V(c+mini)| would be 50000 > 1/1e-4.
  scores = _with(_with(real_scores(), "mini", "c", -0.5), "c+mini", "c", 1e-5)
  with pytest.raises(ValueError, match=r"difficulty of task 'c': V_c\(c\+mini\)=1e-05 is too "
                                       r"close to 0 next to V_c\(mini\)=-0\.5"):
    B.compute_lambda(scores, tasks=TASKS)


def test_precise_form_errors():
  scores = real_scores() | {"a": {"a": 0.8}, "mini_a": {"a": 0.6}, "b": {"b": 0.5},
                            "mini_b": {"b": 0.4}, "c": {"c": 0.4}}
  with pytest.raises(ValueError, match=r"missing model 'mini_c'.*task 'c'"):
    B.compute_lambda(scores, tasks=TASKS, form="precise")
  scores["mini_c"] = {"c": 0.1}
  scores["c"] = {"c": -0.2}
  with pytest.raises(ValueError, match=r"difficulty of task 'c' needs V_c\(c\) > 0"):
    B.compute_lambda(scores, tasks=TASKS, form="precise")
  scores["c"] = {"a": 0.4}
  with pytest.raises(ValueError, match=r"model 'c' has no score for task 'c'"):
    B.compute_lambda(scores, tasks=TASKS, form="precise")


def test_base_form_missing_base():
  scores = base_scores()
  del scores["base"]
  with pytest.raises(ValueError, match=r"missing model 'base'"):
    B.compute_lambda(scores, tasks=TASKS, form="base")


@pytest.mark.parametrize("value, match", [
    (float("nan"), r"score of model 'a\+mini' on task 'b' is not finite: V_b\(a\+mini\)=nan"),
    (float("inf"), r"score of model 'a\+mini' on task 'b' is not finite: V_b\(a\+mini\)=inf"),
    (np.float32("-inf"), r"model 'a\+mini' on task 'b' is not finite"),
    (jnp.asarray(float("nan")), r"model 'a\+mini' on task 'b' is not finite"),
    ("0.45", r"score of model 'a\+mini' on task 'b' is not a number"),
    (None, r"score of model 'a\+mini' on task 'b' is not a number"),
    (True, r"score of model 'a\+mini' on task 'b' is not a number"),
    ([0.4, 0.5], r"score of model 'a\+mini' on task 'b' is not a number"),
])
def test_bad_score_values(value, match):
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(_with(real_scores(), "a+mini", "b", value), tasks=TASKS)


def test_numpy_and_jax_scalars_are_accepted():
  scores = real_scores()
  scores["mini"] = {k: np.float64(v) for k, v in scores["mini"].items()}
  scores["a+mini"] = {k: jnp.asarray(v) for k, v in scores["a+mini"].items()}
  scores["b+mini"] = {k: np.asarray(v, np.float32) for k, v in scores["b+mini"].items()}
  _close(_vals(B.compute_lambda(scores, tasks=TASKS)), EXPECTED_LAMBDA)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["a"]), r"at least 2 balanced tasks, got 1: \['a'\]"),
    (dict(tasks=["a", "b"], fixed={"b": 1.0}), r"at least 2 balanced tasks.*fixed: \['b'\]"),
    (dict(tasks=[]), r"at least 2 balanced tasks, got 0"),
    (dict(tasks="abc"), r"tasks must be a sequence of task names"),
    (dict(tasks=["a", "b", "a"]), r"duplicates: \['a'\]"),
    (dict(tasks=TASKS, form="fancy"), r"unknown form 'fancy'"),
    (dict(tasks=TASKS, alpha=(0.5, 0.5, 0.5)), r"alpha must sum to 1"),
    (dict(tasks=TASKS, alpha=(0.5, 0.5)), r"alpha must have 3 entries"),
    (dict(tasks=TASKS, alpha=(1.5, -0.5, 0.0)), r"alpha entries must be finite and >= 0"),
    (dict(tasks=TASKS, alpha=("x", 0.5, 0.5)), r"alpha must be three numbers"),
    (dict(tasks=TASKS, temperature=0.0), r"temperature must be finite and > 0"),
    (dict(tasks=TASKS, temperature=-1.0), r"temperature must be finite and > 0"),
    (dict(tasks=TASKS, temperature=float("nan")), r"temperature must be finite and > 0"),
    (dict(tasks=TASKS, temperature=float("inf")), r"temperature must be finite and > 0"),
    (dict(tasks=TASKS, temperature="hot"), r"temperature must be a number > 0 or 'auto'"),
    (dict(tasks=TASKS, temperature=None), r"temperature must be a number > 0 or 'auto'"),
    (dict(tasks=TASKS, fixed={"zzz": 1.0}), r"fixed task 'zzz' is not in tasks"),
    (dict(tasks=TASKS + ["s"], fixed={"s": -1.0}), r"fixed weight of task 's'.*>= 0"),
    (dict(tasks=TASKS + ["s"], fixed={"s": "one"}), r"fixed weight of task 's' must be a number"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(real_scores(), **kwargs)


def test_scores_must_be_a_mapping():
  with pytest.raises(ValueError, match=r"scores must be a mapping"):
    B.compute_lambda([1, 2], tasks=TASKS)


def test_low_level_shape_errors():
  with pytest.raises(ValueError, match=r"square matrix"):
    B.outward_inward(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"square matrix"):
    B.outward_inward(jnp.ones((1, 1)))
  with pytest.raises(ValueError, match=r"1-D of the same length"):
    B.lambda_from_components(jnp.ones(3), jnp.ones(2), jnp.ones(3), temperature=1.0)
  with pytest.raises(ValueError, match=r"alpha must sum to 1"):
    B.lambda_from_components(jnp.ones(3), jnp.ones(3), jnp.ones(3), temperature=1.0,
                             alpha=(1, 1, 1))


def test_validate_scores_checks_before_jit():
  B.validate_scores(real_scores(), TASKS)  # good scores: no error
  bad = _with(real_scores(), "b+mini", "b", 0.35)
  with pytest.raises(ValueError, match=r"task 'b' did not improve"):
    B.validate_scores(bad, TASKS)
  # Under jit the values are tracers: only structural problems can raise (documented).
  out = jax.jit(lambda s: B.compute_lambda(s, tasks=TASKS))(bad)
  assert set(out) == set(TASKS)
  with pytest.raises(ValueError, match=r"missing model 'b\+mini'"):
    jax.jit(lambda s: B.compute_lambda(s, tasks=TASKS))(
        {k: v for k, v in real_scores().items() if k != "b+mini"})


# ----------------------------------------------------------------------------------------------
# on_degenerate="warn": degenerate denominators are masked and warned, never inf/NaN.
#
# The hand example with V_b(b+mini) = 0.35 < V_b(mini) = 0.40: task b did not improve with its own
# data, so column b of C is uninformative and set to 0 off the diagonal:
#   C[a→b] = 0 (was (0.45−0.40)/(−0.05) = −1)   C[c→b] = 0 (was (0.40−0.40)/(−0.05) = 0)
# the other columns keep their denominators (a: 0.20, c: 0.40) and values.
WARN_C = [[1.0, 0.0, -0.25],
          [0.5, 1.0, 0.125],
          [-0.5, 0.0, 1.0]]
# C_out: a: (0 − 0.25)/2 = −0.125, b: (0.5 + 0.125)/2 = 0.3125, c: (−0.5 + 0)/2 = −0.25.
WARN_C_OUT = [-0.125, 0.3125, -0.25]
# C_in: a: (0.5 − 0.5)/2 = 0, b: (0 + 0)/2 = 0, c: (−0.25 + 0.125)/2 = −0.0625.
WARN_C_IN = [0.0, 0.0, -0.0625]
# D's denominator V_b(b+mini) = 0.35 > 0 is fine: D_b = 1 − 0.40/0.35 = −1/7.
WARN_D = [2 / 7, -1 / 7, 2 / 3]
# λ_out = 3·softmax([−0.25, 0.625, −0.5]):
#   exp = [0.778801, 1.868246, 0.606531], sum 3.253577 → [0.718103, 1.722639, 0.559259].
WARN_L_OUT = _n_softmax([-0.25, 0.625, -0.5])
# λ_in = 3·softmax([0, 0, 0.125]): exp = [1, 1, 1.133148], sum 3.133148
#   → [0.957503, 0.957503, 1.084993].
WARN_L_IN = _n_softmax([0.0, 0.0, 0.125])
# λ_D = 3·softmax([4/7, −2/7, 4/3]): exp = [1.770795, 0.751477, 3.793668], sum 6.315940
#   → [0.841108, 0.356943, 1.801949].
WARN_L_D = _n_softmax([4 / 7, -2 / 7, 4 / 3])
# λ = 0.25·λ_out + 0.25·λ_in + 0.5·λ_D = [0.839455, 0.848507, 1.312038].
WARN_LAMBDA = [0.25 * o + 0.25 * i + 0.5 * d for o, i, d in zip(WARN_L_OUT, WARN_L_IN, WARN_L_D)]
WARN_B_MESSAGE = (r"task 'b' did not improve with its own data: V_b\(b\+mini\)=0\.35 <= "
                  r"V_b\(mini\)=0\.4; C\[i→b\] set to 0 for every other i \(on_degenerate='warn'\)")


def _bad_b() -> dict:
  return _with(real_scores(), "b+mini", "b", 0.35)


def test_warn_hand_example_literal_numbers():
  _close(WARN_L_OUT, [0.718103, 1.722639, 0.559259], atol=2e-6)
  _close(WARN_L_IN, [0.957503, 0.957503, 1.084993], atol=2e-6)
  _close(WARN_L_D, [0.841108, 0.356943, 1.801949], atol=2e-6)
  _close(WARN_LAMBDA, [0.839455, 0.848507, 1.312038], atol=2e-6)


def test_warn_hand_example():
  with pytest.warns(UserWarning) as record:
    r = B.balance_report(_bad_b(), tasks=TASKS, on_degenerate="warn")
  assert len(record) == 1
  w = record[0]
  assert w.category is B.DegenerateScoresWarning and issubclass(w.category, UserWarning)
  assert re.fullmatch(WARN_B_MESSAGE, str(w.message))
  assert w.filename == __file__  # attributed to the caller, not to balancing.py
  assert r["warnings"] == [str(w.message)]
  json.dumps(r, allow_nan=False)  # finite everywhere
  _close(r["C"], WARN_C)
  for key, expected in [("c_out", WARN_C_OUT), ("c_in", WARN_C_IN), ("d", WARN_D),
                        ("lambda_out", WARN_L_OUT), ("lambda_in", WARN_L_IN),
                        ("lambda_d", WARN_L_D), ("lambda", WARN_LAMBDA)]:
    _close(_vals(r[key]), expected)
  # The lower-level entry points agree and warn too.
  with pytest.warns(UserWarning, match=WARN_B_MESSAGE):
    lam = B.compute_lambda(_bad_b(), tasks=TASKS, on_degenerate="warn")
  _close(_vals(lam), WARN_LAMBDA)
  with pytest.warns(UserWarning, match=WARN_B_MESSAGE):
    _close(B.contribution_matrix(_bad_b(), TASKS, on_degenerate="warn"), WARN_C)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # D is fine here: no warning.
    _close(B.difficulties(_bad_b(), TASKS, on_degenerate="warn"), WARN_D)


def test_error_mode_still_raises_on_the_same_input():
  for kwargs in ({}, {"on_degenerate": "error"}):
    with pytest.raises(ValueError, match=r"task 'b' did not improve with its own data: "
                                         r"V_b\(b\+mini\)=0\.35 <= V_b\(mini\)=0\.4$"):
      B.balance_report(_bad_b(), tasks=TASKS, **kwargs)
    with pytest.raises(ValueError, match=r"task 'b' did not improve"):
      B.contribution_matrix(_bad_b(), TASKS, **kwargs)
    with pytest.raises(ValueError, match=r"task 'b' did not improve"):
      B.validate_scores(_bad_b(), TASKS, **kwargs)


def test_warn_zero_and_near_zero_gain_use_the_error_threshold():
  # b: gain exactly 0; c: gain 1e-8, within 1e-4×|V| of 0 ("barely improved" in error mode).
  scores = _with(_with(real_scores(), "b+mini", "b", 0.40), "c+mini", "c", 0.20000001)
  with pytest.warns(UserWarning) as record:
    r = B.balance_report(scores, tasks=TASKS, on_degenerate="warn")
  assert [str(w.message) for w in record] == r["warnings"]
  assert len(r["warnings"]) == 2
  assert r["warnings"][0].startswith("task 'b' did not improve with its own data")
  assert r["warnings"][1].startswith("task 'c' barely improved with its own data")
  # Columns b and c zeroed; column a as in the hand example.
  _close(r["C"], [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-0.5, 0.0, 1.0]])
  _close(_vals(r["c_in"]), [0.0, 0.0, 0.0])
  _close(_vals(r["c_out"]), [0.0, 0.25, -0.25])
  json.dumps(r, allow_nan=False)


def test_warn_groups_name_the_group():
  scores = group_scores()
  scores["A+mini"]["a1"] = 0.2  # group A: mean (0.2 + 0.8)/2 = 0.5 = V_A(mini)
  with pytest.warns(UserWarning, match=r"group 'A' did not improve with its own data: "
                                       r"V_A\(A\+mini\)=0\.5 <= V_A\(mini\)=0\.5"):
    r = B.balance_report(scores, tasks=["a1", "a2", "b", "c"], groups=GROUPS,
                         on_degenerate="warn")
  assert [row[0] for row in r["C"]] == [1.0, 0.0, 0.0]
  assert r["lambda"]["a1"] == r["lambda"]["a2"]


def _bad_d() -> dict:
  # Task c on a negated metric: it improves (−0.5 → 0.0), but D_c = 1 − V_c(mini)/V_c(c+mini)
  # cannot divide by V_c(c+mini) = 0.
  return _with(_with(real_scores(), "mini", "c", -0.5), "c+mini", "c", 0.0)


def test_warn_difficulty_denominator():
  message = (r"difficulty of task 'c' needs V_c\(c\+mini\) > 0, got V_c\(c\+mini\)=0; "
             r"D\[c\] set to 0 \(on_degenerate='warn'\)")
  with pytest.warns(UserWarning, match=message):
    d = B.difficulties(_bad_d(), TASKS, on_degenerate="warn")
  _close(d, [2 / 7, 1 / 3, 0.0])
  with pytest.warns(UserWarning, match=message) as record:
    r = B.balance_report(_bad_d(), tasks=TASKS, on_degenerate="warn")
  assert len(record) == 1 and len(r["warnings"]) == 1 and re.fullmatch(message, r["warnings"][0])
  _close(_vals(r["d"]), [2 / 7, 1 / 3, 0.0])
  # C is fine: column c has denominator 0 − (−0.5) = 0.5, so C[a→c] = (0.1 + 0.5)/0.5 = 1.2 and
  # C[b→c] = (0.25 + 0.5)/0.5 = 1.5.
  _close([r["C"][0][2], r["C"][1][2]], [1.2, 1.5])
  _close(_vals(r["lambda_d"]), _n_softmax([4 / 7, 2 / 3, 0.0]))
  json.dumps(r, allow_nan=False)
  with pytest.raises(ValueError, match=r"difficulty of task 'c' needs V_c\(c\+mini\) > 0"):
    B.difficulties(_bad_d(), TASKS)


def test_warn_difficulty_precise_form():
  scores = real_scores() | {"a": {"a": 0.8}, "mini_a": {"a": 0.6}, "b": {"b": 0.5},
                            "mini_b": {"b": 0.4}, "c": {"c": -0.2}, "mini_c": {"c": 0.1}}
  with pytest.warns(UserWarning, match=r"difficulty of task 'c' needs V_c\(c\) > 0, "
                                       r"got V_c\(c\)=-0\.2; D\[c\] set to 0"):
    r = B.balance_report(scores, tasks=TASKS, form="precise", on_degenerate="warn")
  _close(_vals(r["d"]), [0.25, 0.2, 0.0])


def test_warn_still_raises_for_missing_or_non_finite_scores():
  for scores, match in [
      (_with(real_scores(), "a+mini", "b", float("nan")), r"'a\+mini' on task 'b' is not finite"),
      (_with(_bad_b(), "c+mini", "a", float("inf")), r"'c\+mini' on task 'a' is not finite"),
      ({k: v for k, v in _bad_b().items() if k != "c+mini"}, r"missing model 'c\+mini'"),
  ]:
    for f in (lambda s: B.compute_lambda(s, tasks=TASKS, on_degenerate="warn"),
              lambda s: B.validate_scores(s, TASKS, on_degenerate="warn")):
      with pytest.raises(ValueError, match=match):
        f(scores)


def test_validate_scores_warn_returns_the_messages():
  with pytest.warns(UserWarning, match=WARN_B_MESSAGE):
    messages = B.validate_scores(_bad_b(), TASKS, on_degenerate="warn")
  assert len(messages) == 1 and re.fullmatch(WARN_B_MESSAGE, messages[0])
  assert B.validate_scores(real_scores(), TASKS, on_degenerate="warn") == []
  assert B.validate_scores(real_scores(), TASKS) == []


@pytest.mark.parametrize("value", ["warning", "ERROR", "", None, 1])
@pytest.mark.parametrize("call", [
    lambda v: B.contribution_matrix(real_scores(), TASKS, on_degenerate=v),
    lambda v: B.difficulties(real_scores(), TASKS, on_degenerate=v),
    lambda v: B.compute_lambda(real_scores(), tasks=TASKS, on_degenerate=v),
    lambda v: B.balance_report(real_scores(), tasks=TASKS, on_degenerate=v),
    lambda v: B.validate_scores(real_scores(), TASKS, on_degenerate=v),
])
def test_bad_on_degenerate(call, value):
  with pytest.raises(ValueError, match=r"unknown on_degenerate .*expected one of error, warn"):
    call(value)


_NUMERIC_KEYS = ("C", "c_out", "c_in", "d", "lambda", "warnings")
_WARN_JIT = jax.jit(lambda s: {k: v for k, v in B.balance_report(
    s, tasks=TASKS, on_degenerate="warn").items() if k in _NUMERIC_KEYS})


def test_warn_jit_matches_eager_and_does_not_warn():
  for scores in (_bad_b(), _bad_d(), _with(real_scores(), "b+mini", "b", 0.40), real_scores()):
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      eager = B.balance_report(scores, tasks=TASKS, on_degenerate="warn")
    assert len(record) == len(eager["warnings"])
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # tracers cannot be inspected: nothing to warn.
      jitted = _WARN_JIT(scores)
    assert jitted["warnings"] == []
    _close(jitted["C"], eager["C"])
    for key in ("c_out", "c_in", "d", "lambda"):
      _close(_vals(jitted[key]), _vals(eager[key]))


_WARN_LAMBDA = lambda s: B.compute_lambda(s, tasks=TASKS, on_degenerate="warn")  # noqa: E731
_WARN_GRAD = jax.jit(jax.grad(lambda s, w: _as_vector(_WARN_LAMBDA(s)) @ w))


@pytest.mark.parametrize("scores", [
    _bad_b(),                                            # negative gain
    _with(real_scores(), "b+mini", "b", 0.40),           # zero gain: 0/0 in the branch not taken
    _bad_d(),                                            # zero difficulty denominator
    _with(_bad_b(), "b+mini", "b", 0.0),                 # both at once: V_b(b+mini) = 0
])
def test_warn_grad_is_finite(scores):
  g = _WARN_GRAD(scores, jnp.asarray([0.3, -1.2, 0.7]))
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(g))


def test_warn_grad_hand_example():
  # V_b(a+mini) only enters C[a→b], which is masked: its gradient is exactly 0.
  g = _WARN_GRAD(_bad_b(), jnp.ones(3))
  assert float(g["a+mini"]["b"]) == 0.0
  # ∂λ_a/∂V_c(a+mini) (through C[a→c], denominator 0.4) vs a central difference: the masked
  # computation is smooth away from the threshold. h = 1e-3 keeps float32 rounding ~1e-4 and the
  # O(h²) error far below the tolerance.
  grad = float(_WARN_GRAD(_bad_b(), jnp.asarray([1.0, 0.0, 0.0]))["a+mini"]["c"])

  def lam_a(v):
    return _WARN_LAMBDA(_with(_bad_b(), "a+mini", "c", v))["a"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", B.DegenerateScoresWarning)
    fd = (lam_a(0.1 + 1e-3) - lam_a(0.1 - 1e-3)) / 2e-3
  assert abs(fd) > 0.05 and np.isfinite(grad) and grad == pytest.approx(fd, rel=2e-3)


def test_warn_auto_temperature():
  with pytest.warns(UserWarning, match=WARN_B_MESSAGE):
    r = B.balance_report(_bad_b(), tasks=TASKS, temperature="auto", on_degenerate="warn")
  # The degenerate-data message, then the automatic T's (task a sits on the lower bound).
  assert _in_bounds(r["lambda"]) and len(r["warnings"]) == 2 and r["at_bound"] == ["a"]
  assert "temperature='auto' chose T=" in r["warnings"][1]


# ----------------------------------------------------------------------------------------------
# jit and grad.


def _as_vector(lam: dict) -> jax.Array:
  return jnp.stack([jnp.asarray(lam[t]) for t in sorted(lam)])


def test_jit_matches_eager_with_fixed_and_groups():
  tasks = ["a1", "b", "a2", "c", "chat"]
  kw = dict(tasks=tasks, groups=GROUPS, fixed={"chat": 1.25})
  eager = B.compute_lambda(group_scores(), **kw)
  jitted = jax.jit(lambda s: B.compute_lambda(s, **kw))(group_scores())
  assert set(jitted) == set(tasks)
  assert all(isinstance(v, jax.Array) and v.shape == () for v in jitted.values())
  _close([jitted[t] for t in tasks], [eager[t] for t in tasks])
  assert float(jitted["chat"]) == 1.25


def test_report_under_grad_returns_arrays():
  def f(s):
    r = B.balance_report(s, tasks=TASKS)
    assert r["C"].shape == (3, 3)
    return r["lambda"]["a"] + 2 * r["d"]["c"]
  g = jax.grad(f)(real_scores())
  # d(2·D_c)/dV_c(mini) = −2/V_c(c+mini) = −2/0.6, plus the λ_a term.
  assert np.isfinite(float(g["mini"]["c"]))


def test_auto_temperature_is_not_jittable():
  with pytest.raises(ValueError, match=r"temperature='auto' needs concrete scores"):
    jax.jit(lambda s: B.compute_lambda(s, tasks=TASKS, temperature="auto"))(real_scores())


# ----------------------------------------------------------------------------------------------
# Auto temperature.


def _in_bounds(lam: dict, tol: float = 1e-5) -> bool:
  return all(0.5 - tol <= v <= 2.0 + tol for v in lam.values())


def test_auto_temperature_is_the_lowest_feasible():
  r = B.balance_report(real_scores(), tasks=TASKS, temperature="auto")
  t = r["temperature"]
  assert B.AUTO_T_RANGE[0] < t < B.AUTO_T_RANGE[1]
  assert _in_bounds(r["lambda"])
  assert min(r["lambda"].values()) == pytest.approx(0.5, abs=1e-5)  # it sits on a bound
  lower = B.compute_lambda(real_scores(), tasks=TASKS, temperature=t * (1 - 1e-3))
  assert not _in_bounds(lower, tol=0.0)
  # The same T from the low-level function.
  c_out, c_in = B.outward_inward(B.contribution_matrix(real_scores(), TASKS))
  assert B.auto_temperature(c_out, c_in, B.difficulties(real_scores(), TASKS)) == pytest.approx(t)


def test_auto_temperature_lower_end_when_everything_is_feasible():
  # Nearly identical tasks: every weight is ~1 even at the lowest T of the range.
  t = B.auto_temperature(np.array([0.10, 0.11, 0.10]), np.array([0.2, 0.2, 0.21]),
                         np.array([0.3, 0.3, 0.3]))
  assert t == B.AUTO_T_RANGE[0]


def test_auto_temperature_impossible():
  # C[a→b] = (1.0 − 0)/(0.01 − 0) = 100: λ_out and λ_in push b to ~0 for every T ≤ 20.
  scores = {"mini": {"a": 0.5, "b": 0.0}, "a+mini": {"a": 0.6, "b": 1.0},
            "b+mini": {"a": 0.5, "b": 0.01}}
  with pytest.raises(ValueError, match=r"no T in \[0\.05, 20\] keeps every weight within "
                                       r"\[0\.5, 2\]"):
    B.compute_lambda(scores, tasks=["a", "b"], temperature="auto", alpha=(0.5, 0.5, 0.0))
  with pytest.raises(ValueError, match=r"no T in"):
    B.auto_temperature([0.0, 100.0], [0.0, 0.0], [0.0, 0.0], alpha=(1.0, 0.0, 0.0))


def test_auto_temperature_custom_range():
  t = B.auto_temperature([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], alpha=(1, 0, 0), t_range=(1.0, 5.0))
  # Two tasks, λ = 2·softmax([0, 1/T]): the larger is 2/(1 + e^{−1/T}) <= 2 always, the smaller
  # 2/(1 + e^{1/T}) >= 0.5 ⇔ e^{1/T} <= 3 ⇔ T >= 1/ln 3 = 0.9102 < 1: feasible at the lower end.
  assert t == 1.0
  t = B.auto_temperature([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], alpha=(1, 0, 0))
  assert t == pytest.approx(1 / math.log(3), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis).


@st.composite
def real_cases(draw) -> tuple[dict, list[str]]:
  """Random valid "real"-form scores: each task improves with its own data."""
  n = draw(st.integers(2, 5))
  tasks = [f"t{k}" for k in range(n)]
  unit = st.floats(0.0, 1.0, allow_nan=False)
  mini = [draw(st.floats(0.1, 1.0)) for _ in range(n)]
  gain = [draw(st.floats(0.05, 0.5)) for _ in range(n)]
  transfer = [[1.0 if i == j else 2 * draw(unit) - 1 for j in range(n)] for i in range(n)]
  scores = {"mini": dict(zip(tasks, mini))}
  for i, ti in enumerate(tasks):
    scores[f"{ti}+mini"] = {tj: mini[j] + transfer[i][j] * gain[j] for j, tj in enumerate(tasks)}
  return scores, tasks


PROPS = settings(max_examples=40, deadline=None)


@PROPS
@given(real_cases(), st.floats(0.05, 5.0))
def test_prop_components_average_one(case, temperature):
  scores, tasks = case
  r = B.balance_report(scores, tasks=tasks, temperature=temperature)
  for key in ("lambda_out", "lambda_in", "lambda_d", "lambda"):
    values = list(r[key].values())
    assert len(values) == len(tasks)
    assert np.mean(values) == pytest.approx(1.0, abs=1e-5)
    assert all(v > 0 and math.isfinite(v) for v in values)


@PROPS
@given(real_cases(), st.randoms(use_true_random=False))
def test_prop_permuting_tasks_permutes_lambda(case, rnd):
  scores, tasks = case
  perm = list(tasks)
  rnd.shuffle(perm)
  lam = B.compute_lambda(scores, tasks=tasks)
  lam_perm = B.compute_lambda(scores, tasks=perm)
  assert list(lam_perm) == perm
  _close([lam_perm[t] for t in tasks], [lam[t] for t in tasks])
  c = np.asarray(B.contribution_matrix(scores, tasks))
  c_perm = np.asarray(B.contribution_matrix(scores, perm))
  idx = [tasks.index(t) for t in perm]
  _close(c_perm, c[np.ix_(idx, idx)], atol=1e-5)


@PROPS
@given(real_cases())
def test_prop_large_temperature_gives_ones(case):
  scores, tasks = case
  lam = B.compute_lambda(scores, tasks=tasks, temperature=1e6)
  _close(list(lam.values()), [1.0] * len(tasks), atol=1e-5)


@PROPS
@given(real_cases(), st.data())
def test_prop_c_invariant_to_per_task_affine_rescale(case, data):
  scores, tasks = case
  a = {t: data.draw(st.floats(0.5, 5.0)) for t in tasks}
  b = {t: data.draw(st.floats(-2.0, 2.0)) for t in tasks}
  rescaled = {m: {t: a[t] * v + b[t] for t, v in row.items()} for m, row in scores.items()}
  _close(B.contribution_matrix(rescaled, tasks), B.contribution_matrix(scores, tasks),
         rtol=1e-4, atol=2e-4)


@PROPS
@given(real_cases(), st.data())
def test_prop_d_invariant_to_per_task_scaling(case, data):
  scores, tasks = case
  a = {t: data.draw(st.floats(0.01, 100.0)) for t in tasks}
  scaled = {m: {t: a[t] * v for t, v in row.items()} for m, row in scores.items()}
  _close(B.difficulties(scaled, tasks), B.difficulties(scores, tasks), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(real_cases(), st.sampled_from([(0.25, 0.25, 0.5), (1.0, 0.0, 0.0), (0.2, 0.6, 0.2)]))
def test_prop_auto_temperature_is_lowest_feasible(case, alpha):
  scores, tasks = case
  # float64 throughout, so that the bounds can be checked without a rounding tolerance.
  with jax.enable_x64(True):
    r = B.balance_report(scores, tasks=tasks, temperature="auto", alpha=alpha)
    t = r["temperature"]
    assert B.AUTO_T_RANGE[0] <= t <= B.AUTO_T_RANGE[1]
    assert _in_bounds(r["lambda"], tol=1e-12)
    if t > B.AUTO_T_RANGE[0]:
      lower = B.compute_lambda(scores, tasks=tasks, temperature=t * (1 - 1e-4), alpha=alpha)
      assert not _in_bounds(lower, tol=0.0)


def _np_reference(scores: dict, tasks: list[str], temperature: float,
                  alpha=(0.25, 0.25, 0.5)) -> np.ndarray:
  """docs/method.md §3–5 in float64 numpy, written independently of the library."""
  n = len(tasks)
  v = np.array([[scores[f"{ti}+mini"][tj] for tj in tasks] for ti in tasks], np.float64)
  m = np.array([scores["mini"][t] for t in tasks], np.float64)
  c = (v - m) / (np.diag(v) - m)
  c_out = (c.sum(1) - np.diag(c)) / (n - 1)
  c_in = (c.sum(0) - np.diag(c)) / (n - 1)
  d = 1 - m / np.diag(v)

  def nsm(x):
    e = np.exp(x / temperature - np.max(x / temperature))
    return n * e / e.sum()
  return alpha[0] * nsm(c_out) + alpha[1] * nsm(-c_in) + alpha[2] * nsm(d)


@PROPS
@given(real_cases(), st.floats(0.1, 5.0))
def test_prop_matches_float64_reference(case, temperature):
  scores, tasks = case
  lam = B.compute_lambda(scores, tasks=tasks, temperature=temperature)
  _close(_vals(lam, tasks), _np_reference(scores, tasks, temperature), rtol=1e-4, atol=1e-5)


_JITTED = jax.jit(lambda s, tasks: B.compute_lambda(s, tasks=tasks), static_argnums=1)


@settings(max_examples=20, deadline=None)
@given(real_cases())
def test_prop_jit_matches_eager(case):
  scores, tasks = case
  eager = B.compute_lambda(scores, tasks=tasks)
  jitted = _JITTED(scores, tuple(tasks))
  _close([jitted[t] for t in tasks], _vals(eager, tasks), rtol=1e-5, atol=1e-6)


def _weighted_lambda(scores: dict, weights: jax.Array, tasks: tuple[str, ...]) -> jax.Array:
  lam = B.compute_lambda(scores, tasks=tasks)
  return jnp.stack([lam[t] for t in tasks]) @ weights


# Jitted so that hypothesis examples with the same number of tasks share one compilation.
_GRAD = jax.jit(jax.grad(_weighted_lambda), static_argnums=2)
_OBJECTIVE = jax.jit(_weighted_lambda, static_argnums=2)


@settings(max_examples=30, deadline=None)
@given(real_cases(), st.integers(0, 2**31 - 1))
def test_prop_grad_matches_finite_differences(case, seed):
  scores, tasks = case
  tasks = tuple(tasks)
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=len(tasks))
  direction = jax.tree.map(lambda _: float(rng.normal()), scores)

  grad = _GRAD(scores, jnp.asarray(weights, jnp.float32), tasks)
  leaves = [float(g) for g in jax.tree.leaves(grad)]
  assert all(np.isfinite(g) for g in leaves)
  directional = sum(g * d for g, d in zip(leaves, jax.tree.leaves(direction)))
  # Central difference along `direction`, in float64 so that h can be small.
  h = 1e-6
  with jax.enable_x64(True):
    w64 = jnp.asarray(weights, jnp.float64)
    plus = _OBJECTIVE(jax.tree.map(lambda v, d: v + h * d, scores, direction), w64, tasks)
    minus = _OBJECTIVE(jax.tree.map(lambda v, d: v - h * d, scores, direction), w64, tasks)
    fd = float((plus - minus) / (2 * h))
  scale = max(1.0, float(np.sqrt(sum(g ** 2 for g in leaves))))
  assert directional == pytest.approx(fd, rel=1e-3, abs=1e-4 * scale)


def test_grad_hand_example_single_entry():
  # ∂λ/∂V_c(mini) by autodiff vs a float64 central difference on that one score.
  def lam_c(v):
    s = real_scores()
    s["mini"]["c"] = v
    return B.compute_lambda(s, tasks=TASKS)["c"]
  g = float(jax.grad(lam_c)(0.2))
  with jax.enable_x64(True):
    fd = (lam_c(0.2 + 1e-6) - lam_c(0.2 - 1e-6)) / 2e-6
  assert np.isfinite(g) and g == pytest.approx(fd, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# drop: columns of C left out of C_out / C_in (noisy own-data gain), and noisy_units.

# Hand example, drop=["b"] (C is EXPECTED_C, reported in full):
# C_out[i] = mean over the non-dropped j ≠ i:  a: C[a→c] = −0.25,
#   b: (C[b→a] + C[b→c])/2 = (0.5 + 0.125)/2 = 0.3125,  c: C[c→a] = −0.5.
# C_in = [(0.5 − 0.5)/2, 0 (dropped), (−0.25 + 0.125)/2] = [0, 0, −0.0625]; D unchanged.
# λ_out = 3·softmax([−0.5, 0.625, −1.0]): exp = [0.606531, 1.868246, 0.367879], sum 2.842656
#   → [0.640103, 1.971655, 0.388242].
# λ_in = 3·softmax([0, 0, 0.125]): exp = [1, 1, 1.133148], sum 3.133148 → [0.957503, 0.957503,
#   1.084993].
# λ = 0.25·λ_out + 0.25·λ_in + 0.5·λ_D = [0.752985, 1.121204, 1.125810].
DROP_B_C_OUT = [-0.25, 0.3125, -0.5]
DROP_B_C_IN = [0.0, 0.0, -0.0625]


def test_drop_hand_example():
  r = B.balance_report(real_scores(), tasks=TASKS, drop=["b"])
  _close(r["C"], EXPECTED_C)  # C itself is reported in full
  _close(_vals(r["c_out"]), DROP_B_C_OUT)
  _close(_vals(r["c_in"]), DROP_B_C_IN)
  _close(_vals(r["d"]), EXPECTED_D)
  _close(_vals(r["lambda_out"]), _n_softmax([-0.5, 0.625, -1.0]))
  _close(_vals(r["lambda_in"]), _n_softmax([0.0, 0.0, 0.125]))
  _close(_vals(r["lambda_d"]), EXPECTED_L_D)
  _close(_vals(r["lambda_out"]), [0.640103, 1.971655, 0.388242], atol=2e-6)
  _close(_vals(r["lambda_in"]), [0.957503, 0.957503, 1.084993], atol=2e-6)
  _close(_vals(r["lambda"]), [0.752985, 1.121204, 1.125810], atol=2e-6)
  assert set(r) == REPORT_KEYS
  lam = B.compute_lambda(real_scores(), tasks=TASKS, drop=("b",))
  _close(_vals(lam), _vals(r["lambda"]))


def test_drop_two_and_all_units():
  # drop a and b: C_out[a] = C[a→c] = −0.25, C_out[b] = C[b→c] = 0.125, C_out[c] = 0 (no kept
  # receiver left); C_in = [0, 0, −0.0625].
  r = B.balance_report(real_scores(), tasks=TASKS, drop=["a", "b"])
  _close(_vals(r["c_out"]), [-0.25, 0.125, 0.0])
  _close(_vals(r["c_in"]), [0.0, 0.0, -0.0625])
  r = B.balance_report(real_scores(), tasks=TASKS, drop=TASKS)
  _close(_vals(r["c_out"]) + _vals(r["c_in"]), [0.0] * 6)
  _close(_vals(r["lambda_out"]) + _vals(r["lambda_in"]), [1.0] * 6)


def test_drop_nothing_is_the_default():
  assert B.balance_report(real_scores(), tasks=TASKS, drop=[]) == \
      B.balance_report(real_scores(), tasks=TASKS)


def test_drop_low_level():
  c_out, c_in = B.outward_inward(jnp.asarray(EXPECTED_C), dropped=np.array([False, True, False]))
  _close(c_out, DROP_B_C_OUT)
  _close(c_in, DROP_B_C_IN)
  with pytest.raises(ValueError, match=r"dropped must be a boolean vector of length 3"):
    B.outward_inward(jnp.asarray(EXPECTED_C), dropped=[True, False])


def test_drop_groups_and_fixed():
  tasks = ["a1", "b", "a2", "c", "chat"]
  r = B.balance_report(group_scores(), tasks=tasks, groups=GROUPS, fixed={"chat": 1.0},
                       drop=["B"])
  _close(_vals(r["c_out"], "ABC"), DROP_B_C_OUT, atol=1e-5)
  _close(_vals(r["c_in"], "ABC"), DROP_B_C_IN, atol=1e-5)
  assert r["lambda"]["chat"] == 1.0
  with pytest.raises(ValueError, match=r"drop names \['b'\], which are not balanced groups"):
    B.balance_report(group_scores(), tasks=tasks, groups=GROUPS, fixed={"chat": 1.0}, drop=["b"])
  with pytest.raises(ValueError, match=r"drop names \['chat'\], which are not balanced tasks"):
    B.balance_report(real_scores(), tasks=TASKS + ["chat"], fixed={"chat": 1.0}, drop=["chat"])


@pytest.mark.parametrize("drop, match", [
    (["zz", "a", "yy"],
     r"drop names \['zz', 'yy'\], which are not balanced tasks \['a', 'b', 'c'\]"),
    ("b", r"drop must be a sequence"),
    ([1], r"drop must name balanced tasks \(strings\)"),
    (None, r"drop must be a sequence"),
])
def test_drop_bad(drop, match):
  with pytest.raises(ValueError, match=match):
    B.compute_lambda(real_scores(), tasks=TASKS, drop=drop)


def test_drop_jit_and_grad():
  f = jax.jit(lambda s: _as_vector(B.compute_lambda(s, tasks=TASKS, drop=["b"])))
  _close(f(real_scores()), [0.752985, 1.121204, 1.125810], atol=2e-6)
  grad = jax.grad(lambda s: B.compute_lambda(s, tasks=TASKS, drop=["b"])["c"])(real_scores())
  leaves = [float(g) for g in jax.tree.leaves(grad)]
  assert all(np.isfinite(leaves)) and any(g != 0 for g in leaves)
  # V_b(a+mini) and V_b(c+mini) only enter column b of C (C[a→b], C[c→b]): dropped, they no
  # longer matter; b's own row does: C[b→a] still counts in C_out[b].
  assert float(grad["a+mini"]["b"]) == 0 and float(grad["c+mini"]["b"]) == 0
  assert float(grad["b+mini"]["a"]) != 0
  full = jax.grad(lambda s: B.compute_lambda(s, tasks=TASKS)["c"])(real_scores())
  assert float(full["a+mini"]["b"]) != 0


def test_drop_with_on_degenerate_warn():
  # b did not improve: "warn" zeroes its column but averages over N − 1; dropping it as well
  # leaves the column out of the means, as in the hand example.
  with pytest.warns(B.DegenerateScoresWarning):
    r = B.balance_report(_bad_b(), tasks=TASKS, on_degenerate="warn", drop=["b"])
  assert [row[1] for row in r["C"]] == [0.0, 1.0, 0.0]
  assert r["c_in"]["b"] == 0.0


def test_noisy_units():
  gain = {"a": [0.01, 0.2], "b": [-0.01, 0.03], "c": [0.0, 0.1], "d": [-0.2, 0.0],
          "e": [-0.3, -0.1]}
  assert B.noisy_units(gain) == ["b", "c", "d"]
  assert B.noisy_units({}) == []
  with pytest.raises(ValueError, match=r"gain interval of 'a' must be \[lo, hi\]"):
    B.noisy_units({"a": [0.1]})
  with pytest.raises(ValueError, match=r"lo <= hi"):
    B.noisy_units({"a": [0.2, 0.1]})
  with pytest.raises(ValueError, match=r"finite"):
    B.noisy_units({"a": [float("nan"), 0.1]})


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1),
       st.sampled_from([(0.25, 0.25, 0.5), (1.0, 0.0, 0.0), (0.2, 0.6, 0.2)]))
def test_prop_auto_temperature_batch_matches_scalar(n, seed, alpha):
  # Rows of every kind: feasible at the lower end, in between, and infeasible (spread ~ 100).
  rng = np.random.default_rng(seed)
  scale = np.array([0.01, 0.3, 1.0, 3.0, 100.0])[:, None, None]
  x = rng.normal(size=(5, 3, n)) * scale
  t, feasible = B.auto_temperature_batch(x[:, 0], x[:, 1], x[:, 2], alpha=alpha)
  for r in range(x.shape[0]):
    try:
      expected = B.auto_temperature(x[r, 0], x[r, 1], x[r, 2], alpha=alpha)
    except ValueError:
      assert not feasible[r] and t[r] == B.AUTO_T_RANGE[1]
    else:
      assert feasible[r] and t[r] == expected
