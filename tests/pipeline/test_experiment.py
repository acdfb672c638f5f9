"""Experiment: task settings, subsets per prep model, data statistics and bad-input errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from visatb_jax.runtime import fileio
from visatb_jax.pipeline.experiment import Experiment, PipelineError

from conftest import micro_config


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
  e = Experiment(micro_config(), str(tmp_path_factory.mktemp("exp")))
  e.prepare_data()
  return e


def test_task_settings_from_config(exp):
  assert exp.task_names == ("caption", "vqa", "count", "grounding", "chat")
  assert exp.fixed_weights == {"chat": 1.0}
  assert exp.balanced_units == ["caption", "vqa", "count", "grounding"]
  assert exp.groups == {}


def test_prep_subsets_follow_method_section_2(exp):
  enc = exp.encoded_train()
  n_mini = {t: len(exp.subsets[t]["mini"]) for t in exp.task_names}
  n_large = {t: len(exp.subsets[t]["large"]) for t in exp.task_names}
  mini = exp.prep_examples("mini")
  assert len(mini) == sum(n_mini.values())
  vqa_mini = exp.prep_examples("vqa+mini")
  counts = np.bincount([e.task_id for e in vqa_mini], minlength=exp.num_tasks)
  expected = [n_large[t] if t == "vqa" else n_mini[t] for t in exp.task_names]
  assert counts.tolist() == expected
  # The fixed task takes part in every preparation run at the mini rate.
  assert counts[exp.task_names.index("chat")] == n_mini["chat"] > 0
  # Every mini example of the vqa+mini run is also in the mini run (same subsets, same seed).
  mini_ids = {id(e) for e in mini}
  assert all(id(e) in mini_ids for e in vqa_mini if e.task_id != exp.task_names.index("vqa"))
  assert sum(len(v) for v in enc.values()) == len(exp.task_examples(exp.task_names))


def test_prep_models_of_each_balance_form(exp):
  units = ["caption", "vqa", "count", "grounding"]
  exp.config.balance.form = "base"
  try:
    plan = dict(exp.prep_models())
    assert list(plan) == ["base"] + units + [f"mini_{u}" for u in units]
    assert plan["base"] is None and plan["vqa"] is None and plan["mini_vqa"] == ["vqa"]
    assert exp.prep_examples("base") is None
    vqa = exp.task_names.index("vqa")
    assert {e.task_id for e in exp.prep_examples("vqa")} == {vqa}
    assert len(exp.prep_examples("vqa")) == len(exp.subsets["vqa"]["large"])
    assert len(exp.prep_examples("mini_vqa")) == len(exp.subsets["vqa"]["mini"])
    exp.config.balance.form = "precise"
    assert [m for m, _ in exp.prep_models()] == (
        ["mini"] + [f"{u}+mini" for u in units] + units + [f"mini_{u}" for u in units])
    exp.config.balance.form = "nope"
    with pytest.raises(PipelineError, match="balance.form='nope'"):
      exp.prep_models()
  finally:
    exp.config.balance.form = "real"
  assert [m for m, _ in exp.prep_models()] == ["mini"] + [f"{u}+mini" for u in units]


def test_a_task_without_metric_is_trained_not_scored(tmp_path):
  config = micro_config()
  config.tasks.chat.metric = None
  e = Experiment(config, str(tmp_path))
  assert e.eval_tasks == ("caption", "vqa", "count", "grounding")
  config.tasks.vqa.metric = None
  with pytest.raises(PipelineError, match=r"balanced task\(s\) \['vqa'\] have no metric"):
    Experiment(config, str(tmp_path))


def test_data_stats_count_truncation(tmp_path):
  config = micro_config()
  # LLaVA-1.5's long system prompt: the prompt side, not the answer, has to give way.
  config.data.system_prompt = None
  config.data.max_len = 120
  e = Experiment(config, str(tmp_path))
  e.prepare_data()
  stats = fileio.read_json(tmp_path / "data_stats.json")
  assert sum(s["truncated"] for s in stats.values()) > 0
  assert list(stats) == [f"{t} (train)" for t in e.task_names]
  for task, s in stats.items():
    assert s["samples"] + s["dropped_too_long"] == 24, task
  # Truncation never cuts an answer: every kept example still has its label tokens.
  assert all(e.label_mask.any() for exs in e.encoded_train().values() for e in exs)


def test_all_samples_too_long_is_a_clear_error(tmp_path):
  config = micro_config()
  config.data.max_len = 20
  with pytest.raises(PipelineError, match="task 'caption' has no usable training samples"):
    Experiment(config, str(tmp_path)).prepare_data()
  assert os.path.exists(tmp_path / "data_stats.json")  # the counts say why


def test_empty_split_names_task_and_split(exp, tmp_path):
  e = Experiment(micro_config(), str(tmp_path))
  os.makedirs(e.data_root)
  samples = [s for s in json.load(open(os.path.join(exp.data_root, "val.json")))
             if s["task"] != "count"]
  for s in samples:
    if "image" in s:
      s["image"] = os.path.join(exp.data_root, s["image"])
  with open(os.path.join(e.data_root, "val.json"), "w") as f:
    json.dump(samples, f)
  with pytest.raises(PipelineError, match="task 'count' has no samples in the val split"):
    e.samples("val")


def test_bad_task_config_is_a_clear_error(tmp_path):
  config = micro_config()
  config.task_order = ("caption", "vqa", "caption")
  with pytest.raises(PipelineError, match="duplicates"):
    Experiment(config, str(tmp_path))
  config = micro_config()
  config.task_order = ("caption", "chat")
  with pytest.raises(PipelineError, match="at least 2 balanced tasks"):
    Experiment(config, str(tmp_path))
  config = micro_config()
  config.tasks.caption.group = "visual"
  with pytest.raises(PipelineError, match="have no group"):
    Experiment(config, str(tmp_path))


def test_missing_outputs_name_the_stage_to_run(tmp_path):
  e = Experiment(micro_config(), str(tmp_path))
  with pytest.raises(PipelineError, match="validation.json does not exist"):
    e.read_output("scores", "validation.json")
  with pytest.raises(PipelineError, match="run the 'data' stage first"):
    e.tokenizer  # pylint: disable=pointless-statement


def test_missing_image_is_named(exp, tmp_path):
  e = Experiment(micro_config(), str(tmp_path))
  e.prepare_data()
  victim = next(s for s in e.samples("train") if s.get("image_path"))
  os.remove(victim["image_path"])
  fresh = Experiment(micro_config(), str(tmp_path))
  with pytest.raises(ValueError, match=os.path.basename(victim["image_path"])):
    fresh.prepare_data()


def test_dynamic_baseline_keeps_fixed_task_and_logs_its_lambda(exp):
  exp.train_model("final/rlw", exp.task_examples(exp.task_names), np.ones(exp.num_tasks),
                  stage_hash="h", weighting=exp.weighting_strategy("rlw"))
  records = [json.loads(line) for line in open(os.path.join(exp.workdir, "final", "rlw",
                                                             "metrics.jsonl"))]
  lams = [r["lambda"] for r in records]
  assert all(lam["chat"] == 1.0 for lam in lams)  # the fixed task keeps its weight
  balanced = [[lam[t] for t in exp.balanced_units] for lam in lams[1:]]
  np.testing.assert_allclose(np.mean(balanced, axis=1), 1.0, rtol=1e-5)
  assert len({tuple(np.round(b, 6)) for b in balanced}) == len(balanced)  # redrawn every step
  assert fileio.read_json(os.path.join(exp.workdir, "final", "rlw", "run.json"))["done"]
