"""MMBench's circular evaluation and the POPE / MME corpus reports read back from per-sample
scores (core/metrics.py, docs/method.md §8), each against a case computed by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import metrics

# ---------------------------------------------------------------------------------------------
# MMBench circular evaluation
# ---------------------------------------------------------------------------------------------

# Question 1 (4 shifts) right under every shift; question 2 (4 shifts) wrong under one (shift 2);
# question 3 (2 options, 2 shifts) right under both. Each answer in another parsed form.
MMB_PREDICTIONS = ["A", "(B)", "The answer is C", "D. a cat",
                   "B", "C", "A", "A",
                   "B", "answer: A"]
MMB_REFERENCES = ["A", "B", "C", "D",
                  "B", "C", "D", "A",
                  "B", "A"]
MMB_QUESTIONS = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
MMB_SHIFTS = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_mmbench_circular_hand_computed():
  # 2 of 3 questions right. 10 items: question 1's items hold 10 / (3·4), question 3's 10 / (3·2)
  # and question 2's 0, so that their mean is 2/3.
  values = metrics.mmbench_circular_scores(MMB_PREDICTIONS, MMB_REFERENCES, MMB_QUESTIONS,
                                           MMB_SHIFTS)
  assert values.tolist() == pytest.approx([10 / 12] * 4 + [0.0] * 4 + [10 / 6] * 2)
  assert metrics.mmbench_circular(MMB_PREDICTIONS, MMB_REFERENCES, MMB_QUESTIONS) == \
      pytest.approx(2 / 3)
  assert metrics.score("mmbench_circular", MMB_PREDICTIONS, MMB_REFERENCES,
                       questions=MMB_QUESTIONS, shifts=MMB_SHIFTS) == pytest.approx(2 / 3)
  # Single-pass accuracy over the same items is higher: 9 of 10 items are right.
  assert metrics.multiple_choice(MMB_PREDICTIONS, MMB_REFERENCES) == pytest.approx(0.9)


def test_mmbench_circular_with_equal_shift_counts_is_zero_or_one_per_item():
  values = metrics.mmbench_circular_scores(MMB_PREDICTIONS[:8], MMB_REFERENCES[:8],
                                           MMB_QUESTIONS[:8])
  assert values.tolist() == [1.0] * 4 + [0.0] * 4


def test_mmbench_circular_uses_the_options_text():
  choices = [["cat", "dog"], ["dog", "cat"]]  # the two shifts of one question
  assert metrics.mmbench_circular(["cat", "a cat"], ["A", "B"], ["q", "q"],
                                  choices=choices) == 1.0
  assert metrics.mmbench_circular(["cat", "dog"], ["A", "B"], ["q", "q"], choices=choices) == 0.0


def test_mmbench_circular_refuses_a_shift_twice_and_mismatched_lengths():
  with pytest.raises(ValueError, match="question 1 has shift 0 twice"):
    metrics.mmbench_circular_scores(["A", "A"], ["A", "A"], [1, 1], [0, 0])
  with pytest.raises(ValueError, match="1 questions for 2 predictions"):
    metrics.mmbench_circular_scores(["A", "A"], ["A", "A"], [1])


def test_mmbench_sample_arguments():
  # MMBench's circular copies: index = question + k · 10^6.
  assert metrics.mmbench_sample_arguments({"index": 1000002}) == {"questions": 2, "shifts": 1}
  assert metrics.mmbench_sample_arguments({"index": "17"}) == {"questions": 17, "shifts": 0}
  assert metrics.mmbench_sample_arguments({"question_id": "q7", "shift": 3, "index": 5}) == {
      "questions": "q7", "shifts": 3}
  with pytest.raises(ValueError, match="'question_id'.*'index'"):
    metrics.mmbench_sample_arguments({"id": "x"})


def test_the_question_ids_come_from_samples_not_from_a_config():
  assert metrics.metric_options("mmbench_circular") == ("choices",)
  with pytest.raises(ValueError, match=r"takes no option\(s\) \['questions'\]"):
    metrics.check_metric_options("mmbench_circular", {"questions": [1]})
  got = metrics.gather_sample_arguments(
      metrics.mmbench_sample_arguments, [{"index": 3}, {"index": 2000003}])
  assert got == {"questions": [3, 3], "shifts": [0, 2]}
  with pytest.raises(ValueError, match="sample 'b': an mmbench_circular sample needs"):
    metrics.gather_sample_arguments(metrics.mmbench_sample_arguments,
                                    [{"id": "a", "index": 1}, {"id": "b"}])


# ---------------------------------------------------------------------------------------------
# POPE and MME reports from per-sample scores
# ---------------------------------------------------------------------------------------------


def test_pope_report_from_scores_hand_computed():
  labels = ["yes", "yes", "no", "no", "yes", "no", "no"]
  correct = [1, 0, 1, 0, 1, 1, 0]
  splits = ["random"] * 4 + ["adversarial"] * 3
  # random: answers yes, no, no, yes → TP 1, 2 said yes, 2 are yes: P = R = F1 = 0.5,
  # accuracy 0.5, yes-ratio 0.5. adversarial: answers yes, no, yes → TP 1, 2 said yes, 1 is
  # yes: P 0.5, R 1, F1 2/3, accuracy 2/3, yes-ratio 2/3.
  assert metrics.yes_no_answers(correct, labels) == ["yes", "no", "no", "yes", "yes", "no", "yes"]
  report = metrics.pope_report_from_scores(correct, labels, splits)
  assert list(report["splits"]) == ["random", "adversarial"]
  assert report["splits"]["random"] == pytest.approx(
      {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5})
  assert report["splits"]["adversarial"] == pytest.approx(
      {"accuracy": 2 / 3, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 2 / 3})
  assert report["mean"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_mme_totals_from_scores_hand_computed():
  # existence: image a both right, image b its "no" question wrong → accuracy 3/4, accuracy+
  # 1/2, score 125. code_reasoning: one image, both right → 200.
  labels = ["yes", "no", "yes", "no", "yes", "no"]
  correct = [1, 1, 1, 0, 1, 1]
  pairs = ["a", "a", "b", "b", "c", "c"]
  subtasks = ["existence"] * 4 + ["code_reasoning"] * 2
  totals = metrics.mme_totals_from_scores(correct, labels, pairs, subtasks)
  assert totals["perception"] == pytest.approx(125.0)
  assert totals["cognition"] == pytest.approx(200.0)
  assert "existence" not in totals["missing"] and "count" in totals["missing"]


def test_yes_no_answers_refuse_a_score_that_is_no_correctness():
  with pytest.raises(ValueError, match="item 0: score 0.5"):
    metrics.yes_no_answers([0.5], ["yes"])


_ANSWERS = st.sampled_from(["Yes", "yes.", "No", "no, there is not", "Not sure", "nope",
                            "There is a dog.", "maybe", "YES", "no"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_ANSWERS, st.sampled_from(["yes", "no"]),
                          st.sampled_from(["random", "popular", "adversarial"])),
                min_size=1, max_size=20))
def test_the_reports_from_scores_equal_those_from_the_answers(rows):
  answers, labels, splits = (list(c) for c in zip(*rows))
  assert metrics.pope_report_from_scores(metrics.pope_scores(answers, labels), labels, splits) \
      == metrics.pope_split_report(answers, labels, splits)
  pairs = [str(i // 2) for i in range(len(rows))]
  subtasks = ["count" if s == "random" else "OCR" if s == "popular" else "code_reasoning"
              for s in splits]
  assert metrics.mme_totals_from_scores(metrics.mme_scores(answers, labels), labels, pairs,
                                        subtasks) == \
      metrics.mme_totals(answers, labels, pairs, subtasks)


def test_report_sample_arguments():
  assert metrics.pope_sample_arguments({"category": "popular"}) == {"splits": "popular"}
  assert metrics.pope_sample_arguments({}) == {"splits": "all"}
  assert metrics.mme_sample_arguments({"category": "OCR", "image": "OCR/1.jpg"}) == {
      "pair_ids": "OCR/1.jpg", "subtasks": "OCR"}
  assert metrics.mme_sample_arguments({"category": "OCR", "pair_id": 4, "image": "x"})[
      "pair_ids"] == "4"
  with pytest.raises(ValueError, match="'category'"):
    metrics.mme_sample_arguments({"image": "x.jpg"})
  with pytest.raises(ValueError, match="'pair_id' or 'image'"):
    metrics.mme_sample_arguments({"category": "OCR"})
