"""The workspace of a run: task plan, subsets per prep model, data statistics, bad-input errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import methods
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio

from conftest import micro_config


def workspace(config, workdir) -> Workspace:
  return Workspace(config_lib.build(config), str(workdir))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  w = workspace(micro_config(), tmp_path_factory.mktemp("ws"))
  w.data.prepare()
  return w


def test_task_plan_from_config(ws):
  plan = ws.config.tasks
  assert plan.names == ("caption", "vqa", "count", "grounding", "chat")
  assert plan.fixed == {"chat": 1.0}
  assert plan.balanced_units == ("caption", "vqa", "count", "grounding")
  assert plan.groups == {}
  np.testing.assert_array_equal(plan.base_weights(), [1, 1, 1, 1, 1])


def test_prep_subsets_follow_method_section_2(ws):
  data, names = ws.data, ws.config.tasks.names
  enc = data.encoded_train()
  n_mini = {t: len(data.subsets()[t]["mini"]) for t in names}
  n_large = {t: len(data.subsets()[t]["large"]) for t in names}
  mini = data.prep_examples("mini")
  assert len(mini) == sum(n_mini.values())
  vqa_mini = data.prep_examples("vqa+mini")
  counts = np.bincount([e.task_id for e in vqa_mini], minlength=len(names))
  expected = [n_large[t] if t == "vqa" else n_mini[t] for t in names]
  assert counts.tolist() == expected
  # The fixed task takes part in every preparation run at the mini rate.
  assert counts[names.index("chat")] == n_mini["chat"] > 0
  # Every mini example of the vqa+mini run is also in the mini run (same subsets, same seed).
  mini_ids = {id(e) for e in mini}
  assert all(id(e) in mini_ids for e in vqa_mini if e.task_id != names.index("vqa"))
  assert sum(len(v) for v in enc.values()) == len(data.task_examples(names))


def test_prep_models_of_each_balance_form(ws):
  units = ["caption", "vqa", "count", "grounding"]
  plan = ws.config.tasks
  models = dict(plan.prep_models("base"))
  assert list(models) == ["base"] + units + [f"mini_{u}" for u in units]
  assert models["base"] is None and models["vqa"] is None and models["mini_vqa"] == ["vqa"]
  assert ws.data.prep_examples("base") is None
  vqa = plan.names.index("vqa")
  assert {e.task_id for e in ws.data.prep_examples("vqa")} == {vqa}
  assert len(ws.data.prep_examples("vqa")) == len(ws.data.subsets()["vqa"]["large"])
  assert len(ws.data.prep_examples("mini_vqa")) == len(ws.data.subsets()["vqa"]["mini"])
  assert [m for m, _ in plan.prep_models("precise")] == (
      ["mini"] + [f"{u}+mini" for u in units] + units + [f"mini_{u}" for u in units])
  assert [m for m, _ in plan.prep_models("real")] == ["mini"] + [f"{u}+mini" for u in units]
  with pytest.raises(PipelineError, match="unknown preparation model 'ocr\\+mini'"):
    ws.data.prep_examples("ocr+mini")


def test_a_task_without_metric_is_trained_not_scored(tmp_path):
  config = micro_config()
  config.tasks.chat.metric = None
  assert config_lib.build(config).tasks.eval_tasks == ("caption", "vqa", "count", "grounding")
  config.tasks.vqa.metric = None
  with pytest.raises(PipelineError, match=r"balanced task\(s\) \['vqa'\] have no metric"):
    config_lib.build(config)


def test_data_stats_count_truncation(tmp_path):
  config = micro_config()
  # LLaVA-1.5's long system prompt: the prompt side, not the answer, has to give way.
  config.data.system_prompt = None
  config.data.max_len = 120
  w = workspace(config, tmp_path)
  w.data.prepare()
  stats = fileio.read_json(tmp_path / "data_stats.json")
  assert sum(s["truncated"] for s in stats.values()) > 0
  assert list(stats) == [f"{t} (train)" for t in w.config.tasks.names]
  for task, s in stats.items():
    assert s["samples"] + s["dropped_too_long"] == 24, task
  # Truncation never cuts an answer: every kept example still has its label tokens.
  assert all(e.label_mask.any() for exs in w.data.encoded_train().values() for e in exs)


def test_all_samples_too_long_is_a_clear_error(tmp_path):
  config = micro_config()
  config.data.max_len = 20
  with pytest.raises(PipelineError, match="task 'caption' has no usable training samples"):
    workspace(config, tmp_path).data.prepare()
  assert os.path.exists(tmp_path / "data_stats.json")  # the counts say why


def test_empty_split_names_task_and_split(ws, tmp_path):
  w = workspace(micro_config(), tmp_path)
  os.makedirs(w.data.root)
  samples = [s for s in json.load(open(os.path.join(ws.data.root, "val.json")))
             if s["task"] != "count"]
  for s in samples:
    if "image" in s:
      s["image"] = os.path.join(ws.data.root, s["image"])
  with open(os.path.join(w.data.root, "val.json"), "w") as f:
    json.dump(samples, f)
  with pytest.raises(PipelineError, match="task 'count' has no samples in the val split"):
    w.data.samples("val")


def test_missing_outputs_name_the_stage_to_run(tmp_path):
  w = workspace(micro_config(), tmp_path)
  with pytest.raises(PipelineError, match="validation.json does not exist"):
    w.dir.read_output("scores", "validation.json")
  with pytest.raises(PipelineError, match="run the 'data' stage first"):
    w.data.tokenizer  # pylint: disable=pointless-statement


def test_missing_image_is_named(ws, tmp_path):
  w = workspace(micro_config(), tmp_path)
  w.data.prepare()
  victim = next(s for s in w.data.samples("train") if s.get("image_path"))
  os.remove(victim["image_path"])
  fresh = workspace(micro_config(), tmp_path)
  with pytest.raises(ValueError, match=os.path.basename(victim["image_path"])):
    fresh.data.prepare()


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_dynamic_baseline_keeps_fixed_task_and_logs_its_lambda(ws):
  plan = ws.config.tasks
  method = methods.get("rlw").train_method(plan.base_weights(), plan.fixed_mask())
  ws.models.train("final/rlw", ws.data.task_examples(plan.names), method, stage_hash="h")
  records = [json.loads(line) for line in open(os.path.join(ws.workdir, "final", "rlw",
                                                             "metrics.jsonl"))]
  lams = [r["lambda"] for r in records]
  assert all(lam["chat"] == 1.0 for lam in lams)  # the fixed task keeps its weight
  balanced = [[lam[t] for t in plan.balanced_units] for lam in lams[1:]]
  np.testing.assert_allclose(np.mean(balanced, axis=1), 1.0, rtol=1e-5)
  assert len({tuple(np.round(b, 6)) for b in balanced}) == len(balanced)  # redrawn every step
  info = fileio.read_json(os.path.join(ws.workdir, "final", "rlw", "run.json"))
  assert info["done"] and info["method"] == "rlw"


def test_a_stage_cannot_read_a_section_its_hash_omits(ws):
  from visatb_jax.pipeline.config import StageInputError
  view = ws.run_config.restricted(("seed", "tasks", "data", "model", "balance.form"), "prep")
  assert view.balance.form == "real"
  assert view.section("data")["source"] == "shapes"
  with pytest.raises(StageInputError, match="stage 'prep' read config.balance.temperature"):
    view.balance.temperature  # pylint: disable=pointless-statement
  with pytest.raises(StageInputError, match="config.eval"):
    view.section("eval")
  with pytest.raises(StageInputError, match="config.methods"):
    view.needs_balance  # pylint: disable=pointless-statement


def test_a_corrupt_image_is_named_by_the_data_stage(tmp_path):
  w = workspace(micro_config(), tmp_path)
  w.data.prepare()
  victim = next(s for s in w.data.samples("test") if s.get("image_path"))["image_path"]
  with open(victim, "r+b") as f:  # a PNG cut short: the header still opens
    f.truncate(60)
  with pytest.raises(PipelineError, match=os.path.basename(victim)):
    workspace(micro_config(), tmp_path).data.prepare()


def test_each_replicate_draws_its_own_subsets_with_mini_inside_large(ws):
  """docs/method.md §13: replicate 0 is the run's seed; the others draw their own subsets."""
  from visatb_jax.data import subsets
  assert ws.data.replicate_seed(0) == int(ws.config.seed)
  assert ws.data.replicate_seed(1) == subsets.replicate_seed(int(ws.config.seed), 1)
  assert ws.data.replicate_seed(1) not in (ws.data.replicate_seed(0), ws.data.replicate_seed(2))
  first, second = ws.data.subsets(0), ws.data.subsets(1)
  for part in (first, second):
    for task, s in part.items():
      assert set(s["mini"]) <= set(s["large"]), task
  assert any(not np.array_equal(first[t]["mini"], second[t]["mini"]) for t in first)
  # The preparation data of a replicate follows its own subsets.
  assert len(ws.data.prep_examples("mini", 1)) == sum(len(s["mini"]) for s in second.values())
