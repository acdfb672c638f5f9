"""Run report: `report/report.md` plus PNG plots, built from what the pipeline wrote.

Every input is optional, so the report can be regenerated at any point of a run (a partial run
simply says which parts are not available yet). Nothing here imports jax: the report is cheap to
rebuild from the command line, `python -m visatb_jax.pipeline.report WORKDIR`.

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
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from visatb_jax.runtime.fileio import atomic_write_bytes, atomic_write_text, read_json

LAMBDA_PNG = "lambda.png"
CONTRIBUTION_PNG = "contribution.png"
LOSS_CURVES_PNG = "loss_curves.png"
REPORT_MD = "report.md"

_MISSING = "—"
# Order of the λ components in tables and in the bar chart: (balance-report key, label).
_COMPONENTS = (("lambda_out", "λ_out"), ("lambda_in", "λ_in"), ("lambda_d", "λ_D"))


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


# ----------------------------------------------------------------------------------------------
# Reading the run directory.


def _load_json(path: str) -> Any | None:
  """The parsed file, or None when it does not exist (yet)."""
  if not os.path.isfile(path):
    return None
  try:
    return read_json(path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl file that carry a step; unparsable lines are skipped.

  The trainer appends to this file while it runs, so the last line may be cut short.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
  return records


def step_seconds(records: Sequence[dict]) -> float | None:
  """Median wall seconds per optimizer step between consecutive log records.

  The interval ending at the first record is left out (it holds the compilation), so a run needs
  at least two records; None otherwise.
  """
  rates = []
  for a, b in zip(records, records[1:]):
    steps = b.get("step", 0) - a.get("step", 0)
    if steps > 0 and _is_number(a.get("elapsed_s")) and _is_number(b.get("elapsed_s")):
      rates.append((b["elapsed_s"] - a["elapsed_s"]) / steps)
  return float(np.median(rates)) if rates else None


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
      comparison=_load_json(join("report", "comparison.json")),
      manifest=_load_json(join("manifest.json")),
      data_stats=_load_json(join("data_stats.json")),
      final_runs=_load_runs(join("final")),
      prep_runs=_load_runs(join("prep")),
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


def _ordered_keys(dicts: Sequence[Mapping], preferred: Sequence[str] = ()) -> list[str]:
  """`preferred` keys that occur, then the remaining keys in order of first appearance."""
  seen = {k: None for d in dicts for k in d}
  return [k for k in preferred if k in seen] + [k for k in seen if k not in preferred]


def _tasks_hint(run: RunFiles) -> list[str]:
  """The run's task order (from the balance report) to lay out task columns consistently."""
  if run.balance and isinstance(run.balance.get("tasks"), list):
    return list(run.balance["tasks"])
  return []


def _unit_lambda(balance: Mapping, unit: str) -> float | None:
  """Final λ of a balanced unit: its own entry, or the λ its group's tasks received."""
  lam = balance.get("lambda") or {}
  if unit in lam:
    return lam[unit]
  members = [t for t, g in (balance.get("groups") or {}).items() if g == unit]
  for task in members:
    if task in lam:
      return lam[task]
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
# Markdown sections.


def _summary_section(balance: dict | None) -> str:
  if balance is None:
    return "## Task balance\n\n" + _not_available("Balance report", "lambda.json")
  parts = ["## Task balance", _balance_settings(balance), "### Weights per balanced unit",
           _lambda_table(balance), "### Final weight per task", _task_lambda_table(balance),
           "### Inter-task contribution C (row = contributor, column = receiver)",
           _contribution_table(balance)]
  return "\n\n".join(parts)


def _balance_settings(balance: Mapping) -> str:
  fixed = balance.get("fixed") or {}
  alpha = balance.get("alpha")
  lines = [
      f"- Tasks: {', '.join(balance.get('tasks') or [])}",
      f"- Balanced units: {', '.join(balance.get('balanced') or [])}",
      "- Fixed-weight tasks: "
      + (", ".join(f"{t} ({_fmt(w)})" for t, w in fixed.items()) if fixed else "none"),
      f"- Form: {balance.get('form', _MISSING)}",
      f"- Temperature T: {_fmt(balance.get('temperature'))}",
      f"- α (out, in, D): {_fmt(alpha)}",
  ]
  members = _group_members(balance)
  if members:
    lines.append("- Groups: " + "; ".join(f"{g}: {', '.join(ts)}" for g, ts in members.items()))
  return "\n".join(lines)


def _lambda_table(balance: Mapping) -> str:
  header = ["unit", "C_out", "C_in", "D"] + [label for _, label in _COMPONENTS] + ["λ"]
  rows = []
  for unit in balance.get("balanced") or []:
    values = [(balance.get(k) or {}).get(unit) for k in ("c_out", "c_in", "d")]
    values += [(balance.get(k) or {}).get(unit) for k, _ in _COMPONENTS]
    values.append(_unit_lambda(balance, unit))
    rows.append([unit] + [_fmt(v) for v in values])
  return _md_table(header, rows)


def _task_lambda_table(balance: Mapping) -> str:
  fixed = balance.get("fixed") or {}
  task_group = {t: g for t, g in (balance.get("groups") or {}).items() if g is not None}
  lam = balance.get("lambda") or {}
  rows = []
  for task in _ordered_keys([lam], balance.get("tasks") or []):
    role = "fixed" if task in fixed else task_group.get(task, "balanced")
    rows.append([task, _fmt(lam.get(task)), role])
  return _md_table(["task", "λ", "role"], rows)


def _contribution_table(balance: Mapping) -> str:
  c = _matrix(balance)
  if c is None:
    return "_C matrix missing or malformed in `lambda.json`._"
  units = balance["balanced"]
  rows = [[f"{u} →"] + [_fmt(float(v)) for v in c[i]] for i, u in enumerate(units)]
  return _md_table(["contributor \\ receiver"] + list(units), rows)


def _score_table(scores: Mapping[str, Mapping[str, float]], row_order: Sequence[str],
                 task_order: Sequence[str], highlight: bool, row_label: str) -> str:
  """Rows = models / methods, columns = tasks; optionally the best value per task in bold."""
  rows_keys = _ordered_keys([scores], row_order)
  tasks = _ordered_keys(list(scores.values()), task_order)
  best = {}
  for t in tasks:
    values = [scores[r][t] for r in rows_keys if _is_number(scores[r].get(t))]
    best[t] = max(values) if values else None
  rows = []
  for r in rows_keys:
    row = [r]
    for t in tasks:
      v = scores[r].get(t)
      text = _fmt(v)
      if highlight and _is_number(v) and v == best[t]:
        text = f"**{text}**"
      row.append(text)
    rows.append(row)
  return _md_table([row_label] + tasks, rows)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validation_section(validation: dict | None, tasks: Sequence[str]) -> str:
  title = "## Validation scores (preparation models × tasks)"
  if validation is None:
    return f"{title}\n\n" + _not_available("Validation scores", "scores/validation.json")
  # The paper's order: the reference model first, then one `<task>+mini` per task.
  order = ["base", "mini"] + [f"{t}+mini" for t in tasks] + list(tasks)
  return f"{title}\n\n" + _score_table(validation, order, tasks, highlight=False,
                                            row_label="model")


def _test_section(test: dict | None, tasks: Sequence[str]) -> str:
  title = "## Test scores (methods × tasks)"
  if test is None:
    return f"{title}\n\n" + _not_available("Test scores", "scores/test.json")
  note = ("Higher is better; the best score per task is in **bold**. `stl` holds, per task, the "
          "single-task model's score on its own task.")
  order = ["untrained", "stl", "ew"]
  return f"{title}\n\n{note}\n\n" + _score_table(test, order, tasks, highlight=True,
                                            row_label="method")


def _comparison_section(comparison: dict | None, tasks: Sequence[str]) -> str:
  title = "## Comparison with single-task learning (STL)"
  if comparison is None:
    return f"{title}\n\n" + _not_available("Comparison", "report/comparison.json")
  per_task = [m.get("per_task") or {} for m in comparison.values()]
  task_cols = _ordered_keys(per_task, tasks)
  rows = []
  for method, m in comparison.items():
    pt = m.get("per_task") or {}
    ratio = m.get("step_time_vs_ew")
    rows.append([method, _fmt(m.get("delta_i")), _fmt(m.get("delta_e")),
                 "" if ratio is None else f"{ratio:.2f}×"]
                + [_fmt(pt.get(t)) for t in task_cols])
  note = ("ΔI% = overall relative improvement over STL (higher is better); ΔE% = mean per-task "
          "loss against STL (lower is better); step time = median seconds per optimizer step "
          "relative to EW's; the task columns hold each task's I_i in %.")
  header = ["method", "ΔI %", "ΔE %", "step time vs EW"] + [f"I ({t})" for t in task_cols]
  return f"{title}\n\n{note}\n\n" + _md_table(header, rows)


def _timing_section(manifest: dict | None) -> str:
  title = "## Stages"
  if manifest is None:
    return f"{title}\n\n" + _not_available("Run manifest", "manifest.json")
  stages = manifest.get("stages") or {}
  rows, total = [], 0.0
  for name, info in stages.items():
    seconds = info.get("seconds") if isinstance(info, dict) else None
    status = info.get("status", _MISSING) if isinstance(info, dict) else str(info)
    if _is_number(seconds):
      total += seconds
    rows.append([name, str(status), _fmt_seconds(seconds)])
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


def _plots_section(images: Mapping[str, bool]) -> str:
  parts = ["## Plots"]
  if images.get(LAMBDA_PNG):
    parts.append(f"### Task weights\n\n![λ components per balanced unit]({LAMBDA_PNG})")
  if images.get(CONTRIBUTION_PNG):
    parts.append(f"### Inter-task contribution\n\n![contribution matrix C]({CONTRIBUTION_PNG})")
  if len(parts) == 1:
    parts.append(_not_available("Balance plots", "lambda.json"))
  return "\n\n".join(parts)


def render_markdown(run: RunFiles, title: str, images: Mapping[str, bool]) -> str:
  """The whole report.md text."""
  tasks = _tasks_hint(run)
  runs, kind = _curve_runs(run)
  sections = [
      f"# {title}\n\nRun directory: `{os.path.abspath(run.workdir)}`",
      _summary_section(run.balance),
      _validation_section(run.validation, tasks),
      _test_section(run.test, tasks),
      _comparison_section(run.comparison, tasks),
      _training_section(runs, kind, images.get(LOSS_CURVES_PNG, False)),
      _plots_section(images),
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


def plot_lambda(balance: Mapping, path: str) -> None:
  """Grouped bars of λ_out, λ_in, λ_D and λ per balanced unit; the line at 1 is EW."""
  units = list(balance.get("balanced") or [])
  series = [(label, [(balance.get(k) or {}).get(u, np.nan) for u in units])
            for k, label in _COMPONENTS]
  series.append(("λ", [_nan_if_none(_unit_lambda(balance, u)) for u in units]))
  fig = Figure(figsize=(max(6.0, 1.1 * len(units) + 2.0), 4.0))
  ax = fig.add_subplot()
  x = np.arange(len(units))
  width = 0.8 / len(series)
  for k, (label, values) in enumerate(series):
    ax.bar(x + (k - (len(series) - 1) / 2) * width, np.asarray(values, dtype=float), width,
           label=label)
  ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
  # Many units: slanted labels, and the legend moves further down to clear them.
  slanted = len(units) > 6
  ax.set_xticks(x, units, rotation=30 if slanted else 0, ha="right" if slanted else "center")
  ax.set_ylabel("weight")
  ax.set_title(f"Task weights (T = {_fmt(balance.get('temperature'))})")
  ax.legend(ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.3 if slanted else -0.12),
            frameon=False)
  _save_figure(fig, path)


def _nan_if_none(v: float | None) -> float:
  return np.nan if v is None else float(v)


def plot_contribution(balance: Mapping, c: np.ndarray, path: str) -> None:
  """Heatmap of C: contributor on the y axis, receiver on the x axis, values annotated."""
  units = list(balance["balanced"])
  n = len(units)
  # Symmetric limits so that 0 (no effect) sits at the neutral middle of the colour map.
  finite = c[np.isfinite(c)]
  limit = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
  fig = Figure(figsize=(max(4.5, 0.9 * n + 2.5), max(3.8, 0.8 * n + 1.8)))
  ax = fig.add_subplot()
  image = ax.imshow(c, cmap="RdBu", vmin=-limit, vmax=limit)
  fig.colorbar(image, ax=ax, shrink=0.8, label="C[i→j]")
  ax.set_xticks(np.arange(n), units, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
  ax.set_yticks(np.arange(n), units)
  ax.set_xlabel("receiver j")
  ax.set_ylabel("contributor i")
  ax.set_title("Inter-task contribution C[i→j]")
  for i in range(n):
    for j in range(n):
      # Dark text on the pale middle of the map, white on its saturated ends.
      strong = np.isfinite(c[i, j]) and abs(c[i, j]) > 0.6 * limit
      ax.text(j, i, _fmt(float(c[i, j]), 3), ha="center", va="center", fontsize=9,
              color="white" if strong else "black")
  _save_figure(fig, path)


def plot_loss_curves(runs: Mapping[str, list[dict]], path: str) -> bool:
  """One subplot per task, one line per run; False (and nothing written) without per-task losses."""
  tasks = _ordered_keys([r.get("per_task_loss") or {} for recs in runs.values() for r in recs])
  if not tasks:
    return False
  ncols = min(3, len(tasks))
  nrows = math.ceil(len(tasks) / ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, task in zip(axes, tasks):
    for name, records in runs.items():
      steps, losses = _task_curve(records, task)
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
  _save_figure(fig, path)
  return True


def _task_curve(records: Sequence[dict], task: str) -> tuple[np.ndarray, np.ndarray]:
  pairs = [(r["step"], (r.get("per_task_loss") or {}).get(task)) for r in records]
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
  """Writes `workdir/report/report.md` and its plots; returns the markdown file's path."""
  run = load_run(workdir)
  report_dir = os.path.join(workdir, "report")
  images = write_plots(run, report_dir)
  path = os.path.join(report_dir, REPORT_MD)
  atomic_write_text(path, render_markdown(run, title, images))
  return path
