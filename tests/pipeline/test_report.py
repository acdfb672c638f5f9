"""Tests for visatb_jax.report: markdown content, PNG plots, partial runs, atomicity, CLI."""

from __future__ import annotations

import json
import os

import matplotlib.image
import pytest

from visatb_jax.cli import report as report_cli
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


def _records(scale: float, steps: int = 20) -> list[dict]:
  out = []
  for s in range(1, steps + 1):
    per_task = {t: scale * (k + 1) * 3.0 / s for k, t in enumerate(TASKS + [FIXED])}
    out.append({"step": s, "loss": sum(per_task.values()) / 4, "per_task_loss": per_task,
                "tokens_per_s": 1000.0 + s, "elapsed_s": 0.5 * s})
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


def _full_run(root) -> str:
  workdir = str(root / "run")
  _write_json(os.path.join(workdir, "lambda.json"), _balance())
  validation = {"mini": {"caption": 0.5, "vqa": 0.4, "count": 0.3}}
  for k, t in enumerate(TASKS):
    validation[f"{t}+mini"] = {u: 0.5 + 0.1 * (u == t) + 0.01 * k for u in TASKS}
  _write_json(os.path.join(workdir, "scores", "validation.json"), validation)
  _write_json(os.path.join(workdir, "scores", "test.json"), {
      "untrained": {"caption": 0.01, "vqa": 0.02, "count": 0.03},
      "visatb": {"caption": 0.71, "vqa": 0.6543, "count": 0.52},
      "ew": {"caption": 0.7321, "vqa": 0.61, "count": 0.48},
      "stl": {"caption": 0.69, "vqa": 0.63, "count": 0.5432},
  })
  _write_json(os.path.join(workdir, "report", "comparison.json"), {
      "visatb": {"delta_i": 2.34567, "delta_e": 1.2, "step_time_vs_ew": 1.0,
                 "per_task": {"caption": 0.029, "vqa": 0.0386, "count": -0.0427}},
      "ew": {"delta_i": -0.98765, "delta_e": 4.5,
             "per_task": {"caption": 0.061, "vqa": -0.0317, "count": -0.1163}},
  })
  _write_json(os.path.join(workdir, "manifest.json"), {
      "config_hash": "abc123def",
      "stages": {"prep": {"status": "done", "seconds": 12.34},
                 "final": {"status": "running", "seconds": 300.0}},
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
  _write_metrics(os.path.join(workdir, "final", "ew", "metrics.jsonl"), _records(1.3))
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
  assert _row(section, "visatb") == "| visatb | 0.71 | **0.6543** | 0.52 |"
  assert _row(section, "ew") == "| ew | **0.7321** | 0.61 | 0.48 |"
  assert _row(section, "stl") == "| stl | 0.69 | 0.63 | **0.5432** |"
  assert section.count("**") == 2 * 3 + 2  # one per task, plus the bold word in the note


def test_comparison_table(full_report):
  _, _, md = full_report
  section = _section(md, "Comparison with single-task learning")
  assert ("| method | ΔI % | ΔE % | step time vs EW | I (caption) | I (vqa) | I (count) |"
          in section)
  assert _row(section, "visatb") == "| visatb | 2.346 | 1.2 | 1.00× | 0.029 | 0.0386 | -0.0427 |"
  assert _row(section, "ew").startswith("| ew | -0.9877 | 4.5 |  |")


def test_step_seconds_skips_the_compile_interval():
  records = [{"step": 10, "elapsed_s": 30.0}, {"step": 20, "elapsed_s": 40.0},
             {"step": 30, "elapsed_s": 52.0}, {"step": 35, "elapsed_s": 57.0}]
  assert report.step_seconds(records) == 1.0  # median of 1.0, 1.2, 1.0
  assert report.step_seconds(records[:1]) is None


def test_stage_timings_and_data_stats(full_report):
  _, _, md = full_report
  stages = _section(md, "Stages")
  assert "`abc123def`" in stages
  assert _row(stages, "prep") == "| prep | done | 12.3 s |"
  assert _row(stages, "final") == "| final | running | 5.0 min |"
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
                          ("Comparison", "report/comparison.json"), ("Stages", "manifest.json"),
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
