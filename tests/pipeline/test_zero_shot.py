"""Zero-shot tasks (docs/method.md §12): their config checks, their place in the stage hashes,
and ΔI_zero% against EW in comparison.json and report.md."""

from __future__ import annotations

import os

import pytest

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import comparison as comparison_lib
from visatb_jax.pipeline import presets, report, runner
from visatb_jax.pipeline.config import StageInputError
from visatb_jax.runtime import fileio

from conftest import micro_config

TRAINED = ("caption", "count", "chat")


def _config(zero_shot, **data):
  """The micro config training on TRAINED only, as a plain dict (a field may take any type)."""
  config = micro_config().to_dict()
  config["task_order"] = TRAINED
  config["data"].update(data)
  config["zero_shot"] = zero_shot
  return config


_LLAVA = {"source": "llava_json", "root": "/data", "files": {"train": "{task}_train.json"}}

BAD = [
    ({"caption": presets.task("cider")}, {}, "config.zero_shot.caption: 'caption' is in "
     "config.task_order"),
    ({"vqa": presets.task("exact")}, {}, "config.zero_shot.vqa.metric='exact'"),
    ({"vqa": {"metric": "exact_match", "colour": 1}}, {}, "config.zero_shot.vqa has unknown "
     "field(s) ['colour']"),
    ({"vqa": presets.task("exact_match", fixed_weight=1.0)}, {}, "config.zero_shot.vqa."
     "fixed_weight=1.0"),
    ({"vqa": presets.task("exact_match", group="g")}, {}, "config.zero_shot.vqa.group='g'"),
    ({"vqa": {"metric": "exact_match", "higher_is_better": "yes"}}, {},
     "config.zero_shot.vqa.higher_is_better"),
    ({"vqa": "exact_match"}, {}, "config.zero_shot.vqa must be a task entry"),
    ({"vqa": presets.task("exact_match", files={"train": "/x.json"})}, {},
     "config.zero_shot.vqa.files has split(s) ['train']"),
    ({"textvqa": presets.task("vqa_accuracy")}, {}, "config.zero_shot.textvqa: 'textvqa' is no "
     "task of the shapes benchmark"),
    ({"textvqa": presets.task("vqa_accuracy", files={"test": "textvqa.json"})}, {},
     "config.zero_shot.textvqa.files.test='textvqa.json': the shapes source has no data.root"),
    ({"grounding": {"metric": "iou_accuracy", "metric_options": {"thresh": 0.7}}}, {},
     "config.zero_shot.grounding.metric_options: iou_accuracy takes no option(s) ['thresh']"),
    ({"textvqa": presets.task("vqa_accuracy")}, _LLAVA,
     "config.zero_shot.textvqa has no test file"),
    (["vqa"], {}, "config.zero_shot must map task names"),
]


@pytest.mark.parametrize("zero_shot,data,named", BAD, ids=[n.split(":")[0].split("=")[0][:40]
                                                           for _, _, n in BAD])
def test_a_bad_zero_shot_entry_is_one_line_naming_it(zero_shot, data, named):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.build(_config(zero_shot, **data))
  message = str(info.value)
  assert "\n" not in message and named in message, message


def test_a_trained_task_gets_its_metric_options_checked_too():
  config = _config({})
  config["tasks"]["count"]["metric_options"] = {"choices": ["1"]}
  with pytest.raises(config_lib.ConfigError, match=r"config.tasks.count.metric_options: "
                     r"exact_match takes no option\(s\) \['choices'\]"):
    config_lib.build(config)


def test_entries_get_their_defaults():
  run = config_lib.build(_config({
      "vqa": presets.task("exact_match", prompt_suffix="One word."),
      "grounding": {"metric": "iou_accuracy", "higher_is_better": True,
                    "metric_options": {"threshold": 0.7}},
      "pope": presets.task("pope", files={"test": "/data/pope.json"})}))
  assert list(run.zero_shot) == ["vqa", "grounding", "pope"]
  vqa = run.zero_shot["vqa"]
  assert (vqa.metric, vqa.higher_is_better, dict(vqa.files), vqa.prompt_suffix) == (
      "exact_match", True, {}, "One word.")
  assert dict(run.zero_shot["grounding"].metric_options) == {"threshold": 0.7}
  assert run.sections["zero_shot"]["pope"] == {
      "metric": "pope", "higher_is_better": True, "files": {"test": "/data/pope.json"},
      "prompt_suffix": "", "metric_options": {}}
  # A llava_json task file may come from data.files.test, with {task} = the zero-shot name.
  llava = config_lib.build(_config({"textvqa": presets.task("vqa_accuracy")},
                                   **{**_LLAVA, "files": {"test": "{task}_test.json"}}))
  assert list(llava.zero_shot) == ["textvqa"]
  assert config_lib.build(_config(None)).zero_shot == {}


def test_the_zero_shot_section_is_hashed_by_the_test_stage_alone():
  without = runner.stage_hashes(config_lib.build(_config({})))
  with_vqa = runner.stage_hashes(config_lib.build(_config({"vqa": presets.task("exact_match")})))
  changed = [stage for stage in without if without[stage] != with_vqa[stage]]
  assert changed == ["test", "report"]
  allowed = runner.allowed_sections()
  assert "zero_shot" in allowed["test"] and "zero_shot" not in allowed["final"]
  run = config_lib.build(_config({"vqa": presets.task("exact_match")}))
  with pytest.raises(StageInputError, match="stage 'final' read config.zero_shot"):
    run.restricted(allowed["final"], "final").zero_shot  # pylint: disable=expression-not-assigned
  assert list(run.restricted(allowed["test"], "test").zero_shot) == ["vqa"]


# --- ΔI_zero% -------------------------------------------------------------------------------------

# Trained tasks a, b (STL baseline); zero-shot z1 (higher is better) and z2 (lower is better).
TEST = {
    "stl": {"a": 0.5, "b": 2.0},
    "ew": {"a": 0.4, "b": 2.0, "z1": 0.5, "z2": 4.0},
    "visatb": {"a": 0.6, "b": 1.0, "z1": 0.6, "z2": 3.0},
    "untrained": {"a": 0.1, "b": 0.1, "z1": 0.2, "z2": 9.0},
}
CONFIG = {"tasks": {"a": {"metric": "x"}, "b": {"metric": "x"},
                    "z2": {"higher_is_better": True}},  # a registry entry the zero-shot one wins
          "task_order": ["a", "b"],
          "zero_shot": {"z1": {"metric": "x", "higher_is_better": True},
                        "z2": {"metric": "x", "higher_is_better": False}}}


def _run_dir(tmp_path, test, config=CONFIG):
  workdir = str(tmp_path)
  fileio.atomic_write_json(os.path.join(workdir, "scores", "test.json"), test)
  fileio.atomic_write_json(os.path.join(workdir, "config.json"), config)
  return workdir


def test_delta_i_zero_against_ew_by_hand(tmp_path):
  comparison = comparison_lib.build_comparison(_run_dir(tmp_path, TEST))
  assert set(comparison) == {"ew", "visatb"}
  visatb = comparison["visatb"]
  # z1: (0.6 − 0.5) / 0.5 = +20 %; z2, lower is better: −(3 − 4) / 4 = +25 %; mean 22.5 %.
  assert visatb["delta_i_zero"] == pytest.approx(22.5)
  assert visatb["per_task_zero"] == pytest.approx({"z1": 20.0, "z2": 25.0})
  # ΔI and ΔE stay on the trained tasks against STL: a +20 %, b −50 %.
  assert visatb["delta_i"] == pytest.approx(-15.0) and visatb["delta_e"] == pytest.approx(25.0)
  assert visatb["per_task"] == pytest.approx({"a": 20.0, "b": -50.0})
  assert comparison["ew"]["delta_i_zero"] == 0.0  # the baseline itself
  assert comparison["ew"]["delta_i"] == pytest.approx(-10.0)


def test_delta_i_zero_in_report_md(tmp_path):
  workdir = _run_dir(tmp_path, TEST)
  text = open(report.write_report(workdir), encoding="utf-8").read()
  assert fileio.read_json(os.path.join(workdir, "report", "comparison.json"))[
      "visatb"]["delta_i_zero"] == pytest.approx(22.5)
  header = next(line for line in text.splitlines() if line.startswith("| method | ΔI %"))
  assert header.startswith("| method | ΔI % | ΔE % | ΔI_zero % |") and "I_zero (z2)" in header
  row = next(line for line in text.splitlines() if line.startswith("| visatb | -15 | 25 |"))
  assert "| 22.5 |" in row
  assert "Zero-shot tasks (evaluated, never trained on; no STL model): z1, z2." in text


def test_delta_i_zero_undefined_or_without_ew_is_said(tmp_path):
  zero_ew = {**TEST, "ew": {**TEST["ew"], "z1": 0.0}}
  comparison = comparison_lib.build_comparison(_run_dir(tmp_path / "a", zero_ew))
  assert "z1" in comparison["visatb"]["zero_shot_error"]
  assert comparison["visatb"]["delta_i"] == pytest.approx(-15.0)  # unaffected
  text = open(report.write_report(str(tmp_path / "a")), encoding="utf-8").read()
  assert "- visatb (ΔI_zero): task 'z1'" in text
  no_ew = {m: s for m, s in TEST.items() if m != "ew"}
  comparison = comparison_lib.build_comparison(_run_dir(tmp_path / "b", no_ew))
  assert "add 'ew' to config.baselines" in comparison["visatb"]["zero_shot_error"]


def test_without_stl_only_delta_i_zero_is_given(tmp_path):
  no_stl = {m: s for m, s in TEST.items() if m != "stl"}
  comparison = comparison_lib.build_comparison(_run_dir(tmp_path, no_stl))
  assert comparison["visatb"] == {"delta_i_zero": pytest.approx(22.5),
                                  "per_task_zero": pytest.approx({"z1": 20.0, "z2": 25.0})}
  # A run without zero-shot tasks and without STL compares nothing, as before.
  config = {k: v for k, v in CONFIG.items() if k != "zero_shot"}
  assert comparison_lib.build_comparison(_run_dir(tmp_path / "c", no_stl, config)) == {}


def test_a_zero_shot_direction_wins_over_the_registry():
  assert comparison_lib.higher_is_better(CONFIG, ["a", "z1", "z2"]) == {"a": True, "z1": True,
                                                                "z2": False}
  assert comparison_lib.zero_shot_tasks(CONFIG) == ["z1", "z2"] and comparison_lib.zero_shot_tasks(None) == []
