"""Tests for visatb_jax.metrics: ΔI/ΔE, exact match, accuracy, IoU accuracy, CIDEr-D."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider_scorer import CiderScorer

from visatb_jax.core import metrics

# ---------------------------------------------------------------------------------------------
# ΔI% / ΔE%
# ---------------------------------------------------------------------------------------------

BASELINE = {"vqa": 0.50, "caption": 1.00, "error_rate": 0.20, "multi": [0.40, 2.0]}
METHOD = {"vqa": 0.55, "caption": 0.90, "error_rate": 0.15, "multi": [0.50, 2.5]}
HIGHER_IS_BETTER = {"error_rate": False, "multi": [True, False]}


def test_delta_metrics_hand_computed():
  out = metrics.delta_metrics(BASELINE, METHOD, HIGHER_IS_BETTER)
  # vqa:        +(0.55 − 0.50) / 0.50 = +0.10
  # caption:    +(0.90 − 1.00) / 1.00 = −0.10
  # error_rate: −(0.15 − 0.20) / 0.20 = +0.25            (lower is better)
  # multi:      mean(+(0.5 − 0.4) / 0.4, −(2.5 − 2.0) / 2.0) = mean(+0.25, −0.25) = 0
  assert out["per_task"] == pytest.approx(
      {"vqa": 10.0, "caption": -10.0, "error_rate": 25.0, "multi": 0.0})
  # ΔI% = 100 · (0.10 − 0.10 + 0.25 + 0) / 4 = 6.25
  assert out["delta_i"] == pytest.approx(6.25)
  # ΔE% = 100 · (0 + 0.10 + 0 + 0) / 4 = 2.5
  assert out["delta_e"] == pytest.approx(2.5)
  assert isinstance(out["delta_i"], float) and isinstance(out["delta_e"], float)


def test_delta_metrics_defaults_and_broadcast_direction():
  # Default: every metric higher-is-better. multi: mean(+0.25, +0.25) = 0.25.
  out = metrics.delta_metrics({"multi": [0.4, 2.0]}, {"multi": [0.5, 2.5]})
  assert out["per_task"]["multi"] == pytest.approx(25.0)
  assert out["delta_e"] == 0.0
  # A single bool applies to every metric of a list-valued task: mean(−0.25, −0.25).
  out = metrics.delta_metrics({"multi": [0.4, 2.0]}, {"multi": [0.5, 2.5]}, {"multi": False})
  assert out["delta_i"] == pytest.approx(-25.0)
  assert out["delta_e"] == pytest.approx(25.0)


def test_delta_metrics_identical_is_zero_and_numpy_values_accepted():
  out = metrics.delta_metrics(BASELINE, dict(BASELINE), HIGHER_IS_BETTER)
  assert out["delta_i"] == 0.0 and out["delta_e"] == 0.0
  out = metrics.delta_metrics({"a": np.float32(0.5)}, {"a": np.array([0.75])})
  assert out["delta_i"] == pytest.approx(50.0)


def test_delta_zero_shot_is_delta_i_against_ew():
  ew = {"zs1": 0.4, "zs2": 0.8}
  method = {"zs1": 0.5, "zs2": 0.6}
  # (+0.25 − 0.25) / 2 = 0
  assert metrics.delta_zero_shot(ew, method) == pytest.approx(0.0)
  assert metrics.delta_zero_shot(BASELINE, METHOD, HIGHER_IS_BETTER) == pytest.approx(6.25)


@pytest.mark.parametrize(
    "baseline, method, hib, match",
    [
        ({"a": 1.0, "b": 1.0}, {"a": 1.0}, None, "'b'.*not in the method"),
        ({"a": 1.0}, {"a": 1.0, "c": 1.0}, None, "'c'.*not in the baseline"),
        ({"a": 1.0}, {"a": 1.0}, {"typo": False}, "'typo'.*higher_is_better"),
        ({"a": [1.0, 2.0]}, {"a": [1.0]}, None, "'a'.*2 metric values.*1"),
        ({"a": 1.0}, {"a": [1.0, 2.0]}, None, "'a'.*1 metric values.*2"),
        ({"a": [1.0, 2.0]}, {"a": [1.0, 2.0]}, {"a": [True]}, "'a'.*higher_is_better has 1"),
        ({"a": 1.0}, {"a": 1.0}, {"a": "yes"}, "'a'.*bool"),
        ({"a": 0.0}, {"a": 1.0}, None, "'a'.*is 0"),
        ({"a": [1.0, 0.0]}, {"a": [1.0, 1.0]}, None, "'a'.*metric 1 is 0"),
        ({"a": float("nan")}, {"a": 1.0}, None, "'a'.*baseline.*not finite"),
        ({"a": 1.0}, {"a": float("inf")}, None, "'a'.*method.*not finite"),
        ({"a": [1.0, float("-inf")]}, {"a": [1.0, 1.0]}, None, "'a'.*not finite"),
        ({"a": []}, {"a": []}, None, "'a'.*empty"),
        ({"a": "0.5"}, {"a": 0.5}, None, "'a'.*number"),
        ({"a": [None]}, {"a": [0.5]}, None, "'a'.*not a number"),
        ({}, {}, None, "at least one task"),
    ],
)
def test_delta_metrics_errors(baseline, method, hib, match):
  with pytest.raises(ValueError, match=match):
    metrics.delta_metrics(baseline, method, hib)


# ---------------------------------------------------------------------------------------------
# Exact match and accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("  Yes.  ", "yes"),
        ("Two .", "two"),
        ("a red circle.\n", "a red circle"),
        ("3.5", "3.5"),          # only a trailing period goes
        ("etc..", "etc."),       # and only one of them
        ("", ""),
        (".", ""),
    ],
)
def test_normalize_answer(raw, expected):
  assert metrics.normalize_answer(raw) == expected


def test_exact_match_normalisation_and_multiple_references():
  preds = ["Yes.", "blue ", "Red", "two", "circle"]
  refs = ["yes", ["Blue", "navy"], "red.", ["2", "Two."], "square"]
  # hits: yes, blue, red, two; miss: circle → 4 / 5
  assert metrics.exact_match(preds, refs) == pytest.approx(0.8)
  assert metrics.exact_match(["yes"], ["yes"]) == 1.0
  assert metrics.exact_match(["no"], [["yes", "yeah"]]) == 0.0


def test_exact_match_errors():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.exact_match(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.exact_match([], [])
  with pytest.raises(ValueError, match="item 1 has no references"):
    metrics.exact_match(["a", "b"], ["a", []])
  with pytest.raises(ValueError, match="item 0.*not a string"):
    metrics.exact_match(["a"], [[3]])


def test_accuracy_open_and_closed_set():
  preds = ["Cat.", "dog", "bird", "DOG"]
  refs = ["cat", "dog", "fish", "cat"]
  # cat ✓, dog ✓, bird ✗, dog ✗ → 2 / 4
  assert metrics.accuracy(preds, refs) == pytest.approx(0.5)
  choices = ["cat", "dog", "fish"]
  # "bird" is outside the set: still wrong, nothing else changes.
  assert metrics.accuracy(preds, refs, choices=choices) == pytest.approx(0.5)
  assert metrics.accuracy(["Cat"], ["cat"], choices=["Cat."]) == 1.0
  assert metrics.accuracy(["lion"], ["cat"], choices=choices) == 0.0


def test_accuracy_errors():
  with pytest.raises(ValueError, match="item 0.*'lion' is not one of the choices"):
    metrics.accuracy(["cat"], ["lion"], choices=["cat", "dog"])
  with pytest.raises(ValueError, match="item 0.*not a string"):
    metrics.accuracy(["cat"], [["cat"]])
  with pytest.raises(ValueError, match="1 predictions but 2 references"):
    metrics.accuracy(["cat"], ["cat", "dog"])


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
        ("  [ 0.1 ,0.2,  0.3 , 0.4 ]  ", (0.1, 0.2, 0.3, 0.4)),
        ("[0.1,0.2,0.3,0.4].", (0.1, 0.2, 0.3, 0.4)),
        ("[0, 0, 1, 1]", (0.0, 0.0, 1.0, 1.0)),
        ("[.5, 0.25, 1., 1.0]", (0.5, 0.25, 1.0, 1.0)),
        ("[1e-1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
        ("0.1, 0.2, 0.3, 0.4", None),            # no brackets
        ("(0.1, 0.2, 0.3, 0.4)", None),          # wrong brackets
        ("[0.1, 0.2, 0.3]", None),               # 3 numbers
        ("[0.1, 0.2, 0.3, 0.4, 0.5]", None),     # 5 numbers
        ("[0.1 0.2 0.3 0.4]", None),             # no commas
        ("the box is [0.1, 0.2, 0.3, 0.4]", None),
        ("a red circle", None),                  # garbage
        ("", None),
        ("[a, b, c, d]", None),
        ("[0.5, 0.2, 0.3, 0.4]", None),          # x2 < x1
        ("[0.1, 0.5, 0.3, 0.4]", None),          # y2 < y1
        ("[0.3, 0.2, 0.3, 0.4]", None),          # x2 == x1: no area
        ("[0.1, 0.2, 1.3, 0.4]", None),          # out of [0, 1]
        ("[-0.1, 0.2, 0.3, 0.4]", None),
        (None, None),
    ],
)
def test_parse_box(text, expected):
  got = metrics.parse_box(text)
  if expected is None:
    assert got is None
  else:
    assert got == pytest.approx(expected)


def test_box_iou_hand_computed():
  a = (0.0, 0.0, 0.5, 0.5)
  b = (0.25, 0.25, 0.75, 0.75)
  # intersection 0.25 · 0.25 = 0.0625; union 0.25 + 0.25 − 0.0625 = 0.4375; IoU = 1/7
  assert metrics.box_iou(a, b) == pytest.approx(1 / 7)
  assert metrics.box_iou(b, a) == pytest.approx(1 / 7)
  assert metrics.box_iou(a, a) == pytest.approx(1.0)
  assert metrics.box_iou(a, (0.6, 0.6, 0.9, 0.9)) == 0.0
  # touching edges: zero-width intersection
  assert metrics.box_iou(a, (0.5, 0.0, 1.0, 0.5)) == 0.0


def test_iou_accuracy_counts_hits_and_unparsable():
  preds = [
      "[0.1, 0.1, 0.5, 0.5]",     # identical: IoU 1 → hit
      "[0.0, 0.0, 0.5, 0.5]",     # vs [0.25,0.25,0.75,0.75]: IoU 1/7 → miss
      "[0, 0, 0.5, 0.5]",         # vs [0,0,1,0.5]: 0.25 / 0.5 = exactly 0.5 → miss (needs >)
      "no box here",              # unparsable
      "[0.6, 0.1, 0.2, 0.5]",     # x2 < x1: counted as unparsable
  ]
  refs = ["[0.1, 0.1, 0.5, 0.5]", (0.25, 0.25, 0.75, 0.75), [0.0, 0.0, 1.0, 0.5],
          "[0.1, 0.1, 0.5, 0.5]", "[0.1, 0.1, 0.5, 0.5]"]
  value, details = metrics.iou_accuracy(preds, refs)
  assert value == pytest.approx(1 / 5)
  assert details == {"unparsable": 2}
  # A lower threshold turns the exact-0.5 case into a hit: 2 / 5.
  value, _ = metrics.iou_accuracy(preds, refs, threshold=0.4)
  assert value == pytest.approx(2 / 5)


def test_iou_accuracy_errors():
  with pytest.raises(ValueError, match="item 0.*not a valid box"):
    metrics.iou_accuracy(["[0, 0, 1, 1]"], ["garbage"])
  with pytest.raises(ValueError, match="item 0.*not a valid box"):
    metrics.iou_accuracy(["[0, 0, 1, 1]"], [(0.0, 0.0, 1.0)])
  with pytest.raises(ValueError, match="item 0.*not a valid box"):
    metrics.iou_accuracy(["[0, 0, 1, 1]"], [None])
  with pytest.raises(ValueError, match="threshold"):
    metrics.iou_accuracy(["[0, 0, 1, 1]"], ["[0, 0, 1, 1]"], threshold=1.0)
  with pytest.raises(ValueError, match="no predictions"):
    metrics.iou_accuracy([], [])


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------


def _coco_cider(predictions, references):
  """pycocoevalcap's Cider (CIDEr-D) on captions pre-tokenised with our tokenizer."""
  scorer = CiderScorer(n=4, sigma=6.0)
  for pred, refs in zip(predictions, references):
    scorer += (" ".join(metrics.cider_tokenize(pred)),
               [" ".join(metrics.cider_tokenize(r)) for r in refs])
  mean, per_item = scorer.compute_score()
  return float(mean), np.asarray(per_item)


def test_cider_tokenize():
  assert metrics.cider_tokenize("A red Circle, and a blue square.") == [
      "a", "red", "circle", "and", "a", "blue", "square"]
  assert metrics.cider_tokenize("  man's  hat!\n") == ["mans", "hat"]
  assert metrics.cider_tokenize("...") == []


def test_cider_identical_scores_maximum():
  # Every reference equals its candidate and the images share no n-gram, so every n-gram has
  # idf log 2 > 0: each order's clipped cosine is 1, no length penalty → 10 · 4/4 = 10.
  refs = [["a big red circle on top"], ["one small blue square below it"]]
  preds = [r[0] for r in refs]
  assert metrics.cider(preds, refs) == pytest.approx(10.0)
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), [10.0, 10.0])
  # Several identical references: the per-reference average is still 10.
  assert metrics.cider(preds, [r * 3 for r in refs]) == pytest.approx(10.0)


def test_cider_hand_computed_two_images():
  # Corpus of 2 images → log N = log 2 =: g. Every reference n-gram has df 1 → idf g; an n-gram
  # unseen in the references ("blue circle") counts df as 1 → idf g as well.
  preds = ["red circle", "blue circle"]
  refs = [["red circle"], ["blue square"]]
  # Image 1: identical. Unigrams: cos 1; bigrams: cos 1; no 3-/4-grams → 0. Same length.
  #   10 · (1 + 1 + 0 + 0) / 4 = 5
  # Image 2: candidate unigrams {blue: g, circle: g}, reference {blue: g, square: g}:
  #   Σ min(h, r)·r = g² (blue only); norms √2·g each → 1/2. Bigrams share nothing → 0.
  #   10 · (1/2 + 0 + 0 + 0) / 4 = 1.25
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), [5.0, 1.25])
  # Corpus: (5 + 1.25) / 2 = 3.125
  assert metrics.cider(preds, refs) == pytest.approx(3.125)


def test_cider_hand_computed_clipping_and_length_penalty():
  preds = ["red red circle", "blue square"]
  refs = [["red circle"], ["blue square"]]
  # All idf = g = log 2 (see above), so g cancels in every cosine.
  # Image 1, unigrams: candidate {red: 2g, circle: g} (norm √5·g), reference {red: g, circle: g}
  #   (norm √2·g). Clipped: min(2g, g)·g + min(g, g)·g = 2g² → 2/√10 (unclipped would be 3/√10).
  # Bigrams: candidate {red red: g, red circle: g} (norm √2·g), reference {red circle: g}:
  #   g² / (√2·g · g) = 1/√2.  Trigrams: the reference has none → 0.
  # Lengths 3 vs 2: penalty exp(−1 / (2 · 36)) = exp(−1/72).
  image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
  # Image 2 is identical with 2 words: 10 · (1 + 1) / 4 = 5.
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), [image1, 5.0], rtol=1e-12)
  assert metrics.cider(preds, refs) == pytest.approx((image1 + 5.0) / 2)
  assert image1 == pytest.approx(3.3027, abs=1e-4)  # 10 · 0.98621 · 1.33957 / 4


def test_cider_single_image_corpus_is_zero():
  # idf = log 1 − log 1 = 0 for every n-gram: CIDEr is corpus-relative.
  assert metrics.cider(["a red circle"], [["a red circle"]]) == 0.0


CAPTIONS = [
    ("A red circle above a blue square.",
     ["a red circle above a blue square", "A red circle is on top of a blue square.",
      "red circle, blue square"]),
    ("two green triangles", ["Two green triangles.", "a pair of green triangles"]),
    ("a yellow star star star", ["a yellow star", "one yellow star in the corner"]),
    ("blue", ["a blue square on the left", "blue square"]),
    ("", ["an empty picture"]),
    ("a small purple circle to the left of a large orange square in the middle of the image",
     ["a purple circle left of an orange square", "small purple circle and big orange square"]),
]


def test_cider_matches_pycocoevalcap():
  preds = [c for c, _ in CAPTIONS]
  refs = [r for _, r in CAPTIONS]
  coco_mean, coco_items = _coco_cider(preds, refs)
  assert metrics.cider(preds, refs) == pytest.approx(coco_mean, abs=1e-6)
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), coco_items, atol=1e-6)
  assert coco_mean > 0.5  # a non-trivial corpus, not a vacuous agreement on zeros


_WORDS = st.sampled_from(["a", "red", "blue", "circle", "square", "big", "on", "the"])
_CANDIDATE = st.lists(_WORDS, min_size=0, max_size=9).map(" ".join)
# pycocoevalcap fails (max() of an empty sequence) on a corpus whose references are all empty.
_REFERENCE = st.lists(_WORDS, min_size=1, max_size=9).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_CANDIDATE, st.lists(_REFERENCE, min_size=1, max_size=3)),
                min_size=1, max_size=5))
def test_cider_matches_pycocoevalcap_property(corpus):
  preds = [c for c, _ in corpus]
  refs = [r for _, r in corpus]
  coco_mean, coco_items = _coco_cider(preds, refs)
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), coco_items, atol=1e-6)
  assert metrics.cider(preds, refs) == pytest.approx(coco_mean, abs=1e-6)
  assert 0.0 <= metrics.cider(preds, refs) <= 10.0 + 1e-9


def test_cider_errors():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.cider(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.cider([], [])
  with pytest.raises(ValueError, match="item 1 has no references"):
    metrics.cider(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="sigma"):
    metrics.cider(["a"], [["a"]], sigma=0.0)


def test_cider_bare_string_reference_is_one_reference():
  preds = ["red circle", "blue circle"]
  assert metrics.cider(preds, ["red circle", "blue square"]) == pytest.approx(
      metrics.cider(preds, [["red circle"], ["blue square"]]))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_scorers_registry_and_score():
  assert set(metrics.SCORERS) == {"exact_match", "accuracy", "iou_accuracy", "cider"}
  assert metrics.score("exact_match", ["Yes."], ["yes"]) == 1.0
  got = metrics.score("iou_accuracy", ["[0, 0, 1, 1]", "bad"], ["[0, 0, 1, 1]", "[0, 0, 1, 1]"])
  assert isinstance(got, float) and got == pytest.approx(0.5)
  assert metrics.score("cider", ["red circle", "blue circle"],
                       [["red circle"], ["blue square"]]) == pytest.approx(3.125)
  assert metrics.score("accuracy", ["bird"], ["cat"], choices=["cat", "bird"]) == 0.0
  assert metrics.score("iou_accuracy", ["[0, 0, 0.5, 0.5]"], ["[0, 0, 1, 0.5]"],
                       threshold=0.4) == 1.0


def test_score_unknown_metric():
  with pytest.raises(ValueError, match="unknown metric 'bleu'.*cider"):
    metrics.score("bleu", ["a"], ["a"])


# ---------------------------------------------------------------------------------------------
# Per-sample scores
# ---------------------------------------------------------------------------------------------


def _assert_mean_is_score(metric, preds, refs, **options):
  """sample_scores is float64 [n] and its mean is score() and the scalar scorer, to the bit."""
  per = metrics.sample_scores(metric, preds, refs, **options)
  assert per.dtype == np.float64 and per.shape == (len(preds),)
  expected = metrics.score(metric, preds, refs, **options)
  assert float(np.mean(per)) == expected
  assert metrics.mean_score(per) == expected
  # The route a caller takes: per-sample values keyed by id, then averaged in order.
  by_id = dict(zip((f"s{i}" for i in range(len(per))), per.tolist()))
  assert metrics.mean_score(list(by_id.values())) == expected
  scalar = metrics.SCORERS[metric](preds, refs, **options)
  assert (scalar[0] if isinstance(scalar, tuple) else scalar) == expected
  return per


def test_sample_scorers_cover_every_scorer():
  assert set(metrics.SAMPLE_SCORERS) == set(metrics.SCORERS)


def test_exact_match_sample_scores_hand_computed():
  preds = ["Yes.", "blue ", "Red", "two", "circle"]
  refs = ["yes", ["Blue", "navy"], "red.", ["2", "Two."], "square"]
  per = _assert_mean_is_score("exact_match", preds, refs)
  np.testing.assert_array_equal(per, [1.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(metrics.exact_match_scores(preds, refs), per)


def test_accuracy_sample_scores_hand_computed():
  preds = ["Cat.", "dog", "bird", "DOG"]
  refs = ["cat", "dog", "fish", "cat"]
  per = _assert_mean_is_score("accuracy", preds, refs, choices=["cat", "dog", "fish"])
  np.testing.assert_array_equal(per, [1.0, 1.0, 0.0, 0.0])
  # Outside the choices a prediction is wrong even when it equals the label.
  np.testing.assert_array_equal(
      metrics.accuracy_scores(["lion", "lion"], ["lion", "cat"]), [1.0, 0.0])
  with pytest.raises(ValueError, match="not one of the choices"):
    metrics.sample_scores("accuracy", ["lion"], ["lion"], choices=["cat"])


def test_iou_sample_scores_hand_computed():
  preds = ["[0.1, 0.1, 0.5, 0.5]", "[0.0, 0.0, 0.5, 0.5]", "[0, 0, 0.5, 0.5]", "no box here",
           "[0.6, 0.1, 0.2, 0.5]"]
  refs = ["[0.1, 0.1, 0.5, 0.5]", (0.25, 0.25, 0.75, 0.75), [0.0, 0.0, 1.0, 0.5],
          "[0.1, 0.1, 0.5, 0.5]", "[0.1, 0.1, 0.5, 0.5]"]
  # IoU 1 → hit; 1/7 → miss; exactly 0.5 → miss (needs >); unparsable; degenerate box.
  per = _assert_mean_is_score("iou_accuracy", preds, refs)
  np.testing.assert_array_equal(per, [1.0, 0.0, 0.0, 0.0, 0.0])
  # At threshold 0.4 the exact-0.5 item becomes a hit.
  per = _assert_mean_is_score("iou_accuracy", preds, refs, threshold=0.4)
  np.testing.assert_array_equal(per, [1.0, 0.0, 1.0, 0.0, 0.0])
  np.testing.assert_array_equal(metrics.iou_hits(preds, refs, threshold=0.4), per)
  with pytest.raises(ValueError, match="threshold"):
    metrics.sample_scores("iou_accuracy", preds, refs, threshold=1.0)


def test_cider_sample_scores_are_the_per_image_scores():
  preds = ["red red circle", "blue square"]
  refs = [["red circle"], ["blue square"]]
  per = _assert_mean_is_score("cider", preds, refs)
  image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
  np.testing.assert_allclose(per, [image1, 5.0], rtol=1e-12)
  np.testing.assert_array_equal(per, metrics.cider_scores(preds, refs))
  # The idf comes from the whole corpus: image 2 alone scores 0, not 5.
  assert metrics.sample_scores("cider", preds[1:], refs[1:]).tolist() == [0.0]
  # Options reach the scorer.
  np.testing.assert_array_equal(metrics.sample_scores("cider", preds, refs, n=2, sigma=3.0),
                                metrics.cider_scores(preds, refs, n=2, sigma=3.0))


def test_cider_sample_scores_mean_on_a_larger_corpus():
  preds = [c for c, _ in CAPTIONS]
  refs = [r for _, r in CAPTIONS]
  per = _assert_mean_is_score("cider", preds, refs)
  _, coco_items = _coco_cider(preds, refs)
  np.testing.assert_allclose(per, coco_items, atol=1e-6)


def test_sample_scores_errors():
  with pytest.raises(ValueError, match="unknown metric 'bleu'.*cider"):
    metrics.sample_scores("bleu", ["a"], ["a"])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.sample_scores("exact_match", [], [])
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.sample_scores("iou_accuracy", ["a", "b"], ["[0, 0, 1, 1]"])
  with pytest.raises(ValueError, match="non-empty"):
    metrics.mean_score([])


_ANSWER = st.sampled_from(["yes", "Yes.", "no", " NO ", "cat", "dog.", "Dog", "two", ""])
_LABEL = st.sampled_from(["yes", "no", "cat", "dog"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_ANSWER, st.one_of(_LABEL, st.lists(_ANSWER, min_size=1, max_size=3))),
                min_size=1, max_size=40))
def test_exact_match_sample_mean_is_score_property(items):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  per = _assert_mean_is_score("exact_match", preds, refs)
  assert set(per.tolist()) <= {0.0, 1.0}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_ANSWER, _LABEL), min_size=1, max_size=40), st.booleans())
def test_accuracy_sample_mean_is_score_property(items, closed):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  options = {"choices": ["yes", "no", "cat", "dog"]} if closed else {}
  per = _assert_mean_is_score("accuracy", preds, refs, **options)
  assert set(per.tolist()) <= {0.0, 1.0}


# Valid boxes by construction (x1 < x2, y1 < y2 on a 0.1 grid), not by filtering.
_SPAN = st.tuples(st.integers(0, 9), st.integers(1, 10)).map(
    lambda t: (min(t[0], t[1] - 1) / 10, t[1] / 10))
_BOX = st.tuples(_SPAN, _SPAN).map(lambda s: (s[0][0], s[1][0], s[0][1], s[1][1]))
_BOX_TEXT = _BOX.map(lambda b: "[" + ", ".join(f"{v:g}" for v in b) + "]")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(_BOX_TEXT, st.sampled_from(["", "no box", "[0.5, 0, 0.2, 1]"])),
                          _BOX), min_size=1, max_size=40),
       st.sampled_from([0.0, 0.25, 0.5, 0.75]))
def test_iou_sample_mean_is_score_property(items, threshold):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  per = _assert_mean_is_score("iou_accuracy", preds, refs, threshold=threshold)
  assert set(per.tolist()) <= {0.0, 1.0}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_CANDIDATE, st.lists(_REFERENCE, min_size=1, max_size=3)),
                min_size=1, max_size=12))
def test_cider_sample_mean_is_score_property(corpus):
  preds = [c for c, _ in corpus]
  refs = [r for _, r in corpus]
  per = _assert_mean_is_score("cider", preds, refs)
  np.testing.assert_array_equal(per, metrics.cider_scores(preds, refs))
