"""The zero-shot benchmarks' own metrics on their way to the report (docs/method.md §8, §12):
MMBench's question ids from the samples into the scorer, POPE's and MME's corpus reports from the
per-sample scores (pipeline/evaluation.py), scores/test_reports.json summarised
(pipeline/comparison.py) and rendered, and a skipped zero-shot suite said in the report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from visatb_jax.data import tokenizer as tk
from visatb_jax.pipeline import comparison as comparison_lib
from visatb_jax.pipeline import evaluation
from visatb_jax.pipeline import report


def _sample(sample_id: str, answer: str, **fields) -> dict:
  return {"id": sample_id, "conversations": [{"from": "human", "value": "Is there a dog?"},
                                             {"from": "gpt", "value": answer}], **fields}


# POPE: the hand-computed case of tests/core/test_metrics_benchmarks.py, as samples.
POPE_LABELS = ["yes", "yes", "no", "no", "yes", "no", "no"]
POPE_CORRECT = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
POPE_SPLITS = ["random"] * 4 + ["adversarial"] * 3
POPE = [_sample(f"p{i}", a, category=c, task="POPE")
        for i, (a, c) in enumerate(zip(POPE_LABELS, POPE_SPLITS))]
# MME: existence (images a, b) scores 125, code_reasoning (image c) 200.
MME = [_sample(f"m{i}", a, category=c, image=f"{c}/{img}.jpg", task="MME")
       for i, (a, c, img) in enumerate(zip(
           ["yes", "no", "yes", "no", "yes", "no"],
           ["existence"] * 4 + ["code_reasoning"] * 2, "aabbcc"))]
MME_CORRECT = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def _scores(samples, correct):
  return {s["id"]: c for s, c in zip(samples, correct)}


def test_task_report_of_pope_and_mme_hand_computed():
  pope = evaluation.task_report("POPE", "pope", POPE, _scores(POPE, POPE_CORRECT))
  assert pope["splits"]["random"]["f1"] == pytest.approx(0.5)
  assert pope["splits"]["adversarial"] == pytest.approx(
      {"accuracy": 2 / 3, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 2 / 3})
  assert pope["mean"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
  mme = evaluation.task_report("MME", "mme", MME, _scores(MME, MME_CORRECT))
  assert (mme["perception"], mme["cognition"]) == pytest.approx((125.0, 200.0))
  assert evaluation.task_report("vqa", "exact_match", POPE, {}) is None


def test_a_task_report_that_cannot_be_computed_says_why():
  no_category = [{k: v for k, v in s.items() if k != "category"} for s in MME]
  got = evaluation.task_report("MME", "mme", no_category, _scores(MME, MME_CORRECT))
  assert "task 'MME'" in got["error"] and "'category'" in got["error"]
  stale = evaluation.task_report("POPE", "pope", POPE, {"p0": 1.0})
  assert "not the 7 samples of its file" in stale["error"]
  # POPE without its split: one split, "all".
  plain = [{k: v for k, v in s.items() if k != "category"} for s in POPE]
  assert list(evaluation.task_report("POPE", "pope", plain,
                                     _scores(POPE, POPE_CORRECT))["splits"]) == ["all"]


def test_corpus_reports_read_only_the_samples_of_tasks_that_have_a_report():
  asked = []

  def task_samples(tasks):
    asked.append(list(tasks))
    return {"POPE": POPE, "MME": MME}

  samples = {"ew": {"POPE": _scores(POPE, POPE_CORRECT), "vqa": {"v0": 1.0}},
             "untrained": {"POPE": _scores(POPE, [1.0] * 7), "MME": _scores(MME, MME_CORRECT)}}
  out = evaluation.corpus_reports(samples, {"POPE": "pope", "MME": "mme", "vqa": "exact_match"},
                                  task_samples)
  assert asked == [["POPE", "MME"]]
  assert set(out["ew"]) == {"POPE"} and set(out["untrained"]) == {"POPE", "MME"}
  assert out["untrained"]["POPE"]["mean"]["accuracy"] == 1.0
  assert evaluation.corpus_reports({"ew": {"vqa": {}}}, {"vqa": "exact_match"},
                                   lambda t: pytest.fail("read samples")) == {}


def test_mmbench_samples_give_their_questions_to_the_scorer():
  tok = tk.train_tokenizer(["USER: <image> Which? ASSISTANT: A B C D"] * 5, vocab_size=280,
                           save_dir=None)
  # Two questions, two shifts each; question 7's shift 1 answered wrong.
  rows = [(7, 0, "A"), (1000007, 1, "B"), (8, 0, "C"), (1000008, 1, "D")]
  samples = [{"id": f"mmb-{index}", "task": "MMBench", "index": index, "image_path": None,
              "conversations": [{"from": "human", "value": "Which?"},
                                {"from": "gpt", "value": answer}]}
             for index, _, answer in rows]
  sets = evaluation.build_eval_sets(samples, tokenizer=tok,
                                    task_metrics={"MMBench": "mmbench_circular"}, image_size=8)
  es = sets["MMBench"]
  assert es.sample_arguments == {"questions": [7, 7, 8, 8], "shifts": [0, 1, 0, 1]}
  per_sample = evaluation.score_predictions(es, ["A", "C", "C", "D"])
  assert per_sample == {"mmb-7": 0.0, "mmb-1000007": 0.0, "mmb-8": 1.0, "mmb-1000008": 1.0}
  with pytest.raises(ValueError, match="task 'MMBench' .*sample 'mmb-x'.*'question_id'"):
    evaluation.scorer_sample_arguments("MMBench", "mmbench_circular",
                                       [{"id": "mmb-x", "conversations": []}])
  assert evaluation.scorer_sample_arguments("vqa", "exact_match", samples) == {}


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def _reports():
  return {
      "ew": {"POPE": evaluation.task_report("POPE", "pope", POPE, _scores(POPE, POPE_CORRECT)),
             "MME": evaluation.task_report("MME", "mme", MME, _scores(MME, MME_CORRECT))},
      "untrained": {"MME": {"error": "task 'MME': no category"}},
  }


def test_corpus_summary_keeps_the_report_numbers():
  summary = comparison_lib.corpus_summary(_reports())
  pope = summary["pope"]["POPE"]["ew"]
  assert list(pope) == ["random", "adversarial", "mean"]
  assert pope["adversarial"]["f1"] == pytest.approx(2 / 3)
  assert pope["mean"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
  mme = summary["mme"]["MME"]["ew"]
  assert (mme["perception"], mme["cognition"]) == pytest.approx((125.0, 200.0))
  assert len(mme["missing"]) == 12  # 14 subtasks, 2 present
  assert summary["errors"] == ["untrained, MME: task 'MME': no category"]
  assert comparison_lib.corpus_summary(None) == {"pope": {}, "mme": {}, "errors": []}


def test_the_report_shows_pope_and_mme_and_a_skipped_suite(tmp_path):
  workdir = str(tmp_path / "run")
  _write_json(os.path.join(workdir, "scores", "test.json"),
              {"ew": {"vqa": 0.5, "POPE": float(np.mean(POPE_CORRECT))},
               "stl": {"vqa": 0.4}})
  _write_json(os.path.join(workdir, "scores", "test_reports.json"), _reports())
  md = open(report.write_report(workdir), encoding="utf-8").read()
  assert "## POPE and MME as their evaluations report them" in md
  assert "| ew | adversarial | 0.6667 | 0.6667 | 0.5 | 1 | 0.6667 |" in md
  assert "| ew | mean | 0.5833 |" in md
  assert "| ew | 125 | 200 |" in md
  assert "- untrained, MME: task 'MME': no category" in md
  assert "skipped" not in md

  why = "config.zero_shot_root is empty, so the zero-shot suite (POPE) is skipped"
  _write_json(os.path.join(workdir, "config.json"), {"task_order": ["vqa"],
                                                     "zero_shot_skipped": why})
  md = open(report.write_report(workdir), encoding="utf-8").read()
  assert ("Zero-shot tasks not scored: config.zero_shot_root is empty, so the zero-shot suite "
          "(POPE) is skipped." in md)


def test_a_run_without_pope_or_mme_has_no_such_section(tmp_path):
  workdir = str(tmp_path / "run")
  _write_json(os.path.join(workdir, "scores", "test.json"), {"ew": {"vqa": 0.5}})
  _write_json(os.path.join(workdir, "scores", "test_reports.json"), {})
  md = open(report.write_report(workdir), encoding="utf-8").read()
  assert "POPE and MME" not in md
