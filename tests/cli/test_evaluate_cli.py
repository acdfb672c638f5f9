"""`python -m visatb_jax.evaluate`: a saved model scored on scored and zero-shot tasks, the same
numbers as the pipeline's test stage, and every bad input one line `error: ...` with exit code 2.

One micro run (data, the EW final model, test) serves every case; the command runs in-process
(`evaluate.main`) except once, through the `python -m` entry point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from visatb_jax import pipeline
from visatb_jax.cli import evaluate
from visatb_jax.runtime import fileio

pytestmark = pytest.mark.slow

TESTS = os.path.join(REPO, "tests")

# caption and count trained with EW alone; vqa, a task of the built-in benchmark that the run
# does not train, is its zero-shot task (read from the generated splits).
_SHAPES_CONFIG = f"""
import sys
sys.path.insert(0, {TESTS!r})
from conftest import micro_config
from visatb_jax.pipeline import presets


def get_config():
  config = micro_config()
  config.task_order = ("caption", "count")
  config.weighting = "ew"
  config.baselines = ()
  with config.unlocked():
    config.zero_shot = {{"vqa": presets.task("exact_match")}}
  return config
"""



def _llava_config(root: str, image_root: str) -> str:
  """The same tasks as LLaVA JSON files `{task}_test.json` in `root`, for an HF export."""
  return _SHAPES_CONFIG.replace("  return config\n", f"""\
  with config.unlocked():
    config.data.source = "llava_json"
    config.data.root = {root!r}
    config.data.image_root = {image_root!r}
    config.data.files = {{split: "{{task}}_test.json" for split in ("train", "val", "test")}}
  return config
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config file, run directory) of a finished micro run: data, final/ew, test."""
  base = tmp_path_factory.mktemp("evaluate")
  config_file = base / "shapes.py"
  config_file.write_text(_SHAPES_CONFIG)
  workdir = str(base / "run")
  pipeline.run(_load(config_file), workdir, stages=["data", "final", "test"])
  return str(config_file), workdir


def _load(path):
  from visatb_jax.cli import launch
  return launch.load_config(str(path))


def _main(capsys, *args):
  """(exit code, stdout, stderr) of the command run in-process."""
  capsys.readouterr()
  code = evaluate.main(["visatb_jax.evaluate", *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_a_run_model_scores_as_the_test_stage_did(run, capsys, tmp_path):
  config_file, workdir = run
  out_file = str(tmp_path / "ew.json")
  code, out, err = _main(capsys, "--config", config_file, "--model",
                         os.path.join(workdir, "final", "ew"), "--out", out_file)
  assert code == 0, err
  result = fileio.read_json(out_file)
  test = fileio.read_json(os.path.join(workdir, "scores", "test.json"))["ew"]
  samples = fileio.read_json(os.path.join(workdir, "scores", "test_samples.json"))["ew"]
  assert result["kind"] == "run" and result["split"] == "test"
  assert list(result["scores"]) == ["caption", "count", "vqa"]
  assert result["scores"] == test and result["samples"] == samples
  assert result["tasks"]["vqa"] == {"metric": "exact_match", "zero_shot": True, "samples": 5}
  assert list(result["predictions"]["vqa"]) == list(samples["vqa"])
  assert "vqa*" in out and "* zero-shot" in out and out_file in out


def test_tasks_split_and_the_default_output(run, capsys):
  config_file, workdir = run
  model = os.path.join(workdir, "final", "ew")
  code, out, err = _main(capsys, f"--config={config_file}", f"--model={model}", "--tasks",
                         "vqa,count", "--split", "val")
  assert code == 0, err
  result = fileio.read_json(os.path.join(model, "eval_val.json"))
  assert list(result["scores"]) == ["vqa", "count"] and result["split"] == "val"
  assert {len(s) for s in result["samples"].values()} == {5}


def test_a_hugging_face_directory_scores_like_the_run_model(run, capsys, tmp_path):
  """The EW model exported as an HF directory, scored on LLaVA JSON copies of the run's test
  samples: the same answers, so the same scores."""
  from visatb_jax.model import hf_io
  from visatb_jax.pipeline import config as config_lib
  from visatb_jax.pipeline.workspace import Workspace
  config_file, workdir = run
  ws = Workspace(config_lib.build(_load(config_file)), workdir)
  hf_dir = str(tmp_path / "hf")
  hf_io.save_pretrained(ws.models.load(os.path.join("final", "ew")), hf_dir)
  ws.data.tokenizer.save_pretrained(hf_dir)
  root = tmp_path / "json"
  shapes_root = os.path.join(workdir, "data", "shapes")
  for task in ("caption", "count", "vqa"):
    rows = [s for s in fileio.read_json(os.path.join(shapes_root, "test.json"))
            if s["task"] == task]
    fileio.atomic_write_json(str(root / f"{task}_test.json"), rows)
  llava_file = tmp_path / "llava.py"
  llava_file.write_text(_llava_config(str(root), shapes_root))
  out_file = str(tmp_path / "hf.json")
  code, _, err = _main(capsys, "--config", str(llava_file), "--model", hf_dir, "--out", out_file)
  assert code == 0, err
  result = fileio.read_json(out_file)
  assert result["kind"] == "hf"
  assert result["scores"] == fileio.read_json(os.path.join(workdir, "scores", "test.json"))["ew"]


def _bad_cases(config_file, workdir, tmp_path):
  unfinished = tmp_path / "run_copy"
  shutil.copytree(workdir, unfinished, ignore=shutil.ignore_patterns("checkpoints"))
  fileio.atomic_write_json(str(unfinished / "final" / "ew" / "run.json"), {"done": False})
  neither = tmp_path / "empty"
  neither.mkdir()
  model = os.path.join(workdir, "final", "ew")
  return [
      (["--config", config_file, "--model", str(tmp_path / "nowhere")],
       "model directory .*nowhere does not exist"),
      (["--config", config_file, "--model", model, "--tasks", "ocr"],
       r"unknown task 'ocr' in --tasks; the config scores \['caption', 'count'\] and zero-shot "
       r"\['vqa'\]"),
      (["--config", config_file, "--model", str(neither)],
       "is neither a run's model directory .* nor a Hugging Face checkpoint"),
      (["--config", config_file, "--model", model, "--split", "train"], "--split"),
      (["--config", config_file], "--model is required"),
      (["--model", model], "--config is required"),
      (["--config", config_file, "--model", model, "--config.data.nope=1"],
       "bad config override: config has no field 'nope'"),
      (["--config", config_file, "--model", model, "--config.model.text.hidden_size=64"],
       "config.model differs from the one the run in .* was trained with"),
      (["--config", config_file, "--model", model, "--config.train.lr=-1"], "config.train.lr"),
      (["--config", config_file, "--model", str(unfinished / "final" / "ew")],
       "has no finished training run"),
      (["--config", config_file, "--model", str(tmp_path / "hf_like")],
       "a Hugging Face directory can be scored with a llava_json config only"),
      (["--config", "nope.py", "--model", model], "config file 'nope.py' not found"),
      (["--config", config_file, "--model", model, "extra"], r"unexpected argument\(s\)"),
  ]


def test_bad_inputs_are_one_line(run, capsys, tmp_path):
  config_file, workdir = run
  (tmp_path / "hf_like").mkdir()
  (tmp_path / "hf_like" / "config.json").write_text("{}")
  for args, message in _bad_cases(config_file, workdir, tmp_path):
    code, _, err = _main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == evaluate.EXIT_ERROR, (args, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert re.search(message, lines[0]), (args, lines[0])


def test_the_module_entry_point(run, tmp_path):
  config_file, _ = run
  res = subprocess.run([sys.executable, "-m", "visatb_jax.evaluate", "--config", config_file,
                        "--model", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True,
                       text=True, timeout=240)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"error: model directory {tmp_path / 'nowhere'} does not exist"]


def test_help_prints_the_usage(capsys):
  assert evaluate.main(["evaluate", "--help"]) == 0
  assert "python -m visatb_jax.evaluate --config C --model DIR" in capsys.readouterr().out
