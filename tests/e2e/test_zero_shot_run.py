"""The micro pipeline with a zero-shot task (docs/method.md §12): scored for every final model and
the untrained one, summarised by ΔI_zero% against EW; its config re-runs test and report only."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from visatb_jax import pipeline
from visatb_jax.pipeline import presets
from visatb_jax.runtime import fileio

from conftest import micro_config

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _write_yes_no_file(root) -> str:
  """A POPE-style file of the test's own: "Is the picture red?" on red and blue squares.

  Half the labels are "yes": whatever a barely trained model answers, POPE's reading of it (no
  "no" or "not": yes) is right on some samples, so EW's score, the baseline of ΔI_zero, is not 0.
  """
  rows = []
  for k in range(6):
    colour = "red" if k % 2 == 0 else "blue"
    image = os.path.join("img", f"{k}.png")
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    Image.new("RGB", (48, 48), COLOURS[colour]).save(os.path.join(root, image))
    rows.append({"id": f"yn{k}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nIs the picture red? Answer yes or no."},
        {"from": "gpt", "value": "yes" if colour == "red" else "no"}]})
  path = os.path.join(root, "yesno_test.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(rows, f)
  return path


def zero_shot_config(yes_no_file: str, **entry):
  """Trains caption and count with TLA (no preparation runs), EW and STL; one zero-shot task."""
  config = micro_config()
  config.task_order = ("caption", "count")
  config.weighting = "tla"
  config.baselines = ("ew", "stl")
  with config.unlocked():
    config.zero_shot = {"yesno": presets.task("pope", files={"test": yes_no_file}, **entry)}
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  yes_no = _write_yes_no_file(str(tmp_path_factory.mktemp("yesno")))
  workdir = str(tmp_path_factory.mktemp("run"))
  pipeline.run(zero_shot_config(yes_no), workdir)
  return workdir, yes_no


def test_zero_shot_scores_and_delta_i_zero(finished):
  workdir, _ = finished
  test = fileio.read_json(os.path.join(workdir, "scores", "test.json"))
  assert set(test) == {"tla", "ew", "stl", "untrained"}
  for method in ("tla", "ew", "untrained"):
    assert set(test[method]) == {"caption", "count", "yesno"}, method
  assert set(test["stl"]) == {"caption", "count"}  # STL models are per trained task
  samples = fileio.read_json(os.path.join(workdir, "scores", "test_samples.json"))
  assert list(samples["tla"]["yesno"]) == [f"yn{k}" for k in range(6)]
  assert "yesno" not in samples["stl"]

  comparison = fileio.read_json(os.path.join(workdir, "report", "comparison.json"))
  assert set(comparison) == {"tla", "ew"}
  tla = comparison["tla"]
  expected = 100.0 * (test["tla"]["yesno"] - test["ew"]["yesno"]) / test["ew"]["yesno"]
  assert tla["delta_i_zero"] == pytest.approx(expected)
  assert tla["per_task_zero"] == {"yesno": pytest.approx(expected)}
  # ΔI and ΔE stay on the trained tasks against STL; a micro STL model may score 0 on one, and
  # ΔI is then undefined and said so, which leaves ΔI_zero untouched.
  if "error" in tla:
    assert "baseline value of metric 0 is 0" in tla["error"]
  else:
    assert set(tla["per_task"]) == {"caption", "count"}
  assert comparison["ew"]["delta_i_zero"] == 0.0

  text = open(os.path.join(workdir, "report", "report.md"), encoding="utf-8").read()
  assert "| method | ΔI % | ΔE % | ΔI_zero % |" in text and "I_zero (yesno)" in text
  assert "Zero-shot tasks (evaluated, never trained on; no STL model): yesno." in text


def test_a_changed_zero_shot_task_reruns_test_and_report_only(finished, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished[0], workdir)  # the other test reads the original
  capsys.readouterr()
  pipeline.run(zero_shot_config(finished[1], prompt_suffix="Answer with one word."), workdir,
               overwrite=True)
  logged = capsys.readouterr().out
  for stage in ("data", "final"):
    assert f"stage {stage}: done, skipped" in logged, stage
  for stage in ("test", "report"):
    assert f"stage {stage}: start (its config changed since it ran)" in logged, stage
