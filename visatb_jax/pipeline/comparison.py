"""The run's comparison of methods: `report/comparison.json`.

ΔI% and ΔE% of each final model against STL (docs/method.md §8), ΔI_zero% on the zero-shot tasks
against EW (§12), step times relative to EW, and, where the per-sample test scores exist, each
method's difference to EW with a paired-bootstrap interval over the test samples
(core/differences.py). Computed from the run directory alone (scores/test.json,
scores/test_samples.json, config.json, final/*/metrics.jsonl), so it can be rebuilt at any point;
the report (report.py) only renders it. `corpus_summary` gives the report POPE's and MME's own
metrics from scores/test_reports.json. No jax import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from visatb_jax.core import differences, metrics
from visatb_jax.runtime import fileio, metrics_log

COMPARISON_JSON = "comparison.json"
# The pretrained model scored before any training: a reference row, not a method.
UNTRAINED = "untrained"


def load_json(path: str) -> Any | None:
  """The parsed file, or None when it does not exist (yet); a damaged file raises
  fileio.JSONFileError, whose one-line message names it."""
  if not os.path.isfile(path):
    return None
  return fileio.read_json(path)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl that carry a step (a torn last line is skipped)."""
  return [r for r in metrics_log.read_metrics(path) if isinstance(r, dict) and "step" in r]


def is_number(v: Any) -> bool:
  """A finite int or float (not a bool)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ordered_keys(dicts: Sequence[Mapping], preferred: Sequence[str] = ()) -> list[str]:
  """`preferred` keys that occur, then the remaining keys in order of first appearance."""
  seen = {k: None for d in dicts for k in d}
  return [k for k in preferred if k in seen] + [k for k in seen if k not in preferred]


def step_seconds(records: Sequence[dict]) -> float | None:
  """Median wall seconds per optimizer step between consecutive log records.

  The interval ending at the first record is left out (it holds the compilation), so a run needs
  at least two records; None otherwise.
  """
  rates = []
  for a, b in zip(records, records[1:]):
    steps = b.get("step", 0) - a.get("step", 0)
    if steps > 0 and is_number(a.get("elapsed_s")) and is_number(b.get("elapsed_s")):
      rates.append((b["elapsed_s"] - a["elapsed_s"]) / steps)
  return float(np.median(rates)) if rates else None




def _direction(spec: Any) -> bool | list[bool]:
  """A config's higher_is_better: a bool, or one bool per metric; unset means higher is better."""
  if spec is None:
    return True
  if isinstance(spec, (list, tuple)):
    return [bool(s) for s in spec]
  return bool(spec)


def zero_shot_tasks(config: Mapping | None) -> list[str]:
  """The zero-shot tasks (docs/method.md §12) of a run's config.json dump, in config order."""
  section = (config or {}).get("zero_shot")
  return list(section) if isinstance(section, Mapping) else []


def higher_is_better(config: Mapping | None, tasks: Sequence[str]) -> dict[str, bool | list[bool]]:
  """{task: higher_is_better} for `tasks`, from a run's config.json dump (True where not given).

  A zero-shot task's own entry wins over a same-named entry of the task registry (the registry
  may list tasks that this run does not train).
  """
  config = config or {}
  specs = config.get("tasks") or {}
  zero = config.get("zero_shot") if isinstance(config.get("zero_shot"), Mapping) else {}
  out = {}
  for task in tasks:
    spec = zero.get(task) if task in zero else specs.get(task)
    out[task] = _direction(spec.get("higher_is_better") if isinstance(spec, Mapping) else None)
  return out


def _restricted(scores: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
  return {t: v for t, v in scores.items() if t in tasks}


def _zero_shot_entry(test: Mapping[str, Mapping], method: str, zero: Sequence[str],
                     directions: Mapping[str, Any]) -> dict[str, Any]:
  """ΔI_zero% of one method against EW on the zero-shot tasks, with per-task I% (§8, §12)."""
  if "ew" not in test:
    return {"zero_shot_error": "no EW model, the baseline of ΔI_zero: add 'ew' to "
                               "config.baselines"}
  ew, scores = _restricted(test["ew"], zero), _restricted(test[method], zero)
  signs = _restricted(directions, zero)
  try:
    return {"delta_i_zero": metrics.delta_zero_shot(ew, scores, signs),
            "per_task_zero": metrics.delta_metrics(ew, scores, signs)["per_task"]}
  except ValueError as e:  # e.g. an EW score of 0: ΔI_zero is undefined, say so in the report
    return {"zero_shot_error": str(e)}


def compare_methods(test: Mapping[str, Mapping], directions: Mapping[str, Any] | None,
                    step_times: Mapping[str, float | None] | None = None,
                    zero_shot: Sequence[str] = ()) -> dict[str, dict]:
  """ΔI%, ΔE% and per-task I% of every method of `test` against its "stl" entry, and ΔI_zero%
  against its "ew" entry on the zero-shot tasks.

  Args:
    test: scores/test.json, {method: {task: score}}; "stl" is the baseline and "untrained" (the
      model before training) is no method, so neither gets an entry.
    directions: {task: higher_is_better} of the scored tasks (see `higher_is_better`).
    step_times: {method: median seconds per step or None} of the methods whose final run logged
      metrics; each compared method among them gets "step_time_s", and "step_time_vs_ew" when
      both its time and EW's are known.
    zero_shot: the zero-shot tasks (docs/method.md §12). They are left out of ΔI and ΔE (STL has
      no model for them) and give "delta_i_zero" (ΔI% with EW as the baseline) and
      "per_task_zero" (per-task I%); EW's own ΔI_zero is 0 by definition.

  Returns:
    {method: metrics.delta_metrics(...) plus the zero-shot keys}; "error" (resp.
    "zero_shot_error") holds the message where ΔI (resp. ΔI_zero) is undefined, e.g. a baseline
    score of 0. {} without an "stl" entry and without zero-shot tasks.
  """
  zero = list(zero_shot)
  if "stl" not in test and not zero:
    return {}
  directions = dict(directions or {})
  comparison: dict[str, dict] = {}
  for method, scores in test.items():
    if method in ("stl", UNTRAINED):
      continue
    entry: dict[str, Any] = {}
    if "stl" in test:
      trained = [t for t in scores if t not in zero]
      try:
        entry = metrics.delta_metrics(test["stl"], _restricted(scores, trained),
                                      higher_is_better=_restricted(directions, test["stl"]))
      except ValueError as e:  # e.g. an STL score of 0: ΔI is undefined, say so in the report
        entry = {"error": str(e)}
    if zero:
      entry.update(_zero_shot_entry(test, method, zero, directions))
    comparison[method] = entry
  times = {m: s for m, s in (step_times or {}).items() if m in comparison}
  for method, seconds in times.items():
    comparison[method]["step_time_s"] = seconds
    if seconds is not None and times.get("ew"):
      comparison[method]["step_time_vs_ew"] = seconds / times["ew"]
  return comparison


POPE_KEYS = ("f1", "accuracy", "precision", "recall", "yes_ratio")


def corpus_summary(reports: Mapping[str, Any] | None) -> dict[str, Any]:
  """What the report shows of scores/test_reports.json (evaluation.corpus_reports).

  Returns:
    {"pope": {task: {model: {split: {f1, accuracy, precision, recall, yes_ratio}}}}, with a
     "mean" split (the mean over the splits, as LLaVA-1.5's tables give POPE's F1) when a task
     has several; "mme": {task: {model: {"perception", "cognition", "missing"}}}, MME's totals
     and the subtasks without a question; "errors": ["model, task: why"] of the reports that
     could not be computed}. Empty dicts without the file.
  """
  out: dict[str, Any] = {"pope": {}, "mme": {}, "errors": []}
  for model, per_task in (reports or {}).items():
    if not isinstance(per_task, Mapping):
      continue
    for task, report in per_task.items():
      if not isinstance(report, Mapping):
        continue
      if report.get("error"):
        out["errors"].append(f"{model}, {task}: {report['error']}")
      elif isinstance(report.get("splits"), Mapping):
        splits = {split: {k: r.get(k) for k in POPE_KEYS}
                  for split, r in report["splits"].items() if isinstance(r, Mapping)}
        if len(splits) > 1 and isinstance(report.get("mean"), Mapping):
          splits["mean"] = {k: report["mean"].get(k) for k in POPE_KEYS}
        out["pope"].setdefault(task, {})[model] = splits
      elif "perception" in report:
        out["mme"].setdefault(task, {})[model] = {
            "perception": report.get("perception"), "cognition": report.get("cognition"),
            "missing": list(report.get("missing") or [])}
  return out


def build_comparison(workdir: str) -> dict[str, dict]:
  """The content of `report/comparison.json`, computed from the run directory alone.

  Reads scores/test.json ({} when absent or without STL scores), config.json for each scored task's
  higher_is_better (True when the file or the task is missing) and final/<method>/metrics.jsonl for
  the step times. See `compare_methods`.
  """
  test = load_json(os.path.join(workdir, "scores", "test.json"))
  if not isinstance(test, Mapping):
    return {}
  config = load_json(os.path.join(workdir, "config.json"))
  zero = zero_shot_tasks(config)
  if "stl" not in test and not zero:
    return {}
  tasks = ordered_keys([s for s in test.values() if isinstance(s, Mapping)])
  directions = higher_is_better(config, tasks)
  times = {}
  for method in test:
    path = os.path.join(workdir, "final", method, "metrics.jsonl")
    if method not in ("stl", UNTRAINED) and os.path.exists(path):
      times[method] = step_seconds(read_metrics(path))
  comparison = compare_methods(test, directions, times, zero_shot=zero)
  samples = load_json(os.path.join(workdir, "scores", "test_samples.json"))
  if isinstance(samples, Mapping):
    add_differences_to_ew(comparison, samples, directions, zero_shot=zero)
  return comparison


def add_differences_to_ew(comparison: dict[str, dict], samples: Mapping[str, Any],
                          directions: Mapping[str, Any], *, zero_shot: Sequence[str] = (),
                          level: float = 0.9, resamples: int = 1000) -> None:
  """Each method's per-task test score minus EW's, with a paired-bootstrap interval over the test
  samples (core/differences.py), as entry["vs_ew"] = {task: {"difference", "interval", "n"}};
  EW's entry gets STL's as "stl_vs_ew" and, as "under_trained", the trained tasks whose STL model
  beats EW beyond that interval: what equal weighting leaves under-trained (docs/method.md §13).
  Tasks with several or lower-is-better metrics are left out (a difference of one scalar score).
  """
  ew = samples.get("ew")
  if not isinstance(ew, Mapping) or "ew" not in comparison:
    return

  def diffs(other: Mapping[str, Any], name: str) -> dict[str, dict]:
    out = {}
    for task, theirs in other.items():
      if task in zero_shot and name == "stl":
        continue
      mine = ew.get(task)
      if (directions.get(task, True) is not True or not isinstance(mine, Mapping)
          or not isinstance(theirs, Mapping) or not all(
              is_number(v) for v in list(mine.values()) + list(theirs.values()))):
        continue
      try:
        a, b = differences.aligned(mine, theirs, what=f"{name} vs ew on {task}")
        out[task] = differences.paired_difference(a, b, resamples=resamples, level=level)
      except ValueError:
        continue  # different samples (an older run's scores): no interval rather than a wrong one
    return out

  for method, entry in comparison.items():
    if method != "ew" and isinstance(samples.get(method), Mapping):
      entry["vs_ew"] = diffs(samples[method], method)
  stl = samples.get("stl")
  if isinstance(stl, Mapping):
    comparison["ew"]["stl_vs_ew"] = diffs(stl, "stl")
    comparison["ew"]["under_trained"] = [
        t for t, d in comparison["ew"]["stl_vs_ew"].items() if d["interval"][0] > 0]
    for method, entry in comparison.items():
      if method != "ew" and "delta_i" in entry:
        delta = _delta_vs_ew(samples, method, directions, zero_shot, level, resamples)
        if delta is not None:
          entry["delta_vs_ew"] = delta


def _delta_vs_ew(samples: Mapping[str, Any], method: str, directions: Mapping[str, Any],
                 zero_shot: Sequence[str], level: float, resamples: int) -> dict | None:
  """ΔI and ΔE of `method` minus EW's, with a paired interval over the test samples; None when
  the per-sample scores cannot give it (a lower-is-better task, other samples, an STL mean 0)."""
  tasks = [t for t in samples["stl"] if t not in zero_shot]
  arrays: dict[str, dict[str, Any]] = {m: {} for m in (method, "ew", "stl")}
  for task in tasks:
    rows = [samples.get(m, {}).get(task) for m in (method, "ew", "stl")]
    if directions.get(task, True) is not True or not all(isinstance(r, Mapping) for r in rows):
      return None
    try:
      a, b, c = differences.aligned(*rows, what=task)
    except ValueError:
      return None
    arrays[method][task], arrays["ew"][task], arrays["stl"][task] = a, b, c
  try:
    return differences.paired_delta_difference(arrays, method, "ew", level=level,
                                               resamples=resamples)
  except ValueError:
    return None
