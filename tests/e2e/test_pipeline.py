"""The whole pipeline on a micro version of the demo: outputs, skipping, kill-and-resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from visatb_jax import pipeline
from visatb_jax.pipeline.stages import BALANCE_STAGES
from visatb_jax.runtime import fileio
from visatb_jax.runtime import metrics_log

from conftest import MICRO_OVERRIDES, REPO, micro_config

pytestmark = pytest.mark.slow


def _without_timings(tree):
  """Outputs minus wall-clock figures (step times), which no two runs share."""
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items() if not k.startswith("step_time")}
  return tree


def _outputs(workdir):
  return {name: fileio.read_json(os.path.join(workdir, *name.split("/")))
          for name in ("lambda.json", "scores/validation.json", "scores/test.json",
                       "report/comparison.json")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  pipeline.run(micro_config(), workdir)
  return workdir


def test_pipeline_writes_every_output(finished_run):
  out = _outputs(finished_run)
  tasks = ["caption", "vqa", "count", "grounding", "chat"]
  balanced = [t for t in tasks if t != "chat"]
  assert set(out["lambda.json"]["lambda"]) == set(tasks)
  assert out["lambda.json"]["lambda"]["chat"] == 1.0  # fixed weight, outside the balancing
  assert set(out["scores/validation.json"]) == {"mini"} | {f"{t}+mini" for t in balanced}
  assert set(out["scores/test.json"]) == {"visatb", "ew", "stl", "mgda", "untrained"}
  for method, scores in out["scores/test.json"].items():
    assert set(scores) == set(tasks), method
  comparison = out["report/comparison.json"]
  assert set(comparison) == {"visatb", "ew", "mgda"}  # the untrained model is not a method
  assert comparison["ew"]["step_time_vs_ew"] == 1.0
  assert comparison["mgda"]["step_time_s"] > 0 and comparison["visatb"]["step_time_vs_ew"] > 0
  report = open(os.path.join(finished_run, "report", "report.md"), encoding="utf-8").read()
  assert "## Task balance" in report
  for png in ("lambda.png", "contribution.png", "loss_curves.png"):
    assert os.path.getsize(os.path.join(finished_run, "report", png)) > 1000
  manifest = fileio.read_json(os.path.join(finished_run, "manifest.json"))
  assert all(s["status"] == "done" for s in manifest["stages"].values())
  assert set(manifest["stages"]) == set(pipeline.STAGES) - {"pretrain"}  # no config.pretrain
  # Each final model logged per-task losses and λ; VisATB's λ is the one in lambda.json.
  last = json.loads(open(os.path.join(finished_run, "final", "visatb", "metrics.jsonl"))
                    .read().splitlines()[-1])
  assert last["lambda"] == pytest.approx(out["lambda.json"]["lambda"])


def test_rerun_skips_finished_stages(finished_run, capsys):
  before = _outputs(finished_run)
  t0 = time.time()
  pipeline.run(micro_config(), finished_run)
  assert time.time() - t0 < 30
  logged = capsys.readouterr().out
  assert "stage pretrain: not needed (no config.pretrain)" in logged
  for stage in set(pipeline.STAGES) - {"pretrain"}:
    assert f"stage {stage}: done, skipped" in logged
  assert _outputs(finished_run) == before


def test_changed_temperature_reruns_from_lambda_only(finished_run, tmp_path, capsys):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run, workdir)  # the other tests compare against finished_run
  config = micro_config()
  config.balance.temperature = 5.0
  pipeline.run(config, workdir, stages=["validate", "lambda"], overwrite=True)
  logged = capsys.readouterr().out
  assert "stage validate: done, skipped" in logged and "stage lambda: start" in logged
  assert fileio.read_json(os.path.join(workdir, "lambda.json"))["temperature"] == 5.0


def test_stale_inputs_are_never_used(finished_run, tmp_path, capsys):
  """A model change makes every stage's inputs stale: a stage selected with --stages stops and
  names the file and the stages to run; a full run redoes them and says why."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run, workdir)
  config = micro_config()
  config.train.lr = 1e-4
  before = _outputs(workdir)
  for stages, stale in ((["lambda"], "validate"), (["test", "report"], "final")):
    with pytest.raises(pipeline.PipelineError, match=rf"stage {stages[0]} needs .* from stage "
                       rf"{stale}, which was made under another config; run --stages "
                       rf"{stale},.*{stages[0]}"):
      pipeline.run(config, workdir, stages=stages)
  assert _outputs(workdir) == before  # nothing was touched
  config = micro_config()
  config.eval.max_new_tokens = 4  # validate and everything after it are stale; data, prep not
  pipeline.run(config, workdir, overwrite=True)
  logged = capsys.readouterr().out
  assert "stage prep: done, skipped" in logged
  for stage in ("validate", "lambda", "final", "test", "report"):
    assert f"stage {stage}: start (its config changed since it ran)" in logged, stage


def test_unknown_stage_and_task_are_clear_errors(tmp_path):
  with pytest.raises(pipeline.PipelineError, match="unknown stage"):
    pipeline.run(micro_config(), str(tmp_path), stages=["prepp"])
  config = micro_config()
  config.baselines = ("ew", "mgdaa")
  with pytest.raises(pipeline.PipelineError, match="unknown baseline.*mgdaa"):
    pipeline.run(config, str(tmp_path))
  config = micro_config()
  config.task_order = ("caption", "vqa", "ocr")
  with pytest.raises(pipeline.PipelineError, match="'ocr'"):
    pipeline.run(config, str(tmp_path))


def test_prep_runs_side_by_side_on_sub_meshes(finished_run, tmp_path, capsys):
  """prep.parallel=2: the 5 preparation runs, two at a time on 4 devices each, train the same
  models as one after another on all 8 (float sums in another order: 1e-4)."""
  config = micro_config()
  config.prep.parallel = 2
  workdir = str(tmp_path / "parallel")
  pipeline.run(config, workdir, stages=["data", "prep"])
  assert "prep: 5 runs, 2 side by side on 4 device(s) each" in capsys.readouterr().out
  for name in ["mini"] + [f"{t}+mini" for t in ("caption", "vqa", "count", "grounding")]:
    assert fileio.read_json(os.path.join(workdir, "prep", name, "run.json"))["done"], name
    got, want = (metrics_log.read_metrics(os.path.join(d, "prep", name, "metrics.jsonl"))
                 for d in (workdir, finished_run))
    assert [r["step"] for r in got] == [r["step"] for r in want], name
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)
  config.prep.parallel = 3
  with pytest.raises(pipeline.PipelineError, match="prep.parallel=3 must divide the 8 devices"):
    pipeline.run(config, str(tmp_path / "three"), stages=["data", "prep"])


def test_weighting_selects_the_final_model_and_skips_the_balance_stages(tmp_path, capsys):
  """weighting=ew without VisATB among the baselines: no prep runs, no λ, EW is the run's model."""
  config = micro_config()
  config.weighting = "ew"
  config.baselines = ("stl",)
  workdir = str(tmp_path / "ew")
  pipeline.run(config, workdir)
  logged = capsys.readouterr().out
  for stage in BALANCE_STAGES:
    assert f"stage {stage}: not needed (weighting='ew'" in logged
  assert not os.path.exists(os.path.join(workdir, "lambda.json"))
  assert not os.path.exists(os.path.join(workdir, "prep"))
  test = fileio.read_json(os.path.join(workdir, "scores", "test.json"))
  assert set(test) == {"untrained", "ew", "stl"}
  assert set(fileio.read_json(os.path.join(workdir, "report", "comparison.json"))) == {"ew"}
  report = open(os.path.join(workdir, "report", "report.md"), encoding="utf-8").read()
  assert "lambda.json" in report  # the balance section says it is not available

  config.weighting = "stl"
  with pytest.raises(pipeline.PipelineError, match="weighting='stl'.*config.baselines"):
    pipeline.run(config, workdir)
  config.weighting = "dwaa"
  with pytest.raises(pipeline.PipelineError, match="weighting='dwaa'"):
    pipeline.run(config, workdir)


def _launch_cmd(workdir):
  overrides = [f"--config.{k}={v}" for k, v in MICRO_OVERRIDES.items()]
  return [sys.executable, "-m", "visatb_jax.launch", "--config", "demo.py", "--workdir", workdir,
          *overrides]


def test_kill_and_resume_gives_the_same_results(finished_run, tmp_path):
  """SIGKILL at several moments; the same command finishes with the uninterrupted results."""
  workdir = str(tmp_path / "killed")
  env = dict(os.environ)  # same XLA_FLAGS, so the same device count as the reference run
  for delay in (6.0, 14.0):
    proc = subprocess.Popen(_launch_cmd(workdir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = subprocess.run(_launch_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed, reference = _outputs(workdir), _outputs(finished_run)
  for name in reference:
    assert _without_timings(resumed[name]) == _without_timings(reference[name]), name


def test_launch_cli_reports_bad_config_in_one_line(tmp_path):
  res = subprocess.run([sys.executable, "-m", "visatb_jax.launch", "--config", "nope.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0
  assert "nope.py" in res.stderr and "Traceback" not in res.stderr
