"""Tests for visatb_jax.core.metrics: ΔI/ΔE and every per-task scorer."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider import Cider
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


def test_accuracy_list_references():
  # A list of labels: any of them is right; with choices, every one must be a choice.
  assert metrics.accuracy(["Dog", "cat"], [["dog", "puppy"], ["dog"]]) == 0.5
  assert metrics.accuracy(["dog"], [["dog", "cat"]], choices=["cat", "dog"]) == 1.0
  with pytest.raises(ValueError, match="item 0.*not one of the choices"):
    metrics.accuracy(["dog"], [["dog", "puppy"]], choices=["cat", "dog"])


def test_accuracy_errors():
  with pytest.raises(ValueError, match="item 0.*'lion' is not one of the choices"):
    metrics.accuracy(["cat"], ["lion"], choices=["cat", "dog"])
  with pytest.raises(ValueError, match="item 0.*not a string"):
    metrics.accuracy(["cat"], [[3]])
  with pytest.raises(ValueError, match="item 0 has no references"):
    metrics.accuracy(["cat"], [[]])
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
        # The first box anywhere in the answer, as the RefCOCO evaluations read it.
        ("the box is [0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
        ("It is at [0.1, 0.2, 0.5, 0.6]. Not [0.2, 0.2, 0.3, 0.3].", (0.1, 0.2, 0.5, 0.6)),
        ("[[0.1, 0.2, 0.3, 0.4]]", (0.1, 0.2, 0.3, 0.4)),
        ("near [0.1, 0.2, 0.3] or [0.2, 0.3, 0.4, 0.5]", (0.2, 0.3, 0.4, 0.5)),  # 3 numbers: no box
        ("[0.5, 0.2, 0.3, 0.4], i.e. [0.1, 0.2, 0.3, 0.4]", None),  # the FIRST box is invalid
        ("[1, 2, 3, 4] pixels", None),           # out of [0, 1]
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


def test_iou_several_reference_boxes():
  box = "[0, 0, 0.5, 0.5]"
  # Hit if IoU > threshold with any reference: text boxes, number boxes, or a mix.
  refs = [["[0.5, 0.5, 1, 1]", "[0, 0, 0.5, 0.5]"], [(0.5, 0.5, 1.0, 1.0), [0.0, 0.0, 0.5, 0.6]],
          ["[0.5, 0.5, 1, 1]"], (0.0, 0.0, 0.5, 0.5)]
  np.testing.assert_array_equal(metrics.iou_hits([box] * 4, refs), [1.0, 1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="item 0.*not a valid box"):
    metrics.iou_hits([box], [[]])
  with pytest.raises(ValueError, match="item 0.*not a valid box"):
    metrics.iou_hits([box], [["[0, 0, 0.5, 0.5]", "no box"]])


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


def test_cider_matches_pycocoevalcap_cider_class_multi_reference():
  # pycocoevalcap's public `Cider` (CIDEr-D) on a multi-reference corpus: {image: [refs]} and
  # {image: [candidate]}. `Cider` only splits on spaces, so both sides get our tokenisation.
  preds = [c for c, _ in CAPTIONS]
  refs = [r for _, r in CAPTIONS]
  assert max(len(r) for r in refs) == 3
  gts = {i: [" ".join(metrics.cider_tokenize(x)) for x in r] for i, r in enumerate(refs)}
  res = {i: [" ".join(metrics.cider_tokenize(p))] for i, p in enumerate(preds)}
  coco_mean, coco_items = Cider().compute_score(gts, res)
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), coco_items, atol=1e-9)
  assert metrics.cider(preds, refs) == pytest.approx(coco_mean, abs=1e-9)
  # Several references differ from one: the per-reference mean, not the best reference.
  single = metrics.cider_scores(preds, [r[:1] for r in refs])
  assert np.abs(single - metrics.cider_scores(preds, refs)).max() > 0.1


# Captions on which the PTB tokenizer and `cider_tokenize` agree: words, spaces, sentence
# punctuation and double quotes.
PTB_CORPUS = [
    ("A man riding a wave on top of a surfboard.",
     ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave, in the ocean!",
      "a person on a surf board riding a wave"]),
    ("Two dogs play with a frisbee in the park",
     ["Two dogs are playing frisbee; in a green park.", "A pair of dogs chase a frisbee.",
      "dogs playing in the grass"]),
    ("a plate of food with broccoli and rice",
     ["A plate with rice, broccoli and chicken.", "A \"healthy\" meal of rice and broccoli?"]),
    ("a red bus on a city street",
     ["A red double decker bus drives down the street.", "A bus on a busy city street: red."]),
]


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_cider_matches_coco_caption_pipeline_with_ptb_tokenizer():
  # Imported here: the module is only usable with Java.
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top

  preds = [c for c, _ in PTB_CORPUS]
  refs = [r for _, r in PTB_CORPUS]
  tokenizer = ptbtokenizer.PTBTokenizer()
  gts = tokenizer.tokenize({i: [{"caption": x} for x in r] for i, r in enumerate(refs)})
  res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
  # On this corpus the two tokenisations agree token for token ...
  for i, r in enumerate(refs):
    assert gts[i] == [" ".join(metrics.cider_tokenize(x)) for x in r]
    assert res[i] == [" ".join(metrics.cider_tokenize(preds[i]))]
  # ... so the scores are the COCO caption evaluation's (PTB tokenizer, then Cider).
  coco_mean, coco_items = Cider().compute_score(gts, res)
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), coco_items, atol=1e-9)
  assert metrics.cider(preds, refs) == pytest.approx(coco_mean, abs=1e-9)
  assert coco_mean > 0.3
  # The differences `cider_tokenize` documents.
  differing = ["A man's hat", "don't", "e.g. the U.S.", "black-and-white", "(sleeping)"]
  ptb = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(differing)})
  assert [ptb[i][0] for i in range(len(differing))] == [
      "a man 's hat", "do n't", "e.g. the u.s.", "black-and-white", "-lrb- sleeping -rrb-"]
  assert [" ".join(metrics.cider_tokenize(c)) for c in differing] == [
      "a mans hat", "dont", "eg the us", "blackandwhite", "sleeping"]


def test_cider_errors():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.cider(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.cider([], [])
  with pytest.raises(ValueError, match="item 1 has no references"):
    metrics.cider(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="sigma"):
    metrics.cider(["a"], [["a"]], sigma=0.0)


# Captions where the raw and normalised tokenisations differ: case, punctuation, contractions.
RAW_CORPUS = [
    ("A man riding a wave.", ["A man riding a wave on a surfboard.", "a surfer rides a wave"]),
    ("Two dogs play in the park", ["Two dogs are playing, in a park.", "dogs playing in the park"]),
    ("a man's red bus", ["A red bus on a city street.", "a man's bus is red"]),
    ("The food is on a plate", ["the food is on a plate", "A plate with food."]),
]


def test_raw_cider_is_the_releases_pycocoevalcap_call():
  """The release's eval/caption_list.py: Cider().compute_score({id: [references]},
  {id: [prediction]}) on the texts as generated, without PTBTokenizer."""
  preds = [c for c, _ in RAW_CORPUS]
  refs = [r for _, r in RAW_CORPUS]
  coco_mean, coco_items = Cider().compute_score(dict(enumerate(refs)),
                                                {i: [p] for i, p in enumerate(preds)})
  np.testing.assert_allclose(metrics.cider_scores(preds, refs, tokenization="raw"), coco_items,
                             atol=1e-9)
  assert metrics.cider(preds, refs, tokenization="raw") == pytest.approx(coco_mean, abs=1e-9)
  assert metrics.score("cider", preds, refs, tokenization="raw") == pytest.approx(coco_mean)
  # The normalised form is another number on the same captions.
  assert abs(metrics.cider(preds, refs) - coco_mean) > 0.1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.sampled_from(["A", "a", "dog.", "dog", "Red,", "red", "on", "it's"]),
             max_size=7).map(" ".join),
    st.lists(st.lists(st.sampled_from(["A", "a", "dog.", "dog", "Red,", "red", "on"]),
                      min_size=1, max_size=7).map(" ".join), min_size=1, max_size=3)),
    min_size=1, max_size=5))
def test_raw_cider_matches_pycocoevalcap_property(corpus):
  preds = [c for c, _ in corpus]
  refs = [r for _, r in corpus]
  coco_mean, coco_items = Cider().compute_score(dict(enumerate(refs)),
                                                {i: [p] for i, p in enumerate(preds)})
  np.testing.assert_allclose(metrics.cider_scores(preds, refs, tokenization="raw"), coco_items,
                             atol=1e-9)


def test_raw_cider_hand_computed():
  # Item 0: "A dog" against "a dog"; item 1: "a cat" against "A cat". Raw tokens: each shares
  # one word with its reference. idf = log 2 − log(df) with df 1 for every word (A, a, dog, cat
  # each in one reference; a candidate-only word counts as df 1): every unigram weighs log 2,
  # so the unigram cosine is 1/2 (one of two equal weights in each vector), and no bigram is
  # shared. CIDEr-D = 10/4 · (1/2 + 0 + 0 + 0) = 1.25 for each, with equal lengths.
  preds, refs = ["A dog", "a cat"], [["a dog"], ["A cat"]]
  np.testing.assert_allclose(metrics.cider_scores(preds, refs, tokenization="raw"),
                             [1.25, 1.25])
  # Normalised, both match their reference exactly, but "a" is in both references (idf 0):
  # the unigram cosine is 1 (only "dog" / "cat" weigh), the bigram cosine 1 → 10/4 · 2 = 5.
  np.testing.assert_allclose(metrics.cider_scores(preds, refs), [5.0, 5.0])


def test_cider_tokenization_option_is_checked():
  assert metrics.cider_tokens("A dog, barking.", "raw") == ["A", "dog,", "barking."]
  assert metrics.cider_tokens("A dog, barking.") == ["a", "dog", "barking"]
  with pytest.raises(ValueError, match="tokenization 'ptb'.*normalized.*raw"):
    metrics.cider(["a"], [["a"]], tokenization="ptb")
  metrics.check_metric_options("cider", {"tokenization": "raw", "n": 4})
  with pytest.raises(ValueError, match="cider option tokenization='RAW'; choose one of"):
    metrics.check_metric_options("cider", {"tokenization": "RAW"})
  with pytest.raises(ValueError, match=r"takes no option\(s\) \['tokenize'\]"):
    metrics.check_metric_options("cider", {"tokenize": "raw"})


def test_cider_bare_string_reference_is_one_reference():
  preds = ["red circle", "blue circle"]
  assert metrics.cider(preds, ["red circle", "blue square"]) == pytest.approx(
      metrics.cider(preds, [["red circle"], ["blue square"]]))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_scorers_registry_and_score():
  assert set(metrics.SCORERS) == {"exact_match", "accuracy", "iou_accuracy", "cider",
                                  "vqa_accuracy", "multiple_choice", "mmbench_circular",
                                  "pope", "mme"}
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


def test_metric_options_and_unknown_option():
  assert metrics.metric_options("iou_accuracy") == ("threshold",)
  assert metrics.metric_options("cider") == ("n", "sigma", "tokenization")
  assert metrics.metric_options("multiple_choice") == ("choices",)
  assert metrics.metric_options("accuracy") == ("choices",)
  for name in ("exact_match", "vqa_accuracy", "pope", "mme"):
    assert metrics.metric_options(name) == ()
  with pytest.raises(ValueError, match="'exact_match' takes no option.*'threshold'"):
    metrics.score("exact_match", ["a"], ["a"], threshold=0.5)
  with pytest.raises(ValueError, match="'iou_accuracy'.*'thresh'.*'threshold'"):
    metrics.sample_scores("iou_accuracy", ["[0, 0, 1, 1]"], ["[0, 0, 1, 1]"], thresh=0.5)


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


# ---------------------------------------------------------------------------------------------
# VQA soft accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # Every expected value is what the official vqaEval.py (processPunctuation, then
        # processDigitArticle) gives for the raw answer.
        ("Two", "2"),                            # number words → digits
        ("none", "0"),
        ("The One", "1"),
        ("ten", "10"),
        ("the dog", "dog"),                      # articles removed
        ("A dog.", "dog"),                       # and a period not followed by a digit
        ("an apple", "apple"),
        ("dont", "don't"),                       # contractions written without an apostrophe
        ("isnt", "isn't"),
        ("wont", "won't"),
        ("can't", "can't"),                      # the apostrophe is not punctuation there
        ("Im", "im"),                            # capital keys never match after lower-casing
        ("yes!", "yes"),                         # mark not touching a space → a space
        ("hot dog?", "hot dog"),
        ("black-and-white", "black and white"),
        ("black - white", "black white"),        # touching a space → deleted
        ("(a) cat", "cat"),
        ("1,000", "1000"),                       # digit,digit: every mark deleted
        ("x, 1,2", "x 12"),
        ("3.5", "3.5"),                          # a period before a digit stays
        ("12.", "12"),
        ("e.g.", "eg"),
        ("3:00", "3:00"),                        # ":" is not in the official list
        ("a/b", "b"),                            # "/" → space, then "a" is an article
        ("Yes\n", "yes"),
        ("  Red\tcar ", "red car"),
        ("...", ""),
    ],
)
def test_vqa_normalize_official_cases(raw, expected):
  assert metrics.vqa_normalize(raw) == expected


def test_vqa_normalisation_tables():
  assert len(metrics.VQA_CONTRACTIONS) == 120
  assert metrics.VQA_DIGITS["none"] == "0" and len(metrics.VQA_DIGITS) == 12
  assert metrics.VQA_ARTICLES == ("a", "an", "the")
  assert "'" not in metrics.VQA_PUNCTUATION and ":" not in metrics.VQA_PUNCTUATION
  assert len(metrics.VQA_PUNCTUATION) == 21


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                               (10, 1.0)])
def test_vqa_accuracy_ten_humans(matches, expected):
  # m of the 10 humans gave the answer. Leaving out one of them leaves m − 1, leaving out any
  # other leaves m: acc = (m·min((m − 1)/3, 1) + (10 − m)·min(m/3, 1)) / 10, e.g.
  # m = 1: 9 · 1/3 / 10 = 0.3;  m = 2: (2 · 1/3 + 8 · 2/3) / 10 = 0.6;  m = 3: (3 · 2/3 + 7) / 10.
  humans = ["cat"] * matches + ["dog"] * (10 - matches)
  assert metrics.vqa_accuracy_scores(["cat"], [humans])[0] == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides():
  humans = ["2", "two", "Two.", "three", "3", "3", "3", "three", "four", "the 4"]
  # "2" after normalisation: 3 humans; "3": 5 humans; "4": 2 humans; "5": none.
  preds = ["Two", "3!", "4", "five", "2 dogs"]
  np.testing.assert_allclose(metrics.vqa_accuracy_scores(preds, [humans] * 5),
                             [0.9, 1.0, 0.6, 0.0, 0.0], atol=1e-12)
  assert metrics.vqa_accuracy(preds, [humans] * 5) == pytest.approx(2.5 / 5)


def test_vqa_accuracy_few_references():
  # One reference is the answer key: a normalised match scores 1.
  np.testing.assert_array_equal(
      metrics.vqa_accuracy_scores(["The Dog.", "cat"], ["dog", ["dog"]]), [1.0, 0.0])
  # Two references, both "dog": each leave-one-out subset has 1 match → 1/3.
  assert metrics.vqa_accuracy_scores(["dog"], [["dog", "dog"]])[0] == pytest.approx(1 / 3)


def test_vqa_accuracy_errors():
  with pytest.raises(ValueError, match="item 0 has no references"):
    metrics.vqa_accuracy(["a"], [[]])
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.vqa_accuracy(["a", "b"], [["a"]])


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

ANIMALS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("A", "A"), ("b", "B"), ("(C)", "C"), ("[D]", "D"), ("A.", "A"), ("B)", "B"),
        ("C:", "C"), (" (D). ", "D"),
        ("A. cat", "A"), ("(B) dog", "B"), ("C) bird, since it flies", "C"),
        ("The answer is D.", "D"), ("the correct answer is (B)", "B"), ("Answer: C", "C"),
        ("The answer is option A", "A"), ("The correct option is B.", "B"),
        ("I choose choice (C).", "C"), ("so (D) must be right", "D"),
        ("dog", "B"), ("Fish.", "D"),                       # the option text itself
        ("It is a bird.", "C"),                             # one option's text, as words
        ("E", None),                                        # not one of the options
        ("The answer is E", None),
        ("a cat or a dog", None),                           # two options' texts
        ("either (A) or (B)", None),                        # two letters
        ("I think B", None),                                # a bare letter in a sentence
        ("catfish", None),                                  # whole words only
        ("", None),
    ],
)
def test_parse_choice_with_options(answer, expected):
  assert metrics.parse_choice(answer, ANIMALS) == expected
  mapping = dict(zip("ABCD", ANIMALS))
  assert metrics.parse_choice(answer, mapping) == expected


def test_parse_choice_without_options():
  assert metrics.parse_choice("The answer is F.") == "F"
  assert metrics.parse_choice("(G) obviously") == "G"
  assert metrics.parse_choice("dog") is None             # no option texts to compare
  assert metrics.parse_choice("the answer is a dog") is None  # lower-case "a" is an article
  assert metrics.parse_choice(None) is None
  # A mapping may skip letters: only its letters count.
  assert metrics.parse_choice("B", {"A": "x", "C": "y"}) is None
  assert metrics.parse_choice("y", {"A": "x", "C": "y"}) == "C"


def test_multiple_choice_scores_hand_computed():
  preds = ["A", "The answer is (C).", "dog", "B. dog", "no idea"]
  refs = ["A", "(B)", "B", ["B", "D"], "C"]
  # A ✓; C vs B ✗; "dog" is option B ✓; B in {B, D} ✓; unparsed ✗.
  per = _assert_mean_is_score("multiple_choice", preds, refs, choices=ANIMALS)
  np.testing.assert_array_equal(per, [1.0, 0.0, 1.0, 1.0, 0.0])
  # Per-item options: a list of texts, a mapping, or None (letters only).
  per_item = [ANIMALS, {"A": "red", "B": "blue", "C": "green"}, None]
  np.testing.assert_array_equal(
      metrics.multiple_choice_scores(["fish", "Blue.", "(B)"], ["D", "B", "B"], per_item),
      [1.0, 1.0, 1.0])
  # Without options only letters parse.
  np.testing.assert_array_equal(metrics.multiple_choice_scores(["A", "dog"], ["A", "B"]),
                                [1.0, 0.0])


def test_multiple_choice_errors():
  with pytest.raises(ValueError, match="item 0.*'E' is not the letter of one of its options"):
    metrics.multiple_choice(["A"], ["E"], choices=ANIMALS)
  with pytest.raises(ValueError, match="item 0.*'cat' is not the letter"):
    metrics.multiple_choice(["A"], ["cat"], choices=ANIMALS)
  with pytest.raises(ValueError, match="2 per-item entries for 3 predictions"):
    metrics.multiple_choice(["A"] * 3, ["A"] * 3, choices=[ANIMALS, ANIMALS])
  with pytest.raises(ValueError, match="item 0: option key 'a'"):
    metrics.multiple_choice(["A"], ["A"], choices=[{"a": "cat"}])
  with pytest.raises(ValueError, match="empty list of options"):
    metrics.multiple_choice(["A"], ["A"], choices=[{}])


# ---------------------------------------------------------------------------------------------
# POPE and MME
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is not.", "no"),
        ("There is not a dog.", "no"), ("Yes. No dog is missing.", "yes"),  # first sentence only
        ("no,", "no"), ("NO", "yes"), ("Nope", "yes"),                       # as the official rule
        ("There is a dog in the image", "yes"), ("", "yes"),
    ],
)
def test_pope_answer(answer, expected):
  assert metrics.pope_answer(answer) == expected


def test_pope_scores_and_report_hand_computed():
  preds = ["Yes", "yes, there is", "No.", "No", "Yes", "There is no cat.", "yes", "no"]
  refs = ["yes", "yes", "yes", "no", "no", "no", ["Yes."], "no"]
  # read: y y n n y n y n; labels: y y y n n n y n
  # TP = 3 (items 0, 1, 6), FP = 1 (item 4), FN = 1 (item 2), TN = 3 (items 3, 5, 7).
  per = _assert_mean_is_score("pope", preds, refs)
  np.testing.assert_array_equal(per, [1, 1, 0, 1, 0, 1, 1, 1])
  report = metrics.pope_report(preds, refs)
  assert report == pytest.approx({"accuracy": 6 / 8, "precision": 3 / 4, "recall": 3 / 4,
                                  "f1": 3 / 4, "yes_ratio": 4 / 8})
  assert report["accuracy"] == metrics.score("pope", preds, refs)
  # No "yes" answer at all: precision, recall and F1 are 0, not NaN.
  report = metrics.pope_report(["no", "no"], ["yes", "no"])
  assert report == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                    "yes_ratio": 0.0}


def test_pope_errors():
  with pytest.raises(ValueError, match="item 0.*'maybe'.*'yes' or 'no'"):
    metrics.pope(["yes"], ["maybe"])
  with pytest.raises(ValueError, match="item 0.*one label"):
    metrics.pope(["yes"], [["yes", "no"]])


@pytest.mark.parametrize(
    "answer, expected",
    [("yes", "yes"), ("No", "no"), ("Yes, it is.", "yes"), ("no.", "no"),
     ("not sure", "no"),                         # "no" within the first 4 characters
     ("I think yes", "other"), ("Nope", "no"), ("", "other"), ("The answer is yes", "other")],
)
def test_mme_answer(answer, expected):
  assert metrics.mme_answer(answer) == expected


def test_mme_score_hand_computed():
  # Three images with their two questions (one "yes", one "no" each).
  preds = ["Yes", "No", "Yes", "Yes", "No", "maybe"]
  refs = ["yes", "no", "yes", "no", "yes", "no"]
  pair_ids = ["img1", "img1", "img2", "img2", "img3", "img3"]
  # right: ✓ ✓ ✓ ✗ ✗ ✗ → accuracy 3/6; only img1 has both right → accuracy+ 1/3.
  per = _assert_mean_is_score("mme", preds, refs)
  np.testing.assert_array_equal(per, [1, 1, 1, 0, 0, 0])
  report = metrics.mme_report(preds, refs, pair_ids)
  assert report == pytest.approx({"accuracy": 0.5, "accuracy_plus": 1 / 3,
                                  "score": 100 * (0.5 + 1 / 3)})
  assert metrics.mme_score(preds, refs, pair_ids) == pytest.approx(83.3333333)
  assert metrics.mme_score(refs, refs, pair_ids) == 200.0
  # Pairs need not be adjacent: here each image has one wrong answer → accuracy+ 0.
  assert metrics.mme_score(preds, refs, ["img1", "img2", "img3", "img1", "img2", "img3"]) == (
      pytest.approx(100 * (0.5 + 0.0)))
  with pytest.raises(ValueError, match="5 pair ids for 6 predictions"):
    metrics.mme_score(preds, refs, pair_ids[:5])


def test_pope_split_report_hand_computed():
  # random: yes/yes right, no read as yes (FP), no right → TP 1... per split by hand below.
  preds = ["Yes", "No", "Yes", "No",        # random
           "Yes", "Yes", "Yes", "No",       # popular
           "No", "No", "Yes", "There is no dog."]  # adversarial
  refs = ["yes", "yes", "no", "no",
          "yes", "no", "no", "yes",
          "yes", "no", "yes", "no"]
  splits = ["random"] * 4 + ["popular"] * 4 + ["adversarial"] * 4
  report = metrics.pope_split_report(preds, refs, splits)
  assert list(report["splits"]) == ["random", "popular", "adversarial"]
  # random: TP 1 (0), FN 1 (1), FP 1 (2), TN 1 (3): acc 1/2, P 1/2, R 1/2, F1 1/2, yes 2/4.
  assert report["splits"]["random"] == pytest.approx(
      {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5})
  # popular: TP 1 (4), FP 2 (5, 6), FN 1 (7): acc 1/4, P 1/3, R 1/2, F1 2/5, yes 3/4.
  assert report["splits"]["popular"] == pytest.approx(
      {"accuracy": 0.25, "precision": 1 / 3, "recall": 0.5, "f1": 0.4, "yes_ratio": 0.75})
  # adversarial: FN 1 (8), TN 2 (9, 11), TP 1 (10): acc 3/4, P 1, R 1/2, F1 2/3, yes 1/4.
  assert report["splits"]["adversarial"] == pytest.approx(
      {"accuracy": 0.75, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.25})
  assert report["mean"]["f1"] == pytest.approx((0.5 + 0.4 + 2 / 3) / 3)
  assert report["mean"]["accuracy"] == pytest.approx(0.5)
  # One split is pope_report itself.
  assert metrics.pope_split_report(preds, refs, ["all"] * 12)["splits"]["all"] == (
      metrics.pope_report(preds, refs))
  with pytest.raises(ValueError, match="11 splits for 12 predictions"):
    metrics.pope_split_report(preds, refs, splits[:11])


def test_mme_totals_hand_computed():
  # existence: img a both right, img b one wrong → acc 3/4, acc+ 1/2 → 125.
  # OCR: img a both right → 200. code_reasoning: img a both wrong ("other", then "yes" for no)
  # → 0; numerical_calculation: img c one right → acc 1/2, acc+ 0 → 50.
  preds = ["Yes", "No", "Yes", "Yes",   # existence
           "yes", "no",                 # OCR
           "maybe", "Yes",              # code_reasoning
           "No", "No"]                  # numerical_calculation
  refs = ["yes", "no", "yes", "no", "yes", "no", "yes", "no", "yes", "no"]
  pairs = ["a", "a", "b", "b", "a", "a", "a", "a", "c", "c"]
  subtasks = (["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2
              + ["numerical_calculation"] * 2)
  totals = metrics.mme_totals(preds, refs, pairs, subtasks)
  assert totals["subtasks"]["existence"]["score"] == pytest.approx(125.0)
  assert totals["subtasks"]["OCR"]["score"] == pytest.approx(200.0)
  assert totals["perception"] == pytest.approx(325.0)   # image "a" of OCR is not existence's "a"
  assert totals["cognition"] == pytest.approx(50.0)
  assert totals["missing"] == [n for n in metrics.MME_PERCEPTION + metrics.MME_COGNITION
                               if n not in subtasks]
  assert len(metrics.MME_PERCEPTION) == 10 and len(metrics.MME_COGNITION) == 4
  # All right everywhere: 200 per subtask, MME's maxima 2000 and 800.
  names = metrics.MME_PERCEPTION + metrics.MME_COGNITION
  subtasks = [n for n in names for _ in range(2)]
  refs = ["yes", "no"] * len(names)
  full = metrics.mme_totals(refs, refs, ["img"] * len(refs), subtasks)
  assert (full["perception"], full["cognition"], full["missing"]) == (2000.0, 800.0, [])
  with pytest.raises(ValueError, match="question 0: MME has no subtask 'Existence'"):
    metrics.mme_totals(["yes"], ["yes"], ["a"], ["Existence"])
  with pytest.raises(ValueError, match="1 pair ids and 2 subtasks for 1 predictions"):
    metrics.mme_totals(["yes"], ["yes"], ["a"], ["OCR", "OCR"])


# ---------------------------------------------------------------------------------------------
# Every scorer: list references, per-sample means
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric, pred, bare, listed, options",
    [
        ("exact_match", "Dog", "dog", ["cat", "dog"], {}),
        ("accuracy", "dog", "dog", ["cat", "dog"], {}),
        ("iou_accuracy", "[0, 0, 1, 1]", "[0, 0, 1, 1]", ["[0, 0, 0.2, 0.2]", "[0, 0, 1, 1]"], {}),
        ("vqa_accuracy", "dog", "dog", ["dog"] * 4, {}),
        ("multiple_choice", "B", "B", ["A", "B"], {"choices": ANIMALS}),
        ("pope", "Yes", "yes", ["yes"], {}),
        ("mme", "No", "no", ["no", "No."], {}),
    ],
)
def test_every_scorer_takes_a_string_or_a_list_of_strings(metric, pred, bare, listed, options):
  assert metrics.sample_scores(metric, [pred], [bare], **options).tolist() == [1.0]
  assert metrics.sample_scores(metric, [pred], [listed], **options).tolist() == [1.0]


_VQA_ANSWER = st.sampled_from(["2", "two", "Two.", "dog", "the dog", "a cat", "cat", "yes", "no"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_VQA_ANSWER, st.one_of(_VQA_ANSWER,
                                                 st.lists(_VQA_ANSWER, min_size=1, max_size=10))),
                min_size=1, max_size=30))
def test_vqa_accuracy_sample_mean_is_score_property(items):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  per = _assert_mean_is_score("vqa_accuracy", preds, refs)
  assert np.all((per >= 0) & (per <= 1))


_MC_ANSWER = st.sampled_from(["A", "(B)", "C.", "D. fish", "The answer is A", "dog", "bird.",
                              "no idea", "E"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_MC_ANSWER, st.sampled_from(["A", "B", "C", "D"])), min_size=1,
                max_size=30))
def test_multiple_choice_sample_mean_is_score_property(items):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  per = _assert_mean_is_score("multiple_choice", preds, refs, choices=ANIMALS)
  assert set(per.tolist()) <= {0.0, 1.0}


_YES_NO = st.sampled_from(["Yes", "no", "No, it is not.", "yes.", "not sure", "maybe", ""])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_YES_NO, st.sampled_from(["yes", "no"])), min_size=1, max_size=30))
def test_pope_and_mme_sample_means_are_their_accuracies(items):
  preds = [p for p, _ in items]
  refs = [r for _, r in items]
  for metric in ("pope", "mme"):
    per = _assert_mean_is_score(metric, preds, refs)
    assert set(per.tolist()) <= {0.0, 1.0}
  assert metrics.pope_report(preds, refs)["accuracy"] == metrics.score("pope", preds, refs)
  pair_ids = [i // 2 for i in range(len(preds))]
  assert metrics.mme_report(preds, refs, pair_ids)["accuracy"] == metrics.score("mme", preds, refs)
