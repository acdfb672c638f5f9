"""A run directory that cannot lie: outputs verified against the manifest, the report bound to
its inputs, a damaged manifest rebuilt, damaged JSON files named, and only what changed re-run.

One micro run (three tasks, VisATB and EW) is copied for each case; every rerun takes seconds
(trained models are reused, scores come from their caches). The checks of each file by itself
are in test_run_dir.py.
"""

from __future__ import annotations

import os
import shutil

import pytest

from visatb_jax import pipeline
from visatb_jax.cli import evaluate
from visatb_jax.pipeline import run_dir as run_dir_lib
from visatb_jax.runtime import fileio

from conftest import REPO, micro_config

pytestmark = pytest.mark.slow  # one pipeline run, about a minute on 2 cores

TESTS = os.path.join(REPO, "tests")
# The same config as a file, for `evaluate --config`.
_CONFIG_FILE = f"""
import sys
sys.path.insert(0, {TESTS!r})
from conftest import micro_config


def get_config():
  config = micro_config()
  config.task_order = ("caption", "count", "chat")
  config.baselines = ("ew",)
  return config
"""


def _config(**overrides):
  config = micro_config()
  config.task_order = ("caption", "count", "chat")
  config.baselines = ("ew",)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("integrity") / "run")
  pipeline.run(_config(), workdir)
  return workdir


@pytest.fixture
def run(finished, tmp_path):
  """A copy of the finished run, for one test to damage."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns("xla_cache"))
  return workdir


def _read(workdir, rel):
  with open(os.path.join(workdir, rel), "rb") as f:
    return f.read()


def _stages(workdir):
  return fileio.read_json(os.path.join(workdir, "manifest.json"))["stages"]


def test_every_done_stage_records_its_outputs_and_what_it_was_made_from(finished):
  stages = _stages(finished)
  assert set(stages["lambda"]["outputs"]) == {"lambda.json"}
  assert set(stages["test"]["outputs"]) == {"scores/test.json", "scores/test_samples.json",
                                            "scores/test_reports.json"}
  assert {"report/report.md", "report/comparison.json"} <= set(stages["report"]["outputs"])
  # 66 samples, 8 a step: the last of 9 steps.
  assert stages["final"]["outputs"]["final/ew/checkpoints"].startswith("step 9: ")
  assert {"final/visatb/run.json", "final/ew/run.json"} <= set(stages["final"]["outputs"])
  assert "data/shapes/images" in stages["data"]["outputs"]
  # The report is bound to every stage it reads (pretrain is not needed here).
  assert set(stages["report"]["made_from"]) == {"data", "prep", "validate", "lambda", "final",
                                                "test"}


def test_deleted_outputs_are_made_again_and_named(run, capsys):
  want = {rel: _read(run, rel) for rel in ("lambda.json", "scores/test.json")}
  for rel in want:
    os.remove(os.path.join(run, rel))
  pipeline.run(_config(), run)
  logged = capsys.readouterr().out
  assert "stage lambda: start (its output lambda.json is missing)" in logged
  assert "stage test: start (its output scores/test.json is missing)" in logged
  # Made again with the same contents: what reads them has nothing new to read.
  assert {rel: _read(run, rel) for rel in want} == want
  for stage in ("data", "prep", "validate", "final", "report"):
    assert f"stage {stage}: done, skipped" in logged, stage


def test_a_removed_report_is_made_again(run, capsys):
  shutil.rmtree(os.path.join(run, "report"))
  pipeline.run(_config(), run)
  assert "stage report: start (its output report/report.md is missing" in capsys.readouterr().out
  assert os.path.isfile(os.path.join(run, "report", "report.md"))


def test_a_changed_output_reruns_its_stage(run, capsys):
  path = os.path.join(run, "scores", "validation.json")
  want = _read(run, "scores/validation.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"mini": {}}\n')
  pipeline.run(_config(), run)
  logged = capsys.readouterr().out
  assert ("stage validate: start (its output scores/validation.json changed since the stage "
          "wrote it)") in logged
  assert _read(run, "scores/validation.json") == want
  assert "stage lambda: done, skipped" in logged  # its input is what it was made from again


def test_a_removed_last_checkpoint_is_trained_again(run, capsys):
  checkpoints = os.path.join(run, "final", "ew", "checkpoints")
  steps = run_dir_lib.finished_steps(checkpoints)
  assert len(steps) >= 2
  shutil.rmtree(os.path.join(checkpoints, str(steps[-1])))
  pipeline.run(_config(), run)
  logged = capsys.readouterr().out
  assert "stage final: start (its output final/ew/checkpoints changed" in logged
  assert "final/ew: 66 samples" in logged  # resumed from the step before, not skipped
  assert run_dir_lib.finished_steps(checkpoints) == steps
  assert "final/visatb: trained, skipped" in logged


def test_a_report_made_from_other_inputs_is_made_again(run, capsys):
  """The report remembers the outputs it read: new test scores make a new report."""
  manifest = fileio.read_json(os.path.join(run, "manifest.json"))
  manifest["stages"]["report"]["made_from"]["test"] = "scores of an earlier test stage"
  fileio.atomic_write_json(os.path.join(run, "manifest.json"), manifest, sort_keys=False)
  pipeline.run(_config(), run)
  assert "stage report: start (stage test made new outputs since it ran)" in (
      capsys.readouterr().out)


def test_report_alone_on_missing_or_unfinished_inputs_is_refused(run):
  os.remove(os.path.join(run, "scores", "test.json"))
  with pytest.raises(pipeline.PipelineError) as info:
    pipeline.run(_config(), run, stages=["report"])
  message = str(info.value)
  assert message == (f"stage report needs {run}/scores/test.json from stage test, which is stale: "
                     "its output scores/test.json is missing; run --stages test,report (or drop "
                     "--stages to run every stale stage)")
  # An interrupted final stage: the report is not written from what it left.
  manifest = fileio.read_json(os.path.join(run, "manifest.json"))
  manifest["stages"]["final"]["status"] = "running"
  fileio.atomic_write_json(os.path.join(run, "manifest.json"), manifest, sort_keys=False)
  before = _read(run, "manifest.json")
  with pytest.raises(pipeline.PipelineError, match=r"stage report needs .*final/ from stage final, "
                     r"which is running; run --stages final,test,report"):
    pipeline.run(_config(), run, stages=["report"])
  assert _read(run, "manifest.json") == before  # refused before anything was written


def test_a_new_temperature_retrains_visatb_alone_and_remakes_the_report(run, capsys):
  """--overwrite with a new balance.temperature: λ, VisATB's final model, its test scores and
  the report are made again; EW and its scores are reused, and the log says so."""
  pipeline.run(_config(**{"balance.temperature": 2.0}), run, overwrite=True)
  logged = capsys.readouterr().out
  for stage in ("lambda", "final", "test", "report"):
    assert f"stage {stage}: start (its config changed since it ran)" in logged, stage
  assert ("final: reused 1 of 2 model(s), trained before on the same inputs and settings: "
          "final/ew") in logged
  assert "final/visatb: 66 samples" in logged
  assert "final/ew on test" not in logged  # its scores come from its cache
  assert fileio.read_json(os.path.join(run, "lambda.json"))["temperature"] == 2.0
  report = _read(run, "report/report.md").decode()
  assert "- Temperature T: 2" in report and "- Temperature T: 0.5" not in report


@pytest.mark.parametrize("damage", ['{"stages": {"data": {"sta', "", "[]", '{"stages": []}'])
def test_a_damaged_manifest_is_rebuilt_from_the_models(run, capsys, damage):
  want = {rel: _read(run, rel) for rel in ("lambda.json", "scores/test.json")}
  with open(os.path.join(run, "manifest.json"), "w", encoding="utf-8") as f:
    f.write(damage)
  pipeline.run(_config(), run)
  logged = capsys.readouterr().out
  warnings = [line for line in logged.splitlines() if "manifest.json" in line]
  assert len(warnings) == 1, warnings
  assert (f"warning: {run}/manifest.json " in warnings[0] and "rebuilt it from the models' "
          "run.json files: stage(s) data, prep, final done under this config" in warnings[0])
  assert "samples in" not in logged  # no model trained again
  for stage in ("data", "prep", "final"):
    assert f"stage {stage}: done, skipped" in logged, stage
  assert {rel: _read(run, rel) for rel in want} == want
  assert set(_stages(run)) == {"data", "prep", "validate", "lambda", "final", "test", "report"}


def test_a_damaged_manifest_beside_another_configs_models_is_refused(run):
  with open(os.path.join(run, "manifest.json"), "w", encoding="utf-8") as f:
    f.write("")
  with pytest.raises(pipeline.PipelineError, match=r"made by another config: this one would "
                     r"replace the outputs of stage\(s\) final; run with --overwrite"):
    pipeline.run(_config(**{"balance.temperature": 2.0}), run)


def test_a_damaged_run_json_is_one_line_naming_it(run):
  path = os.path.join(run, "prep", "mini", "run.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"hash": ')
  with pytest.raises(pipeline.PipelineError) as info:
    pipeline.run(_config(), run)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{path} is not valid JSON (Expecting value: line 1, column 10)")
  assert f"remove {run}/prep/mini to train that model again" in message


def test_evaluate_names_a_damaged_run_json_or_config_json(run, capsys, tmp_path):
  config_file = tmp_path / "config.py"
  config_file.write_text(_CONFIG_FILE)
  model = os.path.join(run, "final", "ew")
  for damaged in (os.path.join(model, "run.json"), os.path.join(run, "config.json")):
    saved = _read(run, os.path.relpath(damaged, run))
    with open(damaged, "w", encoding="utf-8") as f:
      f.write('{"hash": ')
    code = evaluate.main(["evaluate", "--config", str(config_file), "--model", model])
    err = capsys.readouterr().err
    assert code == evaluate.EXIT_ERROR
    assert err.startswith(f"error: {damaged} is not valid JSON (Expecting value: line 1, "
                          "column 10)"), err
    assert err.count("\n") == 1
    with open(damaged, "wb") as f:
      f.write(saved)


def test_a_report_recorded_before_digests_is_made_again_after_new_test_scores(run, capsys):
  """A manifest written before outputs were recorded: a report done before its test stage last
  ran (`--stages report` on an interrupted run, then the full run) is made again."""
  manifest = fileio.read_json(os.path.join(run, "manifest.json"))
  for entry in manifest["stages"].values():
    del entry["outputs"], entry["made_from"]
  manifest["stages"]["report"]["updated"] = "2000-01-01T00:00:00"
  fileio.atomic_write_json(os.path.join(run, "manifest.json"), manifest, sort_keys=False)
  pipeline.run(_config(), run)
  logged = capsys.readouterr().out
  assert "stage report: start (stage data ran after it)" in logged
  assert "stage test: done, skipped" in logged
