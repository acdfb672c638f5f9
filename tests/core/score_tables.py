"""Score tables and a reference loop step shared by the balancing, bootstrap, replicate and
shrinkage tests (imported as `score_tables`: tests/core is on sys.path under pytest)."""

from __future__ import annotations

import warnings

from visatb_jax.core import balancing as B

TASKS = ["a", "b", "c"]
UNIT_KEYS = ("c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d", "lambda", "gain")
# The "real" form's table of tests/core/test_balancing.py.
REAL = {
    "mini":   {"a": 0.50, "b": 0.40, "c": 0.20},
    "a+mini": {"a": 0.70, "b": 0.45, "c": 0.10},
    "b+mini": {"a": 0.60, "b": 0.60, "c": 0.25},
    "c+mini": {"a": 0.40, "b": 0.40, "c": 0.60},
}


def append_resample(out: dict, means: dict, units: list, lambda_tasks: list, **kw) -> None:
  """One resample of a plain reference loop: balance_report on its means (on_degenerate="warn",
  warnings silenced), appended to `out` key by key (λ read at `lambda_tasks`, one per unit)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", B.DegenerateScoresWarning)
    warnings.simplefilter("ignore", B.TemperatureAtBoundWarning)
    rep = B.balance_report(means, on_degenerate="warn", **kw)
  out["C"].append(rep["C"])
  for key in UNIT_KEYS[:-2]:
    out[key].append([rep[key][u] for u in units])
  out["lambda"].append([rep["lambda"][t] for t in lambda_tasks])
  out["temperature"].append(rep["temperature"])
