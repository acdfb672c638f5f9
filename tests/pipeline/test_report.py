"""Tests for visatb_jax.pipeline.report: markdown, comparison.json, intervals, PNG plots, CLI."""

from __future__ import annotations

import json
import os

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer

from visatb_jax.cli import report as report_cli
from visatb_jax.pipeline import comparison as comparison_lib
from visatb_jax.pipeline import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["caption", "vqa", "count"]
FIXED = "chat"


def _write_json(path, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def _write_metrics(path, records, tail: str = "") -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write(tail)


def _records(scale: float, steps: int = 20, seconds_per_step: float = 0.5) -> list[dict]:
  out = []
  for s in range(1, steps + 1):
    per_task = {t: scale * (k + 1) * 3.0 / s for k, t in enumerate(TASKS + [FIXED])}
    out.append({"step": s, "loss": sum(per_task.values()) / 4, "per_task_loss": per_task,
                "tokens_per_s": 1000.0 + s, "elapsed_s": seconds_per_step * s})
  return out


def _balance() -> dict:
  return {
      "tasks": TASKS + [FIXED],
      "balanced": TASKS,
      "form": "real",
      "temperature": 0.5,
      "alpha": [0.25, 0.25, 0.5],
      "C": [[1.0, 0.21, -0.35], [0.4, 1.0, 0.05], [-0.125, 0.6, 1.0]],
      "c_out": {"caption": -0.07, "vqa": 0.225, "count": 0.2375},
      "c_in": {"caption": 0.1375, "vqa": 0.405, "count": -0.15},
      "d": {"caption": 0.3, "vqa": 0.1, "count": 0.45},
      "lambda_out": {"caption": 0.7654, "vqa": 1.0987, "count": 1.1359},
      "lambda_in": {"caption": 1.0, "vqa": 0.8, "count": 1.2},
      "lambda_d": {"caption": 1.01, "vqa": 0.6789, "count": 1.3111},
      "lambda": {"caption": 1.23456, "vqa": 0.81234, "count": 0.95310, FIXED: 1.0},
      "fixed": {FIXED: 1.0},
      "groups": None,
  }


def _config(lower_is_better: tuple[str, ...] = ("count",)) -> dict:
  """The pipeline's config.json dump (only what the report reads, plus some noise)."""
  tasks = {t: {"metric": "exact_match", "higher_is_better": t not in lower_is_better,
               "group": None, "fixed_weight": None} for t in TASKS}
  tasks[FIXED] = {"metric": None, "higher_is_better": True, "group": None, "fixed_weight": 1.0}
  return {"name": "demo", "tasks": tasks, "task_order": TASKS + [FIXED], "seed": 0}


def _full_run(root) -> str:
  workdir = str(root / "run")
  _write_json(os.path.join(workdir, "lambda.json"), _balance())
  validation = {"mini": {"caption": 0.5, "vqa": 0.4, "count": 0.3}}
  for k, t in enumerate(TASKS):
    validation[f"{t}+mini"] = {u: 0.5 + 0.1 * (u == t) + 0.01 * k for u in TASKS}
  _write_json(os.path.join(workdir, "scores", "validation.json"), validation)
  _write_json(os.path.join(workdir, "scores", "test.json"), {
      "ew": {"caption": 0.7321, "vqa": 0.61, "count": 0.48},
      "untrained": {"caption": 0.01, "vqa": 0.02, "count": 0.03},
      "visatb": {"caption": 0.71, "vqa": 0.6543, "count": 0.52},
      "stl": {"caption": 0.69, "vqa": 0.63, "count": 0.5432},
  })
  # A stale comparison.json: the report rebuilds it from test.json and config.json.
  _write_json(os.path.join(workdir, "report", "comparison.json"), {"old": {"delta_i": 99.0}})
  _write_json(os.path.join(workdir, "config.json"), _config())
  _write_json(os.path.join(workdir, "manifest.json"), {
      "config_hash": "abc123def",
      "stages": {"prep": {"status": "done", "seconds": 12.34},
                 "final": {"status": "done", "seconds": 300.0},
                 "report": {"status": "running"}},
  })
  _write_json(os.path.join(workdir, "data_stats.json"), {
      "train": {"caption": 1200, "vqa": 800, "count": 640, FIXED: 300},
      "val": {"caption": 100, "vqa": 90, "count": 80, FIXED: 20},
      "truncated": 7,
      "dropped": {"too_long": 3, "no_answer": 1},
  })
  # The last line of a running trainer's log may be cut short: it must be skipped, not fatal.
  _write_metrics(os.path.join(workdir, "final", "visatb", "metrics.jsonl"), _records(1.0),
                 tail='{"step": 21, "lo')
  _write_metrics(os.path.join(workdir, "final", "ew", "metrics.jsonl"),
                 _records(1.3, seconds_per_step=0.4))
  _write_metrics(os.path.join(workdir, "prep", "mini", "metrics.jsonl"), _records(2.0))
  return workdir


def _row(md: str, first_cell: str) -> str:
  """The markdown table row starting with `first_cell` (the first one if several)."""
  for line in md.splitlines():
    if line.startswith(f"| {first_cell} |"):
      return line
  raise AssertionError(f"no row {first_cell!r} in:\n{md}")


def _section(md: str, heading: str) -> str:
  start = md.index(f"## {heading}")
  end = md.find("\n## ", start + 1)
  return md[start:] if end < 0 else md[start:end]


def _assert_png(path: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(PNG_SIGNATURE)
  assert len(data) > 10_000  # a real chart, not an empty canvas
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
  assert pixels.std() > 0.05  # something was drawn


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
  workdir = _full_run(tmp_path_factory.mktemp("full"))
  path = report.write_report(workdir, title="Demo run")
  with open(path, encoding="utf-8") as f:
    return workdir, path, f.read()


def test_report_path_and_title(full_report):
  workdir, path, md = full_report
  assert path == os.path.join(workdir, "report", "report.md")
  assert md.startswith("# Demo run\n")
  assert "not available yet" not in md


def test_summary_lambda_and_components(full_report):
  _, _, md = full_report
  summary = _section(md, "Task balance")
  assert "Temperature T: 0.5" in summary
  assert "Fixed-weight tasks: chat (1)" in summary
  # unit | C_out | C_in | D | λ_out | λ_in | λ_D | λ
  assert _row(summary, "caption") == (
      "| caption | -0.07 | 0.1375 | 0.3 | 0.7654 | 1 | 1.01 | 1.235 |")
  assert "| vqa | 0.8123 | balanced |" in summary
  assert "| chat | 1 | fixed |" in summary


def test_contribution_table(full_report):
  _, _, md = full_report
  summary = _section(md, "Task balance")
  assert "| contributor \\ receiver | caption | vqa | count |" in summary
  assert _row(summary, "caption →") == "| caption → | 1 | 0.21 | -0.35 |"
  assert _row(summary, "count →") == "| count → | -0.125 | 0.6 | 1 |"


def test_validation_table_orders_models(full_report):
  _, _, md = full_report
  section = _section(md, "Validation scores")
  assert "| model | caption | vqa | count |" in section
  rows = [line.split(" | ")[0][2:] for line in section.splitlines() if line.startswith("| ")]
  assert rows[2:] == ["mini", "caption+mini", "vqa+mini", "count+mini"]
  assert _row(section, "vqa+mini") == "| vqa+mini | 0.51 | 0.61 | 0.51 |"
  assert "**" not in section


def test_test_table_bolds_best_per_task(full_report):
  _, _, md = full_report
  section = _section(md, "Test scores")
  assert "except for count (lower is better)" in section
  assert _row(section, "visatb") == "| visatb | 0.71 | **0.6543** | 0.52 |"
  assert _row(section, "ew") == "| ew | **0.7321** | 0.61 | **0.48** |"  # count: the lowest
  assert _row(section, "stl") == "| stl | 0.69 | 0.63 | 0.5432 |"
  # The untrained model is no contender, even with the lowest count.
  assert _row(section, "untrained") == "| untrained | 0.01 | 0.02 | 0.03 |"
  assert section.count("**") == 2 * 3 + 2  # one per task, plus the bold word in the note


def _first_cells(section: str) -> list[str]:
  """First cells of a section's table rows, header and alignment row left out."""
  rows = [line.split(" | ")[0][2:] for line in section.splitlines() if line.startswith("| ")]
  return rows[2:]


def test_untrained_row_is_last_never_between_methods(full_report):
  _, _, md = full_report
  # test.json holds the methods in the order ew, untrained, visatb, stl.
  assert _first_cells(_section(md, "Test scores")) == ["stl", "ew", "visatb", "untrained"]
  assert _first_cells(_section(md, "Comparison")) == ["ew", "visatb"]


def test_comparison_table(full_report):
  _, _, md = full_report
  section = _section(md, "Comparison with single-task learning")
  assert ("| method | ΔI % | ΔE % | step time vs EW | I (caption) | I (vqa) | I (count) |"
          in section)
  # Hand-computed from test.json (count lower-is-better in config.json), step times 0.5 / 0.4 s:
  # visatb: I = 2/69, 243/6300, 232/5432 → ΔI 3.676 %, ΔE 0.
  assert _row(section, "visatb") == "| visatb | 3.676 | 0 | 1.25× | 2.899 | 3.857 | 4.271 |"
  # ew: I = 421/6900, -2/63, 632/5432 → ΔI 4.854 %, ΔE = (200/63) / 3 = 1.058 %.
  assert _row(section, "ew") == "| ew | 4.854 | 1.058 | 1.00× | 6.101 | -3.175 | 11.63 |"
  assert "| old |" not in section


def test_comparison_json_written_by_the_report(full_report):
  workdir, _, _ = full_report
  with open(os.path.join(workdir, "report", "comparison.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written == comparison_lib.build_comparison(workdir)
  assert sorted(written) == ["ew", "visatb"]  # neither stl nor untrained, no stale entry
  assert written["visatb"]["step_time_s"] == pytest.approx(0.5)
  assert written["ew"]["step_time_s"] == pytest.approx(0.4)
  assert written["visatb"]["step_time_vs_ew"] == pytest.approx(1.25)


def test_step_seconds_skips_the_compile_interval():
  records = [{"step": 10, "elapsed_s": 30.0}, {"step": 20, "elapsed_s": 40.0},
             {"step": 30, "elapsed_s": 52.0}, {"step": 35, "elapsed_s": 57.0}]
  assert comparison_lib.step_seconds(records) == 1.0  # median of 1.0, 1.2, 1.0
  assert comparison_lib.step_seconds(records[:1]) is None


def test_stage_timings_and_data_stats(full_report):
  _, _, md = full_report
  stages = _section(md, "Stages")
  assert "`abc123def`" in stages
  assert _row(stages, "prep") == "| prep | done | 12.3 s |"
  assert _row(stages, "final") == "| final | done | 5.0 min |"
  # The report is written while its own stage runs: not "running".
  assert _row(stages, "report") == "| report | this report | — |"
  assert "| **total** |  | 5.2 min |" in stages
  stats = _section(md, "Data statistics")
  assert _row(stats, "truncated") == "| truncated | 7 |"
  assert "|  | caption | vqa | count | chat | too_long | no_answer |" in stats
  assert _row(stats, "train") == "| train | 1200 | 800 | 640 | 300 | — | — |"
  assert _row(stats, "dropped") == "| dropped | — | — | — | — | 3 | 1 |"


def test_training_section_uses_final_runs(full_report):
  _, _, md = full_report
  section = _section(md, "Training curves")
  assert "Final runs." in section
  # The truncated last line of visatb's log is skipped: last step 20, not 21.
  assert _row(section, "visatb").startswith("| visatb | 20 |")
  assert "| ew | 20 |" in section
  assert "| mini |" not in section
  assert "![per-task training loss](loss_curves.png)" in section


def test_pngs_are_valid_and_embedded(full_report):
  workdir, _, md = full_report
  for name in (report.LAMBDA_PNG, report.CONTRIBUTION_PNG, report.LOSS_CURVES_PNG):
    _assert_png(os.path.join(workdir, "report", name))
    assert f"]({name})" in md


def test_no_temp_files_left(full_report):
  workdir, _, _ = full_report
  for _, _, files in os.walk(workdir):
    assert not [f for f in files if f.startswith(".tmp-")]


def test_partial_run_only_validation(tmp_path):
  workdir = str(tmp_path)
  _write_json(os.path.join(workdir, "scores", "validation.json"),
              {"mini": {"a": 0.5, "b": 0.25}, "a+mini": {"a": 0.75, "b": 0.125}})
  path = report.write_report(workdir)
  with open(path, encoding="utf-8") as f:
    md = f.read()
  assert md.startswith("# VisATB run\n")
  assert _row(md, "a+mini") == "| a+mini | 0.75 | 0.125 |"
  for heading, source in [("Task balance", "lambda.json"), ("Test scores", "scores/test.json"),
                          ("Comparison", "scores/test.json"), ("Stages", "manifest.json"),
                          ("Data statistics", "data_stats.json"),
                          ("Training curves", "final/*/metrics.jsonl")]:
    section = _section(md, heading)
    assert "not available yet" in section and source in section, heading
  assert sorted(os.listdir(os.path.join(workdir, "report"))) == ["report.md"]
  assert ".png" not in md


def test_prep_runs_plotted_without_final(tmp_path):
  workdir = str(tmp_path)
  _write_metrics(os.path.join(workdir, "prep", "mini", "metrics.jsonl"), _records(1.0))
  _write_metrics(os.path.join(workdir, "prep", "vqa+mini", "metrics.jsonl"), _records(1.5))
  md = open(report.write_report(workdir), encoding="utf-8").read()
  section = _section(md, "Training curves")
  assert "Preparation runs" in section
  assert "| mini | 20 |" in section and "| vqa+mini | 20 |" in section
  _assert_png(os.path.join(workdir, "report", report.LOSS_CURVES_PNG))


def test_failed_rerun_keeps_previous_report(tmp_path, monkeypatch):
  workdir = _full_run(tmp_path)
  path = report.write_report(workdir)
  before = open(path, "rb").read()

  def boom(*args, **kwargs):
    raise RuntimeError("plot failed")

  monkeypatch.setattr(report, "plot_loss_curves", boom)
  with pytest.raises(RuntimeError):
    report.write_report(workdir, title="other title")
  assert open(path, "rb").read() == before
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]


def test_invalid_json_names_the_file(tmp_path):
  os.makedirs(tmp_path / "scores")
  (tmp_path / "scores" / "test.json").write_text("{not json")
  with pytest.raises(ValueError, match="test.json"):
    report.write_report(str(tmp_path))


def test_cli(tmp_path, capsys):
  workdir = str(tmp_path)
  _write_json(os.path.join(workdir, "lambda.json"), _balance())
  assert report_cli.main([workdir, "--title", "CLI run"]) == 0
  path = capsys.readouterr().out.strip()
  assert path == os.path.join(workdir, "report", "report.md")
  assert open(path, encoding="utf-8").read().startswith("# CLI run\n")
  _assert_png(os.path.join(workdir, "report", report.CONTRIBUTION_PNG))
  assert report_cli.main([str(tmp_path / "missing")]) == 2


def test_groups_are_read_as_task_to_group(tmp_path):
  # balancing.balance_report writes groups as task → group, None for fixed tasks.
  workdir = str(tmp_path / "run")
  bal = _balance()
  bal.update(balanced=["visual", "text"], groups={"caption": "visual", "vqa": "visual",
                                                   "count": "text", FIXED: None},
             C=[[1.0, 0.3], [0.2, 1.0]], c_out={"visual": 0.3, "text": 0.2},
             c_in={"visual": 0.2, "text": 0.3}, d={"visual": 0.4, "text": 0.1},
             lambda_out={"visual": 1.05, "text": 0.95}, lambda_in={"visual": 1.05, "text": 0.95},
             lambda_d={"visual": 1.15, "text": 0.85},
             **{"lambda": {"caption": 1.1, "vqa": 1.1, "count": 0.9, FIXED: 1.0}})
  _write_json(os.path.join(workdir, "lambda.json"), bal)
  md = open(report.write_report(workdir), encoding="utf-8").read()
  assert "- Groups: visual: caption, vqa; text: count" in md
  assert _row(md, "visual").endswith("| 1.1 |")  # the group's λ, taken from its tasks
  assert "| caption | 1.1 | visual |" in md
  assert f"| {FIXED} | 1 | fixed |" in md


# ----------------------------------------------------------------------------------------------
# comparison.json from a run directory alone.


def test_build_comparison_from_run_directory_alone(tmp_path):
  workdir = str(tmp_path)
  _write_json(os.path.join(workdir, "scores", "test.json"), {
      "untrained": {"a": 0.1, "b": 9.0},
      "stl": {"a": 0.5, "b": 2.0},
      "ew": {"a": 0.6, "b": 3.0},
      "mtl": {"a": 0.4, "b": 1.0},
      "odd": {"a": 0.5, "b": 2.0, "c": 1.0},  # a task STL was not scored on: ΔI undefined
  })
  # "b" is lower-is-better; "a" is not in config.json, so it defaults to higher-is-better.
  _write_json(os.path.join(workdir, "config.json"),
              {"tasks": {"b": {"metric": "mae", "higher_is_better": False}},
               "task_order": ["a", "b"]})
  _write_metrics(os.path.join(workdir, "final", "ew", "metrics.jsonl"),
                 [{"step": s, "elapsed_s": 2.0 * s} for s in range(1, 5)])
  _write_metrics(os.path.join(workdir, "final", "mtl", "metrics.jsonl"),
                 [{"step": s, "elapsed_s": 3.0 * s} for s in range(1, 5)])
  comparison = comparison_lib.build_comparison(workdir)
  assert sorted(comparison) == ["ew", "mtl", "odd"]  # never stl nor untrained
  # ew: I_a = +0.1/0.5 = +20 %, I_b = -(3 - 2)/2 = -50 % → ΔI = -15 %, ΔE = 50 / 2 = 25 %.
  assert comparison["ew"]["per_task"] == pytest.approx({"a": 20.0, "b": -50.0})
  assert comparison["ew"]["delta_i"] == pytest.approx(-15.0)
  assert comparison["ew"]["delta_e"] == pytest.approx(25.0)
  # mtl: I_a = -20 %, I_b = +50 % → ΔI = +15 %, ΔE = 10 %.
  assert comparison["mtl"]["delta_i"] == pytest.approx(15.0)
  assert comparison["mtl"]["delta_e"] == pytest.approx(10.0)
  assert comparison["ew"]["step_time_s"] == pytest.approx(2.0)
  assert comparison["ew"]["step_time_vs_ew"] == pytest.approx(1.0)
  assert comparison["mtl"]["step_time_vs_ew"] == pytest.approx(1.5)
  assert "'c'" in comparison["odd"]["error"] and "delta_i" not in comparison["odd"]
  assert "step_time_s" not in comparison["odd"]  # no metrics.jsonl

  md = open(report.write_report(workdir), encoding="utf-8").read()
  with open(os.path.join(workdir, "report", "comparison.json"), encoding="utf-8") as f:
    assert json.load(f) == comparison
  section = _section(md, "Comparison")
  assert _row(section, "mtl") == "| mtl | 15 | 10 | 1.50× | -20 | 50 |"
  assert "- odd: task 'c'" in section
  assert _first_cells(section) == ["ew", "mtl", "odd"]


def test_build_comparison_without_config_is_higher_is_better(tmp_path):
  workdir = str(tmp_path)
  _write_json(os.path.join(workdir, "scores", "test.json"),
              {"stl": {"a": 0.5, "b": 2.0}, "ew": {"a": 0.6, "b": 3.0}})
  comparison = comparison_lib.build_comparison(workdir)
  assert comparison["ew"]["per_task"] == pytest.approx({"a": 20.0, "b": 50.0})
  assert "step_time_s" not in comparison["ew"]


def test_build_comparison_without_stl_or_test(tmp_path):
  assert comparison_lib.build_comparison(str(tmp_path)) == {}
  _write_json(os.path.join(tmp_path, "scores", "test.json"), {"ew": {"a": 0.6}})
  assert comparison_lib.build_comparison(str(tmp_path)) == {}
  md = open(report.write_report(str(tmp_path)), encoding="utf-8").read()
  assert "No STL scores" in _section(md, "Comparison")


def test_higher_is_better_defaults():
  config = {"tasks": {"a": {"higher_is_better": False}, "b": {"metric": "x"},
                      "c": {"higher_is_better": [True, False]}}}
  assert comparison_lib.higher_is_better(config, ["a", "b", "c", "d"]) == {
      "a": False, "b": True, "c": [True, False], "d": True}
  assert comparison_lib.higher_is_better(None, ["a"]) == {"a": True}


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals.


def _balance_with_intervals() -> dict:
  bal = _balance()
  bal["gain"] = {"caption": 0.2, "vqa": 0.15, "count": 0.012}
  bal["intervals"] = {
      "C": [[[1.0, 1.0], [0.05, 0.4], [-0.6, -0.1]],
            [[0.2, 0.6], [1.0, 1.0], [-0.1, 0.2]],     # vqa → count contains 0
            [[-0.3, 0.05], [0.4, 0.8], [1.0, 1.0]]],   # count → caption contains 0
      "c_out": {"caption": [-0.2, 0.05], "vqa": [0.1, 0.3], "count": [0.1, 0.4]},
      "c_in": {"caption": [0.05, 0.3], "vqa": [0.3, 0.5], "count": [-0.3, 0.0]},
      "d": {"caption": [0.2, 0.4], "vqa": [0.05, 0.2], "count": [0.3, 0.6]},
      "lambda_out": {"caption": [0.6, 0.9], "vqa": [0.9, 1.3], "count": [0.9, 1.4]},
      "lambda_in": {"caption": [0.9, 1.1], "vqa": [0.6, 1.0], "count": [1.0, 1.4]},
      "lambda_d": {"caption": [0.8, 1.2], "vqa": [0.5, 0.9], "count": [1.1, 1.5]},
      "gain": {"caption": [0.1, 0.3], "vqa": [0.05, 0.25], "count": [-0.004, 0.03]},
      "lambda": {"caption": [1.10, 1.81], "vqa": [0.6, 0.95], "count": [0.7, 1.2]},
      "temperature": [0.4, 0.6],
  }
  bal["noisy"] = ["count"]
  bal["bootstrap"] = {"resamples": 1000, "seed": 0, "level": 0.9,
                      "samples": {"caption": 100, "vqa": 90, "count": 80}}
  return bal


@pytest.fixture(scope="module")
def interval_report(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("intervals") / "run")
  _write_json(os.path.join(workdir, "lambda.json"), _balance_with_intervals())
  path = report.write_report(workdir)
  with open(path, encoding="utf-8") as f:
    return workdir, f.read()


def test_intervals_in_tables(interval_report):
  _, md = interval_report
  summary = _section(md, "Task balance")
  assert "- Temperature T: 0.5 [0.4, 0.6]" in summary
  assert ("| unit | C_out | C_in | D | λ_out | λ_in | λ_D | gain | λ |" in summary)
  assert _row(summary, "caption") == (
      "| caption | -0.07 [-0.2, 0.05] | 0.1375 [0.05, 0.3] | 0.3 [0.2, 0.4] | 0.7654 [0.6, 0.9] "
      "| 1 [0.9, 1.1] | 1.01 [0.8, 1.2] | 0.2 [0.1, 0.3] | 1.235 [1.1, 1.81] |")
  assert "| vqa | 0.8123 [0.6, 0.95] | balanced |" in summary
  assert "| chat | 1 | fixed |" in summary  # no interval for a fixed weight


def test_interval_level_said_once(interval_report):
  _, md = interval_report
  assert md.count("90 % paired-bootstrap intervals over 1000 resamples of the validation "
                  "samples") == 1
  assert "n = caption 100, vqa 90, count 80" in md


def test_contribution_table_marks_zero_intervals(interval_report):
  _, md = interval_report
  summary = _section(md, "Task balance")
  # The diagonal's zero-width interval is left out; entries whose interval contains 0 are marked.
  assert _row(summary, "caption →") == (
      "| caption → | 1 | 0.21 [0.05, 0.4] | -0.35 [-0.6, -0.1] |")
  assert _row(summary, "vqa →") == "| vqa → | 0.4 [0.2, 0.6] | 1 | 0.05 [-0.1, 0.2]† |"
  assert _row(summary, "count →") == "| count → | -0.125 [-0.3, 0.05]† | 0.6 [0.4, 0.8] | 1 |"
  assert "† the interval contains 0" in summary


def test_uncertainty_paragraph(interval_report):
  _, md = interval_report
  text = report.uncertainty_paragraph(_balance_with_intervals())
  assert "caption is up-weighted: λ = 1.23 [1.10, 1.81]" in text
  assert "vqa is down-weighted: λ = 0.81 [0.60, 0.95]" in text
  assert "Not distinguishable from 1" in text and "count (λ = 0.95 [0.70, 1.20])" in text
  assert "chat" not in text  # fixed weight
  assert "Noisy own-data gain" in text and "count (gain = 0.012 [-0.004, 0.03])" in text
  assert "the weights still rest on it through C_out and C_in (count not dropped)" in text
  assert "A larger validation set, a larger large subset or more preparation steps" in text
  assert "Dropped" not in text
  assert text in _section(md, "Task balance")


def test_uncertainty_paragraph_dropped_and_clean():
  bal = _balance_with_intervals()
  bal["bootstrap"]["drop"] = ["count"]  # as bootstrap_report records `drop`
  text = report.uncertainty_paragraph(bal)
  assert "it is dropped from C_out and C_in" in text
  assert "Dropped: count (a dropped unit's column of C is left out" in text
  bal.update(noisy=[], dropped=["vqa"])  # a top-level "dropped" list wins
  text = report.uncertainty_paragraph(bal)
  assert "Every unit's own-data gain is clearly above 0." in text
  assert "Dropped: vqa" in text
  assert report.uncertainty_paragraph(_balance()) is None
  assert report.interval_note(_balance()) is None


def test_interval_note_counts_patched_resamples():
  bal = _balance_with_intervals()
  bal["bootstrap"].update(degenerate_resamples=12, infeasible_temperature_resamples=0)
  note = report.interval_note(bal)
  assert note.startswith("Intervals: 90 % paired-bootstrap intervals over 1000 resamples")
  assert "12 resamples needed a degenerate-data mask." in note
  assert "feasible" not in note


def test_interval_pngs_written_and_explained(interval_report):
  workdir, md = interval_report
  for name in (report.LAMBDA_PNG, report.CONTRIBUTION_PNG):
    _assert_png(os.path.join(workdir, "report", name))
  plots = _section(md, "Plots")
  assert "Error bars: the 90 % interval of λ." in plots
  assert "Hatched cells: the 90 % interval of C[i→j] contains 0" in plots


def _lambda_bars(fig) -> BarContainer:
  (ax,) = fig.axes
  return next(c for c in ax.containers
              if isinstance(c, BarContainer) and c.get_label() == "λ")


def test_lambda_chart_error_bars():
  fig = report.lambda_figure(_balance_with_intervals())
  bars = _lambda_bars(fig)
  assert bars.errorbar is not None
  _, _, (line_collection,) = bars.errorbar.lines
  spans = [(seg[0][1], seg[1][1]) for seg in line_collection.get_segments()]
  # Asymmetric: from each λ interval's low to its high end.
  np.testing.assert_allclose(spans, [(1.10, 1.81), (0.6, 0.95), (0.7, 1.2)])
  # Only λ has error bars; the components do not.
  (ax,) = fig.axes
  others = [c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() != "λ"]
  assert len(others) == 3 and all(c.errorbar is None for c in others)
  assert "90 % interval" in ax.get_title()


def test_lambda_chart_without_intervals_has_no_error_bars():
  assert _lambda_bars(report.lambda_figure(_balance())).errorbar is None


def test_lambda_error_bars_for_groups():
  bal = _balance_with_intervals()
  bal.update(balanced=["visual", "text"], groups={"caption": "visual", "vqa": "visual",
                                                   "count": "text", FIXED: None})
  bal["lambda"] = {"caption": 1.3, "vqa": 1.3, "count": 0.7, FIXED: 1.0}
  bal["intervals"]["lambda"] = {"caption": [1.1, 1.5], "vqa": [1.1, 1.5], "count": [0.5, 0.9]}
  _, _, (lines,) = _lambda_bars(report.lambda_figure(bal)).errorbar.lines
  spans = [(seg[0][1], seg[1][1]) for seg in lines.get_segments()]
  np.testing.assert_allclose(spans, [(1.1, 1.5), (0.5, 0.9)])


def _hatched(ax) -> list:
  return [p for p in ax.patches if p.get_hatch()]


def test_heatmap_marks_intervals_containing_zero():
  bal = _balance_with_intervals()
  fig = report.contribution_figure(bal, np.asarray(bal["C"]))
  ax = fig.axes[0]
  hatched = _hatched(ax)
  # Cells count → caption (row 2, column 0) and vqa → count (row 1, column 2), as (x, y) corners.
  assert sorted(p.get_xy() for p in hatched) == [(-0.5, 1.5), (1.5, 0.5)]
  (legend,) = fig.legends  # under the figure, not on the axes
  assert [t.get_text() for t in legend.get_texts()] == ["90 % interval contains 0"]
  texts = [t.get_text() for t in ax.texts]
  assert "0.05\n[-0.1, 0.2]" in texts  # each cell also shows its interval


def test_heatmap_without_intervals_has_no_marks():
  bal = _balance()
  fig = report.contribution_figure(bal, np.asarray(bal["C"]))
  assert not _hatched(fig.axes[0]) and not fig.legends and fig.axes[0].get_legend() is None


_LONG_NAMES = ("caption", "vqa", "count", "grounding", "ocr_text", "region_caption", "docvqa",
               "science_qa")


def _balance_of(n: int) -> dict:
  """A balance of `n` tasks with wide intervals (long cell text), some containing 0."""
  rng = np.random.default_rng(n)
  c = rng.uniform(-0.9, 0.9, (n, n))
  np.fill_diagonal(c, 1.0)
  low, high = c - rng.uniform(0.01, 0.7, (n, n)), c + rng.uniform(0.01, 0.7, (n, n))
  np.fill_diagonal(low, 1.0)
  np.fill_diagonal(high, 1.0)
  low[0, 1], high[0, 1] = -0.0123, 0.0456  # the longest interval text: "[-0.012, 0.046]"
  return {"balanced": list(_LONG_NAMES[:n]), "C": c.tolist(), "bootstrap": {"level": 0.9},
          "intervals": {"C": np.stack([low, high], axis=-1).tolist()}}


def _rendered(fig):
  """The figure drawn by Agg at the report's dpi, and its renderer."""
  fig.set_dpi(110)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return canvas.get_renderer()


def _overlap(a, b) -> bool:
  return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("with_intervals", [True, False])
def test_heatmap_legend_labels_and_matrix_do_not_overlap(n, with_intervals):
  bal = _balance_of(n)
  if not with_intervals:
    del bal["intervals"]
  fig = report.contribution_figure(bal, np.asarray(bal["C"]))
  renderer = _rendered(fig)
  ax, colorbar = fig.axes
  matrix = ax.get_window_extent(renderer)
  xlabel = ax.xaxis.label.get_window_extent(renderer)
  ylabel = ax.yaxis.label.get_window_extent(renderer)
  xticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
  yticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
  bar = colorbar.get_tightbbox(renderer)
  boxes = {"xlabel": xlabel, "ylabel": ylabel, "matrix": matrix}
  apart = {"xlabel": [matrix, ylabel, bar, *xticks], "ylabel": [matrix, xlabel, *yticks],
           "matrix": [bar, *xticks, *yticks]}
  if with_intervals:  # the hatch's legend, under the figure
    (legend,) = fig.legends
    boxes["legend"] = legend.get_window_extent(renderer)
    apart["legend"] = [matrix, xlabel, ylabel, bar, *xticks, *yticks]
  for name, others in apart.items():
    hits = [o for o in others if _overlap(boxes[name], o)]
    assert not hits, f"{n} tasks: the {name} ({boxes[name]}) overlaps {hits}"
  page = fig.bbox
  for name, box in boxes.items():  # nothing cut off at the figure's edges
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, name


@pytest.mark.parametrize("n", [3, 8])
def test_heatmap_cell_text_stays_inside_its_cell(n):
  """Every value (and its interval) is drawn inside its own cell at a readable size."""
  bal = _balance_of(n)
  fig = report.contribution_figure(bal, np.asarray(bal["C"]))
  renderer = _rendered(fig)
  (ax, _), to_pixels = fig.axes, fig.axes[0].transData
  assert len(ax.texts) == n * n
  for text in ax.texts:
    assert text.get_fontsize() >= 8
    j, i = text.get_position()
    (x0, y0), (x1, y1) = to_pixels.transform([(j - 0.5, i + 0.5), (j + 0.5, i - 0.5)])
    box = text.get_window_extent(renderer)
    assert x0 < box.x0 and box.x1 < x1 and y0 < box.y0 and box.y1 < y1, (
        f"{n} tasks: {text.get_text()!r} ({box}) spills out of its cell ({x0}, {y0}, {x1}, {y1})")


def test_old_lambda_json_renders_as_before(full_report):
  _, _, md = full_report
  summary = _section(md, "Task balance")
  assert "Uncertainty" not in summary and "paired-bootstrap" not in md
  assert "- Temperature T: 0.5\n" in summary
  assert "gain" not in summary and "†" not in summary
  assert "Error bars" not in md and "Hatched" not in md


def test_sample_counts_in_score_headers(tmp_path):
  workdir = str(tmp_path)
  _write_json(os.path.join(workdir, "scores", "validation.json"),
              {"mini": {"a": 0.5, "b": 0.25}, "a+mini": {"a": 0.75, "b": 0.125}})
  _write_json(os.path.join(workdir, "scores", "validation_samples.json"), {
      "mini": {"a": {"s1": 1.0, "s2": 0.0}, "b": {"s1": 0.0, "s2": 1.0, "s3": 0.0}},
      "a+mini": {"a": {"s1": 1.0, "s2": 1.0}, "b": {"s1": 0.0, "s2": 1.0, "s3": 0.0}},
  })
  _write_json(os.path.join(workdir, "scores", "test.json"),
              {"stl": {"a": 0.5}, "ew": {"a": 0.6}})
  _write_json(os.path.join(workdir, "scores", "test_samples.json"), {
      "stl": {"a": {str(k): 1.0 for k in range(4)}},
      "ew": {"a": {str(k): 1.0 for k in range(5)}},
  })
  md = open(report.write_report(workdir), encoding="utf-8").read()
  assert "| model | a (n = 2) | b (n = 3) |" in _section(md, "Validation scores")
  assert "| method | a (n = 4–5) |" in _section(md, "Test scores")


# ----------------------------------------------------------------------------------------------
# Loss curves: a task absent from a logged batch is a gap, not a loss of 0.


def _sparse_records() -> list[dict]:
  out = []
  for s in range(1, 7):
    present = s % 3 != 0  # count is absent from the batches logged at steps 3 and 6
    out.append({"step": s, "loss": 1.0, "elapsed_s": 0.5 * s,
                "per_task_loss": {"caption": 2.0 / s, "count": 4.0 / s if present else 0.0},
                "per_task_count": {"caption": 10, "count": 7 if present else 0}})
  return out


def test_task_curve_skips_zero_count_steps():
  steps, losses = report.task_curve(_sparse_records(), "count")
  assert steps.tolist() == [1, 2, 4, 5]
  assert losses.tolist() == pytest.approx([4.0, 2.0, 1.0, 0.8])
  steps, _ = report.task_curve(_sparse_records(), "caption")
  assert steps.tolist() == [1, 2, 3, 4, 5, 6]
  # Records without counts (older logs) keep every point.
  steps, _ = report.task_curve(_records(1.0, steps=3), "vqa")
  assert steps.tolist() == [1, 2, 3]


def test_loss_curves_have_no_zero_dips(tmp_path):
  fig = report.loss_curves_figure({"visatb": _sparse_records()})
  count_ax = next(ax for ax in fig.axes if ax.get_title() == "count")
  (line,) = count_ax.get_lines()
  assert 0.0 not in list(line.get_ydata())
  assert report.plot_loss_curves({"visatb": _sparse_records()}, str(tmp_path / "curves.png"))
  assert open(tmp_path / "curves.png", "rb").read().startswith(PNG_SIGNATURE)


def _paired_scores(n, ew_hits, stl_hits, visatb_hits):
  """Per-sample 0/1 scores of n test samples with the given numbers of hits."""
  ids = [f"s{k:03d}" for k in range(n)]
  def hits(h):
    return {i: float(k < h) for k, i in enumerate(ids)}
  return {"ew": {"count": hits(ew_hits), "caption": hits(50)},
          "visatb": {"count": hits(visatb_hits), "caption": hits(50)},
          "stl": {"count": hits(stl_hits), "caption": hits(50)}}


def test_under_trained_task_is_named_with_its_numbers():
  """STL above EW beyond the paired interval: equal weighting under-trains that task."""
  samples = _paired_scores(100, ew_hits=40, stl_hits=70, visatb_hits=65)
  comparison = {"ew": {}, "visatb": {}}
  comparison_lib.add_differences_to_ew(comparison, samples, {"count": True, "caption": True})
  assert comparison["ew"]["under_trained"] == ["count"]
  # Sample k is a hit for STL whenever it is for EW: 30 more hits of 100, certain when paired.
  assert comparison["ew"]["stl_vs_ew"]["count"]["difference"] == pytest.approx(0.30)
  assert comparison["ew"]["stl_vs_ew"]["count"]["interval"][0] > 0.2
  assert comparison["visatb"]["vs_ew"]["count"]["difference"] == pytest.approx(0.25)
  sentence = report.under_training_sentence(comparison)
  assert sentence.startswith("Equal weighting under-trains count:")
  assert "STL − EW +0.300" in sentence and "VisATB − EW +0.250" in sentence
  assert "caption" not in sentence  # equal scores: not under-trained


def test_no_under_trained_task_is_said_too():
  samples = _paired_scores(100, ew_hits=60, stl_hits=40, visatb_hits=60)
  comparison = {"ew": {}, "visatb": {}}
  comparison_lib.add_differences_to_ew(comparison, samples, {"count": True, "caption": True})
  assert comparison["ew"]["under_trained"] == []
  assert report.under_training_sentence(comparison).startswith(
      "Equal weighting under-trains no task here")
  # Lower-is-better tasks, and scores on other samples, get no interval rather than a wrong one.
  comparison = {"ew": {}}
  mismatched = {"ew": {"count": {"a": 1.0}}, "stl": {"count": {"b": 1.0}}}
  comparison_lib.add_differences_to_ew(comparison, mismatched, {"count": True})
  assert comparison["ew"]["stl_vs_ew"] == {} and report.under_training_sentence(comparison) is None


def test_replicates_shrinkage_and_bound_are_said_in_the_balance_section():
  balance = _balance()
  balance["bootstrap"] = {"resamples": 1000, "seed": 0, "level": 0.9, "replicates": 2,
                          "shrinkage": "evidence", "samples": {t: 384 for t in TASKS}}
  balance["intervals"] = {"lambda": {"caption": [1.1, 1.4], "vqa": [0.7, 0.9],
                                     "count": [0.8, 1.1], FIXED: [1.0, 1.0]}}
  balance["variance"] = {"training_share": {"lambda": {"caption": 0.62, "vqa": 0.05,
                                                       "count": 0.43, FIXED: None}}}
  balance["shrinkage"] = {"rule": "evidence",
                          "factor": {"c_out": {"caption": 0.97, "vqa": 0.0, "count": 0.0},
                                     "c_in": {"caption": 0.0, "vqa": 0.0, "count": 0.0},
                                     "d": {"caption": 0.0, "vqa": 0.5, "count": 0.0}}}
  balance["at_bound"] = ["vqa"]
  text = report._summary_section(balance)
  assert "- Shrinkage: evidence (docs/method.md §14, beyond the paper)" in text
  assert "- Replicates of each preparation model: 2" in text
  assert "resamples of the preparation runs' replicates and the validation samples" in text
  assert "| λ training share |" in text and "| 62 % |" in text and "| 5 % |" in text
  assert "kept in part: C_out of caption (0.97); D of vqa (0.50)" in text
  assert "λ of vqa sits on a bound of [0.5, 2]" in text
  assert "No evidence" not in text
  balance["shrinkage"]["no_evidence"] = ["count"]
  assert ("No evidence: the own-data gain of count is not clearly above 0"
          in report._summary_section(balance))
  # One replicate and the paper's λ: none of it (a single run has no training share to show).
  balance["bootstrap"].update(replicates=1, shrinkage="none")
  del balance["shrinkage"]
  balance["at_bound"] = []
  text = report._summary_section(balance)
  assert "training share" not in text and "Evidence rule" not in text and "bound" not in text


def test_verdict_paragraph_states_the_comparison_and_its_noise():
  samples = _paired_scores(100, ew_hits=40, stl_hits=30, visatb_hits=60)
  comparison = {"ew": {"delta_i": 33.3, "delta_e": 0.0}, "visatb": {"delta_i": 50.0,
                                                                    "delta_e": 0.0},
                "tla": {"delta_i": 10.0, "delta_e": 1.5}}
  comparison_lib.add_differences_to_ew(comparison, samples, {"count": True, "caption": True})
  delta = comparison["visatb"]["delta_vs_ew"]["delta_i"]
  # count: (60 − 30)/30 against (40 − 30)/30; caption equal: (100 − 33.3)/2 = 33.3 points.
  assert delta["difference"] == pytest.approx(100 * (1.0 - 1 / 3) / 2)
  text = report.verdict_paragraph(comparison, {"at_bound": ["count"], "temperature": 0.07})
  assert text.startswith("**Verdict.** VisATB: ΔI +50.00 %, ΔE 0.00 %")
  assert "EW: ΔI +33.30 %" in text and "ΔI beyond the test set's noise" in text
  assert "Best other method: tla (ΔI +10.00 %, ΔE 1.50 %)" in text
  assert "λ of count sits on a bound of [0.5, 2] at the automatic T = 0.07" in text
  assert report.verdict_paragraph({"ew": {"delta_i": 1.0, "delta_e": 0.0}}, None) is None
