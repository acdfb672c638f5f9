"""Run report: `report/report.md` plus PNG plots, built from what the pipeline wrote.

Every input is optional, so the report can be regenerated at any point of a run (a partial run
simply says which parts are not available yet). `write_report` first has comparison.py compute
`report/comparison.json` (ΔI%/ΔE% against STL, differences to EW) from the run directory, then
renders; nothing here computes a comparison. Nothing here imports jax: the report is cheap to
rebuild from the command line, `python -m visatb_jax.report WORKDIR`.

When `lambda.json` carries bootstrap intervals (`visatb_jax.core.bootstrap.bootstrap_report`), the
tables show "value [low, high]", the λ chart has error bars, the contribution heatmap hatches the
entries whose interval contains 0, and a paragraph says in plain words what the intervals allow to
conclude. Without intervals the report is rendered as before.

Plots are drawn on bare `matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state),
rendered into memory and written atomically like every other output of a run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import patches as mpatches
from matplotlib import patheffects
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from visatb_jax.pipeline.comparison import (COMPARISON_JSON, UNTRAINED, build_comparison,
                                            corpus_summary, higher_is_better, read_metrics,
                                            zero_shot_tasks)
from visatb_jax.pipeline.comparison import is_number as _is_number
from visatb_jax.pipeline.comparison import load_json as _load_json
from visatb_jax.pipeline.comparison import ordered_keys as _ordered_keys
from visatb_jax.runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

LAMBDA_PNG = "lambda.png"
CONTRIBUTION_PNG = "contribution.png"
LOSS_CURVES_PNG = "loss_curves.png"
REPORT_MD = "report.md"

REPORT_STAGE = "report"

_MISSING = "—"
# Order of the λ components in tables and in the bar chart: (balance-report key, label).
_COMPONENTS = (("lambda_out", "λ_out"), ("lambda_in", "λ_in"), ("lambda_d", "λ_D"))
# Marks a C entry whose interval contains 0, in the markdown table.
_ZERO_MARK = "†"
# Hatch of the heatmap cells whose interval contains 0.
_ZERO_HATCH = "///"


@dataclasses.dataclass
class RunFiles:
  """Everything the report reads from a run directory; None / empty where not written yet."""
  workdir: str
  balance: dict | None = None
  validation: dict | None = None
  test: dict | None = None
  comparison: dict | None = None
  manifest: dict | None = None
  data_stats: dict | None = None
  final_runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  prep_runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  config: dict | None = None
  validation_samples: dict | None = None
  test_samples: dict | None = None
  test_reports: dict | None = None


# ----------------------------------------------------------------------------------------------
# Reading the run directory.


def _load_runs(parent: str) -> dict[str, list[dict]]:
  """{run name: metrics records} for every `parent/<name>/metrics.jsonl`, sorted by name."""
  if not os.path.isdir(parent):
    return {}
  runs = {}
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name, "metrics.jsonl")
    if os.path.isfile(path):
      records = read_metrics(path)
      if records:
        runs[name] = records
  return runs


def load_run(workdir: str) -> RunFiles:
  """Reads every report input present in `workdir`."""
  join = lambda *parts: os.path.join(workdir, *parts)
  return RunFiles(
      workdir=workdir,
      balance=_load_json(join("lambda.json")),
      validation=_load_json(join("scores", "validation.json")),
      test=_load_json(join("scores", "test.json")),
      comparison=_load_json(join("report", COMPARISON_JSON)),
      manifest=_load_json(join("manifest.json")),
      data_stats=_load_json(join("data_stats.json")),
      final_runs=_load_runs(join("final")),
      prep_runs=_load_runs(join("prep")),
      config=_load_json(join("config.json")),
      validation_samples=_load_json(join("scores", "validation_samples.json")),
      test_samples=_load_json(join("scores", "test_samples.json")),
      test_reports=_load_json(join("scores", "test_reports.json")),
  )


# ----------------------------------------------------------------------------------------------
# Markdown helpers.


def _fmt(value: Any, digits: int = 4) -> str:
  """A table cell: floats to `digits` significant digits, missing values as a dash."""
  if value is None:
    return _MISSING
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.{digits}g}"
  if isinstance(value, (list, tuple)):
    return ", ".join(_fmt(v, digits) for v in value)
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True)
  return str(value)


def _cell(text: str) -> str:
  # A literal pipe or newline would break the row.
  return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
  align = [":---"] + ["---:"] * (len(header) - 1)
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _not_available(what: str, source: str) -> str:
  return f"_{what} not available yet (`{source}` not found)._"


def _method_order(methods: Sequence[str]) -> list[str]:
  """STL and EW first, the other methods in their order, "untrained" last (it is no method)."""
  ordered = _ordered_keys([dict.fromkeys(methods)], ["stl", "ew"])
  return [m for m in ordered if m != UNTRAINED] + [m for m in ordered if m == UNTRAINED]


def _tasks_hint(run: RunFiles) -> list[str]:
  """The run's task order (balance report, else config) to lay out task columns consistently."""
  if run.balance and isinstance(run.balance.get("tasks"), list):
    return list(run.balance["tasks"])
  if run.config and isinstance(run.config.get("task_order"), list):
    return list(run.config["task_order"])
  return []


def _unit_lambda(balance: Mapping, unit: str) -> float | None:
  """Final λ of a balanced unit: its own entry, or the λ its group's tasks received."""
  return _unit_entry(balance.get("lambda") or {}, balance, unit)


def _unit_entry(per_task: Mapping[str, Any], balance: Mapping, unit: str) -> Any | None:
  """A unit's entry of a {task: value} mapping: its own, or that of its group's first task."""
  if unit in per_task:
    return per_task[unit]
  members = [t for t, g in (balance.get("groups") or {}).items() if g == unit]
  for task in members:
    if task in per_task:
      return per_task[task]
  return None


def _group_members(balance: Mapping) -> dict[str, list[str]]:
  """group → its tasks, from the report's task → group mapping (fixed tasks map to None)."""
  members: dict[str, list[str]] = {}
  for task, group in (balance.get("groups") or {}).items():
    if group is not None:
      members.setdefault(group, []).append(task)
  return members


def _matrix(balance: Mapping) -> np.ndarray | None:
  """C as a float array of shape [units, units], or None if absent or malformed."""
  units = balance.get("balanced") or []
  try:
    c = np.asarray(balance.get("C"), dtype=np.float64)
  except (TypeError, ValueError):
    return None
  if c.shape != (len(units), len(units)) or not units:
    return None
  return c


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals of the balance report.


def _as_interval(value: Any) -> tuple[float, float] | None:
  """[low, high] as a float pair, or None when absent or malformed."""
  if (isinstance(value, (list, tuple)) and len(value) == 2
      and all(_is_number(v) for v in value)):
    return float(value[0]), float(value[1])
  return None


def _intervals(balance: Mapping) -> dict:
  """The balance report's "intervals" ({} for a report without bootstrap)."""
  intervals = balance.get("intervals")
  return intervals if isinstance(intervals, Mapping) else {}


def _interval(balance: Mapping, key: str, unit: str) -> tuple[float, float] | None:
  """Interval of a per-unit quantity (`key` as in the report: "c_out", "lambda_d", ...)."""
  per_unit = _intervals(balance).get(key)
  return _as_interval(per_unit.get(unit)) if isinstance(per_unit, Mapping) else None


def _unit_lambda_interval(balance: Mapping, unit: str) -> tuple[float, float] | None:
  """Interval of a unit's final λ (its own task's, or its group's tasks')."""
  per_task = _intervals(balance).get("lambda")
  if not isinstance(per_task, Mapping):
    return None
  return _as_interval(_unit_entry(per_task, balance, unit))


def contribution_intervals(balance: Mapping) -> np.ndarray | None:
  """C's intervals as an array of shape [units, units, 2] (low, high), or None if absent."""
  n = len(balance.get("balanced") or [])
  try:
    bounds = np.asarray(_intervals(balance).get("C"), dtype=np.float64)
  except (TypeError, ValueError):
    return None
  if n == 0 or bounds.shape != (n, n, 2):
    return None
  return bounds


def zero_in_interval(bounds: np.ndarray) -> np.ndarray:
  """Boolean mask of the [..., 2] intervals that contain 0 (sign not established)."""
  return (bounds[..., 0] <= 0.0) & (bounds[..., 1] >= 0.0)


def _fmt_interval(value: Any, interval: tuple[float, float] | None, digits: int = 4) -> str:
  """"value [low, high]", or the value alone without (or with a zero-width) interval.

  The bounds get one significant digit less than the value: they are rougher than it.
  """
  text = _fmt(value, digits)
  if interval is None or (interval[0] == interval[1] == value):
    return text
  bound = max(2, digits - 1)
  return f"{text} [{_fmt(interval[0], bound)}, {_fmt(interval[1], bound)}]"


def _fmt_level(level: Any) -> str:
  return f"{100.0 * level:g} %" if _is_number(level) else "bootstrap"


def interval_note(balance: Mapping) -> str | None:
  """The one sentence saying what the intervals are; None without intervals."""
  if not _intervals(balance):
    return None
  boot = balance.get("bootstrap") if isinstance(balance.get("bootstrap"), Mapping) else {}
  level, resamples = boot.get("level"), boot.get("resamples")
  replicates = boot.get("replicates")
  what = ("the preparation runs' replicates and the validation samples (two-level: training "
          "and sampling variance)" if _is_number(replicates) and replicates > 1
          else "the validation samples")
  text = f"Intervals: {_fmt_level(level)} paired-bootstrap intervals"
  text += (f" over {resamples} resamples of {what}" if _is_number(resamples)
           else f" over resamples of {what}")
  if _is_number(replicates) and replicates > 1:
    text += f"; every preparation model was trained {replicates} times"
  details = []
  if _is_number(boot.get("seed")):
    details.append(f"seed {boot['seed']}")
  samples = boot.get("samples")
  if isinstance(samples, Mapping) and samples:
    details.append("n = " + ", ".join(f"{t} {n}" for t, n in samples.items()))
  if details:
    text += f" ({'; '.join(details)})"
  text += "."
  # Resamples the maths had to patch up: many of them mean the intervals are rough.
  for key, what in (("degenerate_resamples", "needed a degenerate-data mask"),
                    ("infeasible_temperature_resamples", "had no feasible automatic T")):
    if _is_number(boot.get(key)) and boot[key] > 0:
      text += f" {boot[key]} resamples {what}."
  return text


def _fmt_weight(value: float, interval: tuple[float, float]) -> str:
  return f"λ = {value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def uncertainty_paragraph(balance: Mapping) -> str | None:
  """Plain words on what the intervals establish; None without intervals.

  Which balanced tasks' weights are distinguishable from 1 (equal weighting: the interval excludes
  1), which are not, and which units' own-data gain is within noise (its interval contains 0).
  """
  per_task = _intervals(balance).get("lambda")
  if not isinstance(per_task, Mapping):
    per_task = {}
  fixed = balance.get("fixed") or {}
  lam = balance.get("lambda") or {}
  clear, unclear = [], []
  for task in _ordered_keys([lam], balance.get("tasks") or []):
    interval, value = _as_interval(per_task.get(task)), lam.get(task)
    if task in fixed or interval is None or not _is_number(value):
      continue
    if interval[0] > 1.0:
      clear.append(f"{task} is up-weighted: {_fmt_weight(value, interval)}")
    elif interval[1] < 1.0:
      clear.append(f"{task} is down-weighted: {_fmt_weight(value, interval)}")
    else:
      unclear.append(f"{task} ({_fmt_weight(value, interval)})")
  sentences = []
  if clear:
    sentences.append("Weights distinguishable from 1 (equal weighting; the interval excludes 1): "
                     + "; ".join(clear) + ".")
  if unclear:
    sentences.append("Not distinguishable from 1 (the interval contains 1, so these tasks may "
                     "as well be weighted equally): " + "; ".join(unclear) + ".")
  sentences += _noise_sentences(balance)
  sentences += _bound_and_shrinkage_sentences(balance)
  return " ".join(sentences) if sentences else None


def _training_share(balance: Mapping, key: str, unit: str) -> float | None:
  """The share of a quantity's bootstrap variance that is training (between replicates)."""
  boot = balance.get("bootstrap") if isinstance(balance.get("bootstrap"), Mapping) else {}
  if not (_is_number(boot.get("replicates")) and boot["replicates"] > 1):
    return None
  share = (((balance.get("variance") or {}).get("training_share") or {}).get(key) or {})
  if not isinstance(share, Mapping):
    return None
  # λ's shares are per task: a unit's is its own, or its group's first task's.
  value = _unit_entry(share, balance, unit) if key == "lambda" else share.get(unit)
  return float(value) if _is_number(value) else None


def _bound_and_shrinkage_sentences(balance: Mapping) -> list[str]:
  """Which weights the automatic T left on a bound, and what the evidence rule did."""
  out = []
  at_bound = [u for u in balance.get("at_bound") or [] if isinstance(u, str)]
  if at_bound:
    out.append(f"On a bound: λ of {', '.join(at_bound)} sits on a bound of [0.5, 2] at the "
               f"automatic T = {_fmt(balance.get('temperature'), 3)}, so the bound, not the size "
               "of the differences, sets how far the weights are from 1.")
  shrink = balance.get("shrinkage")
  if isinstance(shrink, Mapping) and isinstance(shrink.get("factor"), Mapping):
    kept = {comp: {u: f for u, f in factors.items() if _is_number(f) and f > 0}
            for comp, factors in shrink["factor"].items() if isinstance(factors, Mapping)}
    names = {"c_out": "C_out", "c_in": "C_in", "d": "D"}
    parts = [f"{names.get(c, c)} of " + ", ".join(f"{u} ({f:.2f})" for u, f in k.items())
             for c, k in kept.items() if k]
    out.append("Evidence rule (docs/method.md §14): each component's deviation from the tasks' "
               "mean is kept by the factor max(0, 1 − 1/z²) of its bootstrap z-score; "
               + ("kept in part: " + "; ".join(parts) + "; every other deviation is within its "
                  "noise and set to the mean." if parts else
                  "every deviation is within its noise, so every component is at the mean and "
                  "λ is 1."))
    unlearned = [u for u in shrink.get("no_evidence") or [] if isinstance(u, str)]
    if unlearned:
      out.append(f"No evidence: the own-data gain of {', '.join(unlearned)} is not clearly above "
                 "0 (its preparation runs did not learn it), so its C_in and D, which are built "
                 "on that gain, are set to the other tasks' mean rather than read as an easy "
                 "task (docs/method.md §14).")
  return out


def dropped_units(balance: Mapping) -> list[str]:
  """Units whose column of C was left out of C_out / C_in ("dropped", or bootstrap "drop")."""
  boot = balance.get("bootstrap") if isinstance(balance.get("bootstrap"), Mapping) else {}
  names = balance.get("dropped") or boot.get("drop") or []
  return [u for u in names if isinstance(u, str)]


def _noise_sentences(balance: Mapping) -> list[str]:
  """What the "noisy" and dropped units of a bootstrap report mean."""
  out = []
  noisy = [u for u in balance.get("noisy") or [] if isinstance(u, str)]
  dropped = dropped_units(balance)
  if noisy:
    gains = []
    for unit in noisy:
      interval = _interval(balance, "gain", unit)
      value = (balance.get("gain") or {}).get(unit)
      gains.append(f"{unit} (gain = {_fmt_interval(value, interval, 3)})" if interval
                   else unit)
    kept = [u for u in noisy if u not in dropped]
    consequence = (f"the weights still rest on it through C_out and C_in ({', '.join(kept)} "
                   "not dropped)" if kept else "it is dropped from C_out and C_in")
    out.append(
        "Noisy own-data gain (its interval contains 0): " + ", ".join(gains) + ". Such a unit did "
        "not measurably improve with its own data; the contributions it receives (its column of "
        f"C) are divided by that gain and are mostly noise, and {consequence}. A larger "
        "validation set, a larger large subset or more preparation steps would help.")
  elif "noisy" in balance:
    out.append("Every unit's own-data gain is clearly above 0.")
  if dropped:
    out.append("Dropped: " + ", ".join(dropped) + " (a dropped unit's column of C is left out "
               "of every C_out and its C_in is 0; C itself is shown in full).")
  return out


# ----------------------------------------------------------------------------------------------
# Markdown sections.


def _summary_section(balance: dict | None) -> str:
  if balance is None:
    return "## Task balance\n\n" + _not_available("Balance report", "lambda.json")
  parts = ["## Task balance", _balance_settings(balance)]
  note, paragraph = interval_note(balance), uncertainty_paragraph(balance)
  if note or paragraph:
    parts.append("### Uncertainty\n\n" + "\n\n".join(p for p in (note, paragraph) if p))
  parts += ["### Weights per balanced unit", _lambda_table(balance),
            "### Final weight per task", _task_lambda_table(balance),
            "### Inter-task contribution C (row = contributor, column = receiver)",
            _contribution_table(balance)]
  return "\n\n".join(parts)


def _balance_settings(balance: Mapping) -> str:
  fixed = balance.get("fixed") or {}
  alpha = balance.get("alpha")
  temperature = _fmt_interval(balance.get("temperature"),
                              _as_interval(_intervals(balance).get("temperature")))
  lines = [
      f"- Tasks: {', '.join(balance.get('tasks') or [])}",
      f"- Balanced units: {', '.join(balance.get('balanced') or [])}",
      "- Fixed-weight tasks: "
      + (", ".join(f"{t} ({_fmt(w)})" for t, w in fixed.items()) if fixed else "none"),
      f"- Form: {balance.get('form', _MISSING)}",
      f"- Temperature T: {temperature}",
      f"- α (out, in, D): {_fmt(alpha)}",
  ]
  boot = balance.get("bootstrap") if isinstance(balance.get("bootstrap"), Mapping) else {}
  if boot.get("shrinkage"):
    lines.append(f"- Shrinkage: {boot['shrinkage']}"
                 + (" (docs/method.md §14, beyond the paper)" if boot["shrinkage"] == "evidence"
                    else " (the paper's λ)"))
  if _is_number(boot.get("replicates")):
    lines.append(f"- Replicates of each preparation model: {boot['replicates']}")
  members = _group_members(balance)
  if members:
    lines.append("- Groups: " + "; ".join(f"{g}: {', '.join(ts)}" for g, ts in members.items()))
  return "\n".join(lines)


def _lambda_table(balance: Mapping) -> str:
  # The gain column only for a bootstrap report (an old lambda.json renders as before).
  keys = ["c_out", "c_in", "d"] + [k for k, _ in _COMPONENTS]
  labels = ["C_out", "C_in", "D"] + [label for _, label in _COMPONENTS]
  if isinstance(balance.get("gain"), Mapping):
    keys.append("gain")
    labels.append("gain")
  units = list(balance.get("balanced") or [])
  # λ's training share when the intervals come from replicates (docs/method.md §13).
  shares = {u: _training_share(balance, "lambda", u) for u in units}
  with_share = any(v is not None for v in shares.values())
  rows = []
  for unit in units:
    cells = [_fmt_interval((balance.get(k) or {}).get(unit), _interval(balance, k, unit))
             for k in keys]
    cells.append(_fmt_interval(_unit_lambda(balance, unit), _unit_lambda_interval(balance, unit)))
    if with_share:
      cells.append(_MISSING if shares[unit] is None else f"{100 * shares[unit]:.0f} %")
    rows.append([unit] + cells)
  table = _md_table(["unit"] + labels + ["λ"] + (["λ training share"] if with_share else []),
                    rows)
  if with_share:
    table += ("\n\nλ training share: the part of λ's bootstrap variance that comes from "
              "retraining the preparation models (between replicates) rather than from the "
              "finite validation set; a high share says more replicates, not more validation "
              "samples, would narrow the interval.")
  return table


def _task_lambda_table(balance: Mapping) -> str:
  fixed = balance.get("fixed") or {}
  task_group = {t: g for t, g in (balance.get("groups") or {}).items() if g is not None}
  lam = balance.get("lambda") or {}
  per_task = _intervals(balance).get("lambda")
  per_task = per_task if isinstance(per_task, Mapping) else {}
  rows = []
  for task in _ordered_keys([lam], balance.get("tasks") or []):
    role = "fixed" if task in fixed else task_group.get(task, "balanced")
    rows.append([task, _fmt_interval(lam.get(task), _as_interval(per_task.get(task))), role])
  return _md_table(["task", "λ", "role"], rows)


def _contribution_table(balance: Mapping) -> str:
  c = _matrix(balance)
  if c is None:
    return "_C matrix missing or malformed in `lambda.json`._"
  units = balance["balanced"]
  bounds = contribution_intervals(balance)
  rows = []
  for i, u in enumerate(units):
    row = [f"{u} →"]
    for j, v in enumerate(c[i]):
      if bounds is None:
        row.append(_fmt(float(v)))
        continue
      interval = (float(bounds[i, j, 0]), float(bounds[i, j, 1]))
      mark = _ZERO_MARK if zero_in_interval(bounds[i, j]) else ""
      row.append(_fmt_interval(float(v), interval) + mark)
    rows.append(row)
  table = _md_table(["contributor \\ receiver"] + list(units), rows)
  if bounds is not None and np.any(zero_in_interval(bounds)):
    table += (f"\n\n{_ZERO_MARK} the interval contains 0: the sign of this contribution is not "
              "established (hatched in the heatmap).")
  return table


def sample_counts(samples: Any) -> dict[str, str]:
  """{task: "n = 100"} from per-sample scores {model: {task: {sample_id: score}}}.

  Models scored on different numbers of samples of a task give a range ("n = 90–100").
  """
  counts: dict[str, set[int]] = {}
  if not isinstance(samples, Mapping):
    return {}
  for per_task in samples.values():
    if not isinstance(per_task, Mapping):
      continue
    for task, scores in per_task.items():
      if isinstance(scores, Mapping):
        counts.setdefault(task, set()).add(len(scores))
  out = {}
  for task, ns in counts.items():
    low, high = min(ns), max(ns)
    out[task] = f"n = {low}" if low == high else f"n = {low}–{high}"
  return out


def _score_table(scores: Mapping[str, Mapping[str, float]], row_order: Sequence[str],
                 task_order: Sequence[str], highlight: bool, row_label: str,
                 directions: Mapping[str, Any] | None = None,
                 counts: Mapping[str, str] | None = None) -> str:
  """Rows = models / methods, columns = tasks; optionally the best value per task in bold.

  `directions` ({task: higher_is_better}) decides whether the best is the largest (the default)
  or the smallest value; `counts` ({task: "n = ..."}) goes into the column headers.
  """
  rows_keys = _ordered_keys([scores], row_order)
  tasks = _ordered_keys(list(scores.values()), task_order)
  best = {}
  for t in tasks:
    # The untrained model is a reference, not a contender for the best score.
    values = [scores[r][t] for r in rows_keys
              if r != UNTRAINED and _is_number(scores[r].get(t))]
    pick = min if (directions or {}).get(t) is False else max
    best[t] = pick(values) if values else None
  rows = []
  for r in rows_keys:
    row = [r]
    for t in tasks:
      v = scores[r].get(t)
      text = _fmt(v)
      if highlight and r != UNTRAINED and _is_number(v) and v == best[t]:
        text = f"**{text}**"
      row.append(text)
    rows.append(row)
  header = [f"{t} ({counts[t]})" if counts and t in counts else t for t in tasks]
  return _md_table([row_label] + header, rows)


def _validation_section(validation: dict | None, tasks: Sequence[str],
                        samples: Any = None) -> str:
  title = "## Validation scores (preparation models × tasks)"
  if validation is None:
    return f"{title}\n\n" + _not_available("Validation scores", "scores/validation.json")
  # The paper's order: the reference model first, then one `<task>+mini` per task.
  order = ["base", "mini"] + [f"{t}+mini" for t in tasks] + list(tasks)
  return f"{title}\n\n" + _score_table(validation, order, tasks, highlight=False,
                                       row_label="model", counts=sample_counts(samples))


def _test_section(test: dict | None, tasks: Sequence[str], config: Mapping | None = None,
                  samples: Any = None) -> str:
  title = "## Test scores (methods × tasks)"
  if test is None:
    return f"{title}\n\n" + _not_available("Test scores", "scores/test.json")
  task_cols = _ordered_keys(list(test.values()), tasks)
  directions = higher_is_better(config, task_cols)
  lower = [t for t in task_cols if directions[t] is False]
  direction = ("Higher is better" if not lower
               else f"Higher is better, except for {', '.join(lower)} (lower is better)")
  note = (f"{direction}; the best score per task is in **bold**. `stl` holds, per task, the "
          f"single-task model's score on its own task; `{UNTRAINED}` is the model before "
          "training.")
  zero = [t for t in zero_shot_tasks(config) if t in task_cols]
  if zero:
    note += (f" Zero-shot tasks (evaluated, never trained on; no STL model): {', '.join(zero)}.")
  skipped = zero_shot_skipped(config)
  if skipped:
    note += f" Zero-shot tasks not scored: {skipped}."
  return f"{title}\n\n{note}\n\n" + _score_table(
      test, _method_order(list(test)), tasks, highlight=True, row_label="method",
      directions=directions, counts=sample_counts(samples))


def zero_shot_skipped(config: Mapping | None) -> str | None:
  """Why the config's zero-shot suite was not scored (an empty zero_shot_root), or None."""
  why = (config or {}).get("zero_shot_skipped")
  return why if isinstance(why, str) and why else None


def _pope_table(per_model: Mapping[str, Mapping[str, Mapping]]) -> str:
  rows = []
  for model in _method_order(list(per_model)):
    for split, r in per_model[model].items():
      rows.append([model, split] + [_fmt(r.get(k)) for k in
                                    ("f1", "accuracy", "precision", "recall", "yes_ratio")])
  return _md_table(["model", "split", "F1", "accuracy", "precision", "recall", "yes-ratio"], rows)


def _mme_table(per_model: Mapping[str, Mapping[str, Any]]) -> str:
  rows = [[model, _fmt(r.get("perception"), 5), _fmt(r.get("cognition"), 5),
           ", ".join(r.get("missing") or []) or "none"]
          for model, r in ((m, per_model[m]) for m in _method_order(list(per_model)))]
  return _md_table(["model", "perception (of 2000)", "cognition (of 800)",
                    "subtasks without questions"], rows)


def _benchmark_section(reports: Mapping | None) -> str | None:
  """POPE's and MME's own metrics (scores/test_reports.json), as their evaluations print them;
  None for a run without such a task."""
  summary = corpus_summary(reports)
  if not (summary["pope"] or summary["mme"] or summary["errors"]):
    return None
  parts = ["## POPE and MME as their evaluations report them",
           "The test scores above are per-sample means (POPE's and MME's accuracy), which ΔI and "
           "ΔI_zero use (docs/method.md §8). POPE's evaluation prints F1, accuracy, precision, "
           "recall and the fraction of answers read as \"yes\" per negative sampling (random, "
           "popular, adversarial; \"mean\" is their mean, the F1 LLaVA-1.5's tables give); MME's "
           "prints the perception and cognition totals, sums of its subtasks' accuracy + "
           "accuracy+ (×100). Each is computed from the per-sample test scores."]
  for task, per_model in summary["pope"].items():
    parts.append(f"**{task}** (POPE)\n\n" + _pope_table(per_model))
  for task, per_model in summary["mme"].items():
    parts.append(f"**{task}** (MME)\n\n" + _mme_table(per_model))
  if summary["errors"]:
    parts.append("Not computed:\n\n" + "\n".join(f"- {e}" for e in summary["errors"]))
  return "\n\n".join(parts)


def _comparison_section(comparison: dict | None, tasks: Sequence[str]) -> str:
  title = "## Comparison with single-task learning (STL)"
  if comparison is None:
    return f"{title}\n\n" + _not_available("Comparison", "scores/test.json")
  if not comparison:
    return f"{title}\n\n_No STL scores in `scores/test.json`: nothing to compare against._"
  per_task = [m.get("per_task") or {} for m in comparison.values()]
  task_cols = _ordered_keys(per_task, tasks)
  zero_cols = _ordered_keys([m.get("per_task_zero") or {} for m in comparison.values()])
  # The zero-shot columns only for a run with zero-shot tasks: other reports render as before.
  has_zero = any("delta_i_zero" in m or "zero_shot_error" in m for m in comparison.values())
  rows, errors = [], []
  for method in _method_order(list(comparison)):
    m = comparison[method]
    pt, pz = m.get("per_task") or {}, m.get("per_task_zero") or {}
    ratio = m.get("step_time_vs_ew")
    rows.append([method, _fmt(m.get("delta_i")), _fmt(m.get("delta_e"))]
                + ([_fmt(m.get("delta_i_zero"))] if has_zero else [])
                + ["" if ratio is None else f"{ratio:.2f}×"]
                + [_fmt(pt.get(t)) for t in task_cols] + [_fmt(pz.get(t)) for t in zero_cols])
    if m.get("error"):
      errors.append(f"- {method}: {m['error']}")
    if m.get("zero_shot_error"):
      errors.append(f"- {method} (ΔI_zero): {m['zero_shot_error']}")
  note = ("ΔI% = overall relative improvement over STL (higher is better); ΔE% = mean per-task "
          "loss against STL (lower is better); step time = median seconds per optimizer step "
          "relative to EW's; the task columns hold each task's I_i in %.")
  if has_zero:
    note += (" ΔI_zero% = ΔI% on the zero-shot tasks (never trained on) with EW as the baseline "
             "instead of STL (docs/method.md §8, §12): above 0, the method generalises beyond "
             "its training tasks better than EW; the I_zero columns hold each zero-shot task's "
             "I_i against EW in %.")
  header = (["method", "ΔI %", "ΔE %"] + (["ΔI_zero %"] if has_zero else [])
            + ["step time vs EW"] + [f"I ({t})" for t in task_cols]
            + [f"I_zero ({t})" for t in zero_cols])
  text = f"{title}\n\n{note}\n\n" + _md_table(header, rows)
  sentence = under_training_sentence(comparison)
  if sentence:
    text += "\n\n" + sentence
  if errors:
    text += "\n\nNot computed:\n\n" + "\n".join(errors)
  return text


def _fmt_difference(d: Mapping[str, Any]) -> str:
  return f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"


def under_training_sentence(comparison: Mapping[str, Any] | None) -> str | None:
  """One sentence: which tasks equal weighting leaves under-trained (its STL model beats EW
  beyond the test set's noise) and what VisATB does on them; None without the paired scores."""
  ew = (comparison or {}).get("ew") or {}
  stl_vs_ew = ew.get("stl_vs_ew")
  if not isinstance(stl_vs_ew, Mapping) or not stl_vs_ew:
    return None
  level = "90 %"
  under = [t for t in ew.get("under_trained") or [] if t in stl_vs_ew]
  if not under:
    return (f"Equal weighting under-trains no task here: no single-task model beats EW beyond "
            f"the {level} paired-bootstrap interval over the test samples (STL − EW: "
            + "; ".join(f"{t} {_fmt_difference(d)}" for t, d in stl_vs_ew.items()) + ").")
  visatb = ((comparison or {}).get("visatb") or {}).get("vs_ew") or {}
  parts = []
  for t in under:
    text = f"{t} (STL − EW {_fmt_difference(stl_vs_ew[t])}"
    if t in visatb:
      text += f"; VisATB − EW {_fmt_difference(visatb[t])}"
    parts.append(text + ")")
  return (f"Equal weighting under-trains {', '.join(under)}: the single-task model beats EW "
          f"beyond the {level} paired-bootstrap interval over the test samples — "
          + "; ".join(parts) + ".")


def _stage_status(name: str, info: Any) -> str:
  status = info.get("status", _MISSING) if isinstance(info, dict) else str(info)
  # The report is written while its own stage runs: "running" would be stale once it is read.
  if name == REPORT_STAGE and status == "running":
    return "this report"
  return str(status)


def _timing_section(manifest: dict | None) -> str:
  title = "## Stages"
  if manifest is None:
    return f"{title}\n\n" + _not_available("Run manifest", "manifest.json")
  stages = manifest.get("stages") or {}
  rows, total = [], 0.0
  for name, info in stages.items():
    seconds = info.get("seconds") if isinstance(info, dict) else None
    if _is_number(seconds):
      total += seconds
    rows.append([name, _stage_status(name, info), _fmt_seconds(seconds)])
  rows.append(["**total**", "", _fmt_seconds(total)])
  head = f"Config hash: `{manifest.get('config_hash', _MISSING)}`"
  return f"{title}\n\n{head}\n\n" + _md_table(["stage", "status", "time"], rows)


def _fmt_seconds(seconds: Any) -> str:
  if not _is_number(seconds):
    return _MISSING
  if seconds < 120:
    return f"{seconds:.1f} s"
  return f"{seconds / 60:.1f} min"


def _flatten(value: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dict → {"a.b.c": leaf}; lists stay leaves."""
  flat = {}
  for k, v in value.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      flat.update(_flatten(v, key + "."))
    else:
      flat[key] = v
  return flat


def _data_stats_section(stats: Any) -> str:
  """Whatever nested dict `data_stats.json` holds: scalars as key / value, dicts one row each."""
  title = "## Data statistics"
  if stats is None:
    return f"{title}\n\n" + _not_available("Data statistics", "data_stats.json")
  if not isinstance(stats, Mapping):
    return f"{title}\n\n`{_fmt(stats)}`"
  parts = [title]
  scalars = {k: v for k, v in stats.items() if not isinstance(v, Mapping)}
  nested = {k: _flatten(v) for k, v in stats.items() if isinstance(v, Mapping)}
  if scalars:
    parts.append(_md_table(["item", "value"], [[k, _fmt(v)] for k, v in scalars.items()]))
  if nested:
    columns = _ordered_keys(list(nested.values()))
    rows = [[k] + [_fmt(flat.get(c)) for c in columns] for k, flat in nested.items()]
    parts.append(_md_table([""] + columns, rows))
  return "\n\n".join(parts)


def _training_section(runs: Mapping[str, list[dict]], kind: str, has_plot: bool) -> str:
  title = "## Training curves"
  if not runs:
    sources = "final/*/metrics.jsonl` or `prep/*/metrics.jsonl"
    return f"{title}\n\n" + _not_available("Training metrics", sources)
  source = ("Final runs." if kind == "final"
            else "Preparation runs (no final run has logged metrics yet).")
  rows = []
  for name, records in runs.items():
    last = records[-1]
    speeds = [r["tokens_per_s"] for r in records if _is_number(r.get("tokens_per_s"))]
    rows.append([name, str(last.get("step")), _fmt(last.get("loss")),
                 _fmt(float(np.mean(speeds))) if speeds else _MISSING,
                 _fmt_seconds(last.get("elapsed_s"))])
  parts = [title, source,
           _md_table(["run", "last step", "last loss", "tokens/s (mean)", "elapsed"], rows)]
  if has_plot:
    parts.append(f"![per-task training loss]({LOSS_CURVES_PNG})")
  return "\n\n".join(parts)


def _plots_section(images: Mapping[str, bool], balance: Mapping | None = None) -> str:
  parts = ["## Plots"]
  level = _fmt_level(((balance or {}).get("bootstrap") or {}).get("level"))
  if images.get(LAMBDA_PNG):
    text = f"### Task weights\n\n![λ components per balanced unit]({LAMBDA_PNG})"
    if balance is not None and _intervals(balance).get("lambda"):
      text += f"\n\nError bars: the {level} interval of λ."
    parts.append(text)
  if images.get(CONTRIBUTION_PNG):
    text = f"### Inter-task contribution\n\n![contribution matrix C]({CONTRIBUTION_PNG})"
    if balance is not None and contribution_intervals(balance) is not None:
      text += (f"\n\nHatched cells: the {level} interval of C[i→j] contains 0 (the sign of the "
               "contribution is not established).")
    parts.append(text)
  if len(parts) == 1:
    parts.append(_not_available("Balance plots", "lambda.json"))
  return "\n\n".join(parts)


def verdict_paragraph(comparison: Mapping[str, Any] | None,
                      balance: Mapping[str, Any] | None) -> str | None:
  """The report's first paragraph: VisATB against EW and the best other method in ΔI and ΔE,
  whether the difference is beyond the test set's noise, and any λ or T on a bound."""
  comparison = comparison or {}
  visatb, ew = comparison.get("visatb"), comparison.get("ew")
  if not isinstance(visatb, Mapping) or "delta_i" not in visatb:
    return None
  parts = [f"**Verdict.** VisATB: ΔI {visatb['delta_i']:+.2f} %, ΔE {visatb['delta_e']:.2f} % "
           "against single-task training"]
  if isinstance(ew, Mapping) and "delta_i" in ew:
    parts[0] += f"; EW: ΔI {ew['delta_i']:+.2f} %, ΔE {ew['delta_e']:.2f} %."
    delta = visatb.get("delta_vs_ew")
    if delta:
      d_i, d_e = delta["delta_i"], delta["delta_e"]
      beyond = [name for name, d in (("ΔI", d_i), ("ΔE", d_e))
                if d["interval"][0] > 0 or d["interval"][1] < 0]
      parts.append(
          f"VisATB − EW: ΔI {d_i['difference']:+.2f} points [{d_i['interval'][0]:+.2f}, "
          f"{d_i['interval'][1]:+.2f}], ΔE {d_e['difference']:+.2f} [{d_e['interval'][0]:+.2f}, "
          f"{d_e['interval'][1]:+.2f}] (90 % paired bootstrap over the test samples): "
          + (f"{' and '.join(beyond)} beyond the test set's noise" if beyond
             else "within the test set's noise") + ".")
  else:
    parts[0] += "."
  others = {m: e for m, e in comparison.items()
            if m not in ("visatb", "ew") and isinstance(e, Mapping) and "delta_i" in e}
  if others:
    best = max(others, key=lambda m: others[m]["delta_i"])
    parts.append(f"Best other method: {best} (ΔI {others[best]['delta_i']:+.2f} %, "
                 f"ΔE {others[best]['delta_e']:.2f} %).")
  parts.append("This is one training run per method: another training seed can order them "
               "differently.")
  at_bound = [u for u in (balance or {}).get("at_bound") or [] if isinstance(u, str)]
  if at_bound:
    parts.append(f"λ of {', '.join(at_bound)} sits on a bound of [0.5, 2] at the automatic "
                 f"T = {_fmt((balance or {}).get('temperature'), 3)}.")
  return " ".join(parts)


def render_markdown(run: RunFiles, title: str, images: Mapping[str, bool]) -> str:
  """The whole report.md text."""
  tasks = _tasks_hint(run)
  runs, kind = _curve_runs(run)
  verdict = verdict_paragraph(run.comparison, run.balance)
  sections = [
      f"# {title}\n\nRun directory: `{os.path.abspath(run.workdir)}`"
      + (f"\n\n{verdict}" if verdict else ""),
      _summary_section(run.balance),
      _validation_section(run.validation, tasks, run.validation_samples),
      _test_section(run.test, tasks, run.config, run.test_samples),
      *filter(None, [_benchmark_section(run.test_reports)]),
      _comparison_section(run.comparison, tasks),
      _training_section(runs, kind, images.get(LOSS_CURVES_PNG, False)),
      _plots_section(images, run.balance),
      _timing_section(run.manifest),
      _data_stats_section(run.data_stats),
  ]
  return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots.


def _save_figure(fig: Figure, path: str) -> None:
  """PNG rendered in memory, then written atomically."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())


def _lambda_errors(balance: Mapping, units: Sequence[str], values: Sequence[float]
                   ) -> np.ndarray | None:
  """Asymmetric error bars [2, units] (below, above) of λ from its intervals; None without any.

  A unit without an interval gets NaN (no bar). A percentile interval may in rare cases exclude
  the estimate itself; the bar is then clipped at the estimate (matplotlib needs errors >= 0).
  """
  intervals = [_unit_lambda_interval(balance, u) for u in units]
  if all(i is None for i in intervals):
    return None
  errors = np.full((2, len(units)), np.nan)
  for k, (interval, value) in enumerate(zip(intervals, values)):
    if interval is not None and math.isfinite(value):
      errors[:, k] = max(0.0, value - interval[0]), max(0.0, interval[1] - value)
  return errors


def lambda_figure(balance: Mapping) -> Figure:
  """Grouped bars of λ_out, λ_in, λ_D and λ per balanced unit; the line at 1 is EW.

  With bootstrap intervals the λ bars carry asymmetric error bars (the λ interval).
  """
  units = list(balance.get("balanced") or [])
  series = [(label, [(balance.get(k) or {}).get(u, np.nan) for u in units])
            for k, label in _COMPONENTS]
  lam = [_nan_if_none(_unit_lambda(balance, u)) for u in units]
  series.append(("λ", lam))
  errors = _lambda_errors(balance, units, lam)
  fig = Figure(figsize=(max(6.0, 1.1 * len(units) + 2.0), 4.0))
  ax = fig.add_subplot()
  x = np.arange(len(units))
  width = 0.8 / len(series)
  for k, (label, values) in enumerate(series):
    extra = {}
    if label == "λ" and errors is not None:
      extra = {"yerr": errors, "capsize": 3, "error_kw": {"elinewidth": 1, "ecolor": "black"}}
    ax.bar(x + (k - (len(series) - 1) / 2) * width, np.asarray(values, dtype=float), width,
           label=label, **extra)
  ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
  # Many units: slanted labels, and the legend moves further down to clear them.
  slanted = len(units) > 6
  ax.set_xticks(x, units, rotation=30 if slanted else 0, ha="right" if slanted else "center")
  ax.set_ylabel("weight")
  title = f"Task weights (T = {_fmt(balance.get('temperature'))})"
  if errors is not None:
    level = _fmt_level((balance.get("bootstrap") or {}).get("level"))
    title += f"; error bars: {level} interval of λ"
  ax.set_title(title)
  ax.legend(ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.3 if slanted else -0.12),
            frameon=False)
  return fig


def plot_lambda(balance: Mapping, path: str) -> None:
  """Writes `lambda_figure` as a PNG."""
  _save_figure(lambda_figure(balance), path)


def _nan_if_none(v: float | None) -> float:
  return np.nan if v is None else float(v)


# Inches per heatmap cell: room for the value, and with intervals for "[-0.63, 0.046]" under it
# at 8 pt, so that the cell text stays inside its cell at any number of tasks.
_CELL_INCHES = 0.8
_CELL_INCHES_WITH_INTERVALS = 1.2


def _label_inches(labels: Sequence[str], fontsize: float = 10.0) -> float:
  """A generous width of the longest tick label (about 0.6 em per character)."""
  return 0.6 * fontsize / 72.0 * max((len(s) for s in labels), default=0)


def _contribution_figsize(units: Sequence[str], cell: float, slanted: bool) -> tuple[float, float]:
  """Room for the square matrix at `cell` inches a side plus its labels, colour bar and legend.

  The constrained layout places everything without overlaps; the size only keeps the matrix
  from being squeezed below `cell` per task to make room for them.
  """
  n = len(units)
  labels = _label_inches(units)
  # y tick labels and "contributor i" on the left, the colour bar and its label on the right.
  width = cell * n + labels + 0.5 + 1.3
  # Title on top; x tick labels (slanted ones reach down by half their length), "receiver j"
  # and the legend below.
  height = cell * n + 0.5 + (0.5 * labels if slanted else 0.25) + 0.35 + 0.45
  return max(4.5, width), max(3.8, height)


def _cell_text(ax: Any, j: int, i: int, text: str, dark: bool, hatched: bool,
               fontsize: float) -> None:
  """The value of cell (i, j): white on a saturated cell, black on a pale one. Over a hatch the
  glyphs get a halo in the cell's own tone, so that the hatch lines never cross them."""
  color, halo = ("white", "black") if dark else ("black", "white")
  effects = [patheffects.withStroke(linewidth=2.0, foreground=halo, alpha=0.7)] if hatched else []
  ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color,
          path_effects=effects)


def contribution_figure(balance: Mapping, c: np.ndarray) -> Figure:
  """Heatmap of C: contributor on the y axis, receiver on the x axis, values annotated.

  With bootstrap intervals each cell also shows its interval, and the cells whose interval
  contains 0 are hatched (a legend entry under the figure says so). The figure grows with the
  number of tasks, and a constrained layout keeps the legend, the axis labels, the colour bar
  and the matrix apart (tests/pipeline/test_report.py checks this at 3 and at 8 tasks).
  """
  units = list(balance["balanced"])
  n = len(units)
  bounds = contribution_intervals(balance)
  # Symmetric limits so that 0 (no effect) sits at the neutral middle of the colour map.
  finite = c[np.isfinite(c)]
  limit = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
  cell = _CELL_INCHES if bounds is None else _CELL_INCHES_WITH_INTERVALS
  # Slanted when the names would not fit side by side under their cells.
  slanted = n > 4 or _label_inches(units) > cell
  fig = Figure(figsize=_contribution_figsize(units, cell, slanted), layout="constrained")
  ax = fig.add_subplot()
  image = ax.imshow(c, cmap="RdBu", vmin=-limit, vmax=limit)
  fig.colorbar(image, ax=ax, shrink=0.8, label="C[i→j]")
  ax.set_xticks(np.arange(n), units, rotation=30 if slanted else 0,
                ha="right" if slanted else "center",
                rotation_mode="anchor" if slanted else "default")
  ax.set_yticks(np.arange(n), units)
  ax.set_xlabel("receiver j")
  ax.set_ylabel("contributor i")
  ax.set_title("Inter-task contribution C[i→j]")
  fontsize = 8 if bounds is not None else 9
  zero = zero_in_interval(bounds) if bounds is not None else np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      # Dark text on the pale middle of the map, white on its saturated ends.
      dark = bool(np.isfinite(c[i, j]) and abs(c[i, j]) > 0.6 * limit)
      text = _fmt(float(c[i, j]), 3)
      if bounds is not None and i != j:
        text += f"\n[{_fmt(float(bounds[i, j, 0]), 2)}, {_fmt(float(bounds[i, j, 1]), 2)}]"
      _cell_text(ax, j, i, text, dark, bool(zero[i, j]), fontsize)
  if bounds is not None:
    for i, j in zip(*np.nonzero(zero)):
      ax.add_patch(mpatches.Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, fill=False, hatch=_ZERO_HATCH,
                                      edgecolor="dimgray", linewidth=0.0))
    level = _fmt_level((balance.get("bootstrap") or {}).get("level"))
    legend = mpatches.Patch(facecolor="white", edgecolor="dimgray", hatch=_ZERO_HATCH,
                            label=f"{level} interval contains 0")
    # A figure legend "outside" is given its own row under everything by the layout: never on
    # the matrix or the "receiver j" label, however long the slanted tick labels are.
    fig.legend(handles=[legend], loc="outside lower center", frameon=False)
  return fig


def plot_contribution(balance: Mapping, c: np.ndarray, path: str) -> None:
  """Writes `contribution_figure` as a PNG."""
  _save_figure(contribution_figure(balance, c), path)


def loss_curves_figure(runs: Mapping[str, list[dict]]) -> Figure | None:
  """One subplot per task, one line per run; None without per-task losses."""
  tasks = _ordered_keys([r.get("per_task_loss") or {} for recs in runs.values() for r in recs])
  if not tasks:
    return None
  ncols = min(3, len(tasks))
  nrows = math.ceil(len(tasks) / ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, task in zip(axes, tasks):
    for name, records in runs.items():
      steps, losses = task_curve(records, task)
      if steps.size:
        ax.plot(steps, losses, label=name, linewidth=1.2)
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _set_yscale(ax)
    ax.grid(alpha=0.3)
  for ax in axes[len(tasks):]:
    ax.set_visible(False)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5), frameon=False)
  return fig


def plot_loss_curves(runs: Mapping[str, list[dict]], path: str) -> bool:
  """Writes `loss_curves_figure` as a PNG; False (and nothing written) without per-task losses."""
  fig = loss_curves_figure(runs)
  if fig is None:
    return False
  _save_figure(fig, path)
  return True


def task_curve(records: Sequence[dict], task: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, losses) of one task; steps where the logged batch held none of it are left out.

  The trainer logs a loss of 0 for a task without tokens in the batch (`per_task_count` 0): that
  is no measurement, and plotting it would draw a spurious dive to 0.
  """
  pairs = []
  for r in records:
    count = (r.get("per_task_count") or {}).get(task)
    if _is_number(count) and count <= 0:
      continue
    pairs.append((r["step"], (r.get("per_task_loss") or {}).get(task)))
  pairs = [(s, v) for s, v in pairs if _is_number(s) and _is_number(v)]
  if not pairs:
    return np.zeros(0), np.zeros(0)
  steps, losses = zip(*pairs)
  return np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)


def _set_yscale(ax: Any) -> None:
  # A log axis keeps the late, small losses readable when the curve spans decades.
  values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.zeros(0)])
  if values.size and np.all(values > 0) and values.max() / values.min() > 20:
    ax.set_yscale("log")
    # Plain numbers instead of the default "4 x 10^0" mantissa labels.
    ax.yaxis.set_major_formatter(ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))


def _curve_runs(run: RunFiles) -> tuple[dict[str, list[dict]], str]:
  """The final runs, or the preparation runs while no final run has metrics yet."""
  if run.final_runs:
    return run.final_runs, "final"
  return run.prep_runs, "prep"


def write_plots(run: RunFiles, report_dir: str) -> dict[str, bool]:
  """Writes every plot whose inputs exist; returns {file name: written}."""
  images = {LAMBDA_PNG: False, CONTRIBUTION_PNG: False, LOSS_CURVES_PNG: False}
  if run.balance is not None and run.balance.get("balanced"):
    plot_lambda(run.balance, os.path.join(report_dir, LAMBDA_PNG))
    images[LAMBDA_PNG] = True
    c = _matrix(run.balance)
    if c is not None:
      plot_contribution(run.balance, c, os.path.join(report_dir, CONTRIBUTION_PNG))
      images[CONTRIBUTION_PNG] = True
  runs, _ = _curve_runs(run)
  if runs:
    images[LOSS_CURVES_PNG] = plot_loss_curves(runs, os.path.join(report_dir, LOSS_CURVES_PNG))
  return images


# ----------------------------------------------------------------------------------------------
# Entry points.


def write_report(workdir: str, *, title: str = "VisATB run") -> str:
  """Writes `workdir/report/` (comparison.json, report.md, plots); returns report.md's path.

  comparison.json is (re)built from scores/test.json whenever that file exists (see
  `build_comparison`); a run without test scores gets none.
  """
  report_dir = os.path.join(workdir, "report")
  if os.path.isfile(os.path.join(workdir, "scores", "test.json")):
    atomic_write_json(os.path.join(report_dir, COMPARISON_JSON), build_comparison(workdir))
  run = load_run(workdir)
  images = write_plots(run, report_dir)
  path = os.path.join(report_dir, REPORT_MD)
  atomic_write_text(path, render_markdown(run, title, images))
  return path
