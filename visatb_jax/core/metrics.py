"""Evaluation metrics: ΔI% / ΔE% against a baseline, and per-task scorers.

Overall metrics (docs/method.md §8), for tasks i with metrics k and sign s_ik (+1 if higher is
better, -1 otherwise):

    I_i  = (1/K_i) Σ_k s_ik · (M_e,ik − M_b,ik) / M_b,ik
    ΔI%  = 100 · mean_i I_i
    ΔE%  = 100 · mean_i max(0, −I_i)

Per-task scorers take a list of predictions and a list of references (one entry per item; an
item's reference is a string or a list of strings, several acceptable answers). Every scorer is a
per-sample function in `SAMPLE_SCORERS` whose `mean_score` is the scalar of the same name in
`SCORERS`, so a score and the per-sample values that a bootstrap resamples cannot drift apart:

  name             per-sample value                                 scalar (the mean), range
  exact_match      normalised match with any reference              [0, 1]
  accuracy         closed-set label match                           [0, 1]
  iou_accuracy     IoU > threshold with a reference box             [0, 1]
  cider            the image's CIDEr-D within the corpus            [0, 10]
  vqa_accuracy     VQA soft accuracy, min(#humans agreeing / 3, 1)  [0, 1]
  multiple_choice  parsed option letter is the correct one          [0, 1]
  mmbench_circular its question right under every shift (weighted)  [0, 1] (MMBench's CircularEval)
  pope             yes/no answer is right                           [0, 1] (POPE's accuracy)
  mme              yes/no answer is right                           [0, 1] (MME's accuracy)

POPE's headline F1 and MME's score (accuracy + accuracy+) are not means of per-sample values:
`pope_report` and `mme_score` compute them from the same answers; `pope_split_report` gives
POPE's metrics per split (random / popular / adversarial) and `mme_totals` MME's perception and
cognition totals; `CORPUS_REPORTS` computes both from the per-sample scores and each sample's
split, subtask and image, for the pipeline's scores/test_reports.json. `cider`'s option `tokenization="raw"` scores as the VisATB release does. The
pipeline's score tables (validation and test scores, λ, ΔI / ΔE, the bootstrap) use `score`, the
mean of the per-sample values: accuracy for POPE and MME. `score` and `sample_scores` give the
evaluation loop one entry point; a scorer's options (IoU threshold, choices, ...) are keyword
options of both.

Everything here is plain Python/numpy: nothing needs jax, Java or a network.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

TaskValue = Union[float, Sequence[float]]
Direction = Union[bool, Sequence[bool]]
Box = tuple[float, float, float, float]

# ---------------------------------------------------------------------------------------------
# ΔI% / ΔE%
# ---------------------------------------------------------------------------------------------


def _metric_values(task: str, value: Any, side: str) -> list[float]:
  """The metric values of one task as a non-empty list of finite floats."""
  if isinstance(value, (str, bytes)):
    raise ValueError(f"task {task!r}: {side} value must be a number or a list of numbers, "
                     f"got {value!r}")
  if isinstance(value, np.ndarray):
    raw = list(value.ravel())
  else:
    raw = list(value) if isinstance(value, Sequence) else [value]
  if not raw:
    raise ValueError(f"task {task!r}: {side} has an empty list of metric values")
  values = []
  for v in raw:
    try:
      f = float(v)
    except (TypeError, ValueError):
      raise ValueError(f"task {task!r}: {side} value {v!r} is not a number") from None
    if not math.isfinite(f):
      raise ValueError(f"task {task!r}: {side} value {f} is not finite")
    values.append(f)
  return values


def _directions(task: str, spec: Direction | None, num_metrics: int) -> list[bool]:
  """Per-metric higher-is-better flags of one task; a single bool applies to every metric."""
  if spec is None:
    return [True] * num_metrics
  if isinstance(spec, (bool, np.bool_)):
    return [bool(spec)] * num_metrics
  flags = list(spec) if isinstance(spec, (Sequence, np.ndarray)) else None
  if flags is None or not all(isinstance(f, (bool, np.bool_)) for f in flags):
    raise ValueError(f"task {task!r}: higher_is_better must be a bool or a list of bools, "
                     f"got {spec!r}")
  if len(flags) != num_metrics:
    raise ValueError(f"task {task!r}: higher_is_better has {len(flags)} entries but the task has "
                     f"{num_metrics} metric values")
  return [bool(f) for f in flags]


def task_improvement(task: str, baseline: TaskValue, method: TaskValue,
                     higher_is_better: Direction | None = None) -> float:
  """I_i of one task as a fraction (not percent): mean_k s_k · (M_e,k − M_b,k) / M_b,k.

  Raises:
    ValueError (naming the task) on a length mismatch, a zero baseline value or a non-finite value.
  """
  base = _metric_values(task, baseline, "baseline")
  meth = _metric_values(task, method, "method")
  if len(base) != len(meth):
    raise ValueError(f"task {task!r}: baseline has {len(base)} metric values but the method has "
                     f"{len(meth)}")
  signs = [1.0 if hib else -1.0 for hib in _directions(task, higher_is_better, len(base))]
  terms = []
  for k, (b, e, s) in enumerate(zip(base, meth, signs)):
    if b == 0.0:
      raise ValueError(f"task {task!r}: baseline value of metric {k} is 0, the relative change "
                       "is undefined")
    terms.append(s * (e - b) / b)
  return float(np.mean(terms))


def delta_from_improvements(improvements: np.ndarray, axis: int = -1
                            ) -> tuple[np.ndarray, np.ndarray]:
  """ΔI% and ΔE% from per-task improvements I_i (fractions) along `axis`: 100·mean(I) and
  100·mean(max(0, −I)). The one place of the two averages; also used batched over bootstrap
  resamples (core/differences.py)."""
  improvements = np.asarray(improvements, np.float64)
  return (100.0 * improvements.mean(axis=axis),
          100.0 * np.maximum(0.0, -improvements).mean(axis=axis))


def delta_metrics(baseline: Mapping[str, TaskValue], method: Mapping[str, TaskValue],
                  higher_is_better: Mapping[str, Direction] | None = None) -> dict[str, Any]:
  """ΔI% and ΔE% of `method` against `baseline` (docs/method.md §8).

  Args:
    baseline: {task: value}, a value being one metric (float) or a list of metric values.
    method: the same tasks, with values of the same shape.
    higher_is_better: {task: bool or list of bools per metric}; tasks not named (and the default
      None) are higher-is-better for every metric.

  Returns:
    {"delta_i": ΔI%, "delta_e": ΔE%, "per_task": {task: 100 · I_i}}: all three in percent, so
    per_task[t] = 12.5 means the task improved by 12.5 % on average over its metrics.

  Raises:
    ValueError (naming the task): a task on one side only (or only in higher_is_better), no tasks,
    a list-length mismatch, a baseline value of 0, or a non-finite value.
  """
  directions = dict(higher_is_better or {})
  for task in baseline:
    if task not in method:
      raise ValueError(f"task {task!r} is in the baseline but not in the method's scores")
  for task in method:
    if task not in baseline:
      raise ValueError(f"task {task!r} is in the method's scores but not in the baseline")
  for task in directions:
    if task not in baseline:
      raise ValueError(f"task {task!r} is in higher_is_better but not in the scores")
  if not baseline:
    raise ValueError("delta_metrics needs at least one task")
  per_task = {
      task: task_improvement(task, baseline[task], method[task], directions.get(task))
      for task in baseline
  }
  delta_i, delta_e = delta_from_improvements(np.array(list(per_task.values())))
  return {
      "delta_i": float(delta_i),
      "delta_e": float(delta_e),
      "per_task": {task: 100.0 * value for task, value in per_task.items()},
  }


def delta_zero_shot(ew: Mapping[str, TaskValue], method: Mapping[str, TaskValue],
                    higher_is_better: Mapping[str, Direction] | None = None) -> float:
  """ΔI_zero%: ΔI% on zero-shot (held-out) tasks with the EW model as the baseline.

  The same formula as `delta_metrics`; only the baseline differs (EW instead of STL, because no
  single-task model exists for a task that was never trained on).
  """
  return delta_metrics(ew, method, higher_is_better)["delta_i"]


# ---------------------------------------------------------------------------------------------
# Aggregation and shared input checks
# ---------------------------------------------------------------------------------------------


def mean_score(values: Sequence[float] | np.ndarray) -> float:
  """The score that per-sample values aggregate to: their float64 mean.

  Every scalar score here is computed by this function from the per-sample values, so a caller
  holding the per-sample values (e.g. {sample_id: value}.values(), in order) gets the same float.
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"need a non-empty 1-D list of per-sample scores, got shape {values.shape}")
  return float(np.mean(values))


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
  if not predictions:
    raise ValueError("no predictions to score")


def _reference_list(i: int, refs: str | Sequence[str]) -> list[str]:
  """Item i's references as a non-empty list of strings (a bare string is one reference)."""
  if isinstance(refs, str):
    return [refs]
  refs = list(refs)
  if not refs:
    raise ValueError(f"item {i} has no references")
  for r in refs:
    if not isinstance(r, str):
      raise ValueError(f"item {i}: reference {r!r} is not a string")
  return refs


# ---------------------------------------------------------------------------------------------
# Exact match and closed-set accuracy
# ---------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
  """Lower-cases `s`, strips surrounding whitespace and one trailing period."""
  s = s.strip().lower()
  if s.endswith("."):
    s = s[:-1].rstrip()
  return s


def exact_match_scores(predictions: Sequence[str],
                       references: Sequence[str | Sequence[str]]) -> np.ndarray:
  """Per item 1.0 if the normalised prediction equals one of the normalised references, else 0.0.

  Args:
    predictions: one generated answer per item.
    references: per item, the acceptable answer or a list of acceptable answers.

  Returns:
    float64 [n].
  """
  _check_lengths(predictions, references)
  hits = np.zeros(len(predictions))
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    accepted = {normalize_answer(r) for r in _reference_list(i, refs)}
    hits[i] = normalize_answer(pred) in accepted
  return hits


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Fraction of items whose normalised prediction equals one of the normalised references.

  The mean of `exact_match_scores` (same arguments).
  """
  return mean_score(exact_match_scores(predictions, references))


def accuracy_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                    choices: Sequence[str] | None = None) -> np.ndarray:
  """Per item 1.0 if the normalised prediction equals the (closed-set) label, else 0.0.

  Args:
    predictions: one generated answer per item.
    references: per item, the label or a list of acceptable labels.
    choices: option `choices`, the label set. A prediction outside it counts as wrong; a
      reference outside it is a data error (ValueError), since no prediction could then be right.

  Returns:
    float64 [n].
  """
  _check_lengths(predictions, references)
  allowed = None if choices is None else {normalize_answer(c) for c in choices}
  hits = np.zeros(len(predictions))
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    labels = {normalize_answer(r) for r in _reference_list(i, refs)}
    if allowed is not None and not labels <= allowed:
      raise ValueError(f"item {i}: reference {refs!r} is not one of the choices")
    answer = normalize_answer(pred)
    hits[i] = (allowed is None or answer in allowed) and answer in labels
  return hits


def accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
             choices: Sequence[str] | None = None) -> float:
  """Closed-set accuracy: the mean of `accuracy_scores` (same arguments and options)."""
  return mean_score(accuracy_scores(predictions, references, choices))


# ---------------------------------------------------------------------------------------------
# Box grounding: IoU accuracy
# ---------------------------------------------------------------------------------------------

_NUMBER = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
# Four comma-separated numbers in square brackets, anywhere in the answer.
_BOX_RE = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def _is_valid_box(box: Sequence[float]) -> bool:
  """Four finite coordinates in [0, 1] with x1 < x2 and y1 < y2 (a box with area)."""
  if len(box) != 4 or not all(math.isfinite(v) for v in box):
    return False
  x1, y1, x2, y2 = box
  return all(0.0 <= v <= 1.0 for v in box) and x1 < x2 and y1 < y2


def parse_box(text: Any) -> Box | None:
  """The first "[x1, y1, x2, y2]" in `text` as a tuple, or None.

  As in the RefCOCO evaluations of LVLMs (Qwen-VL's and InternVL's take the first match of their
  box pattern in the answer), the box may sit anywhere in the answer ("It is at
  [0.1, 0.2, 0.5, 0.6]." or "[[0.1, 0.2, 0.5, 0.6]]"), and only the FIRST bracketed group of
  exactly four comma-separated numbers counts: when it is invalid (a value outside [0, 1],
  x2 <= x1 or y2 <= y1) the answer has no box, even if a valid one follows. Whitespace around
  the numbers is allowed; groups of three or five numbers, numbers without commas and other
  brackets are not boxes.
  """
  if not isinstance(text, str):
    return None
  match = _BOX_RE.search(text)
  if match is None:
    return None
  box = tuple(float(g) for g in match.groups())
  return box if _is_valid_box(box) else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two [x1, y1, x2, y2] boxes (continuous coordinates)."""
  ax1, ay1, ax2, ay2 = a
  bx1, by1, bx2, by2 = b
  inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
  union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
  return inter / union if union > 0.0 else 0.0


def _as_number_box(ref: Any) -> Box | None:
  """`ref` as a box if it is four numbers (not text), else None."""
  if isinstance(ref, (str, bytes)) or not isinstance(ref, (Sequence, np.ndarray)) or len(ref) != 4:
    return None
  if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
             for v in ref):
    return None
  return tuple(float(v) for v in ref)


def _one_box(i: int, ref: Any) -> Box:
  """One reference box: box text or four numbers; ValueError naming item i otherwise."""
  box = parse_box(ref) if isinstance(ref, str) else _as_number_box(ref)
  if box is None or not _is_valid_box(box):
    raise ValueError(f"item {i}: reference {ref!r} is not a valid box")
  return box


def _reference_boxes(i: int, ref: Any) -> list[Box]:
  """Item i's reference boxes: one box (text or four numbers) or a non-empty list of boxes."""
  if isinstance(ref, str) or _as_number_box(ref) is not None:
    return [_one_box(i, ref)]
  if not isinstance(ref, (Sequence, np.ndarray)) or len(ref) == 0:
    raise ValueError(f"item {i}: reference {ref!r} is not a valid box")
  return [_one_box(i, r) for r in ref]


def _check_threshold(threshold: float) -> None:
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"threshold must be in [0, 1), got {threshold}")


def _iou_items(predictions: Sequence[str], references: Sequence[Any],
               threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """(hit, parsed) per item: float64 1.0/0.0 hits and bool "the prediction parsed as a box"."""
  _check_threshold(threshold)
  _check_lengths(predictions, references)
  hits = np.zeros(len(predictions))
  parsed = np.zeros(len(predictions), bool)
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    targets = _reference_boxes(i, ref)
    box = parse_box(pred)
    parsed[i] = box is not None
    hits[i] = box is not None and max(box_iou(box, t) for t in targets) > threshold
  return hits, parsed


def iou_hits(predictions: Sequence[str], references: Sequence[Any],
             threshold: float = 0.5) -> np.ndarray:
  """Per item 1.0 if the predicted box has IoU > `threshold` with a reference box, else 0.0.

  Arguments and options as in `iou_accuracy`; an answer without a valid box scores 0.0.
  Returns float64 [n].
  """
  return _iou_items(predictions, references, threshold)[0]


def iou_accuracy(predictions: Sequence[str], references: Sequence[Any],
                 threshold: float = 0.5) -> tuple[float, dict[str, int]]:
  """Fraction of predicted boxes with IoU > `threshold` against a reference box.

  Args:
    predictions: generated answers; the first "[x1, y1, x2, y2]" in each is its box
      (`parse_box`).
    references: per item, the box as text or as four numbers, or a list of such boxes (a hit
      needs IoU above the threshold with any of them).
    threshold: option `threshold` (default 0.5): a hit needs IoU strictly above it.

  Returns:
    (score, {"unparsable": n}): the score is the mean of `iou_hits`; n counts answers in which
    `parse_box` finds no valid box (none, or an out-of-range or degenerate first box); each
    scores 0.
  """
  hits, parsed = _iou_items(predictions, references, threshold)
  return mean_score(hits), {"unparsable": int((~parsed).sum())}


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)

# CIDEr's tokenisations (option `tokenization` of `cider`): "normalized", our stand-in for the
# COCO caption evaluation's PTB tokenizer (`cider_tokenize`), the default; "raw", the text split on
# whitespace as it is, which is what the VisATB release scores: its eval/caption.py and
# caption_list.py give the generated and reference texts straight to pycocoevalcap's `Cider`
# (no PTBTokenizer), whose `precook` only calls `str.split()`. Case and punctuation then count:
# "A dog." and "a dog" share no token.
CIDER_TOKENIZATIONS = ("normalized", "raw")


def cider_tokens(text: str, tokenization: str = "normalized") -> list[str]:
  """The tokens CIDEr counts in `text`: `cider_tokenize(text)`, or with "raw" `text.split()`."""
  if tokenization == "raw":
    return text.split()
  if tokenization == "normalized":
    return cider_tokenize(text)
  raise ValueError(f"CIDEr tokenization {tokenization!r}; choose one of "
                   f"{list(CIDER_TOKENIZATIONS)}")


def cider_tokenize(text: str) -> list[str]:
  """Lower-cases, deletes ASCII punctuation and splits on whitespace.

  Which tokenisation, and why. The COCO caption evaluation (pycocoevalcap's `PTBTokenizer`)
  runs the Stanford PTB tokenizer (Java) over every caption, lower-cases, and drops the
  punctuation tokens of a fixed list; its `Cider` then splits the result on spaces. This project
  scores without Java (docs/method.md §8), so this function stands in for that step. Both agree
  on captions made of words, spaces and sentence punctuation (, . ; : ! ? and double quotes),
  which is nearly every caption a model writes; there our CIDEr-D equals pycocoevalcap's
  (tests/core/test_metrics.py runs the Java pipeline where Java exists). They differ where PTB
  splits or keeps what this deletes:

    text                   PTB + pycocoevalcap          here
    "man's", "don't"       man 's / do n't              mans / dont
    "e.g.", "U.S.", "3.5"  e.g. / u.s. / 3.5            eg / us / 35
    "black-and-white"      black-and-white              blackandwhite
    "(sleeping)"           -lrb- sleeping -rrb-         sleeping
    "$5", "10%", "&"       $ 5 / 10 % / &               5 / 10 / (dropped)

  ("-lrb-" survives in pycocoevalcap because it drops "-LRB-" after lower-casing.)
  """
  return text.lower().translate(_PUNCTUATION).split()


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
  """Counts of every 1..n-gram of `tokens`, keyed by tuples."""
  return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1)
                 for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, idf: Callable[[tuple[str, ...]], float],
           n: int) -> tuple[list[dict[tuple[str, ...], float]], np.ndarray]:
  """tf·idf vector per n-gram order (raw counts as tf, as in the COCO code) and their norms."""
  vecs: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
  for gram, tf in counts.items():
    vecs[len(gram) - 1][gram] = tf * idf(gram)
  norms = np.array([math.sqrt(sum(v * v for v in vec.values())) for vec in vecs])
  return vecs, norms


def _clipped_cosine(hyp: dict, hyp_norm: float, ref: dict, ref_norm: float) -> float:
  """CIDEr-D similarity of one order: Σ min(h, r)·r / (|h|·|r|), 0 when either side is empty."""
  if hyp_norm == 0.0 or ref_norm == 0.0:
    return 0.0
  # Clipping the candidate's weights at the reference's stops repeating an n-gram from paying.
  dot = sum(min(h, ref.get(gram, 0.0)) * ref.get(gram, 0.0) for gram, h in hyp.items())
  return dot / (hyp_norm * ref_norm)


def cider_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 *, n: int = 4, sigma: float = 6.0,
                 tokenization: str = "normalized") -> np.ndarray:
  """Per-item CIDEr-D scores, as pycocoevalcap's `Cider` (which implements CIDEr-D) computes them.

  For item j with candidate c and references R_j, with g_k(·) the tf·idf vector of k-grams:

      CIDEr-D_j = 10 / (n · |R_j|) · Σ_{r∈R_j} Σ_{k=1..n} exp(−(ℓ_c − ℓ_r)² / 2σ²) ·
                  Σ min(g_k(c), g_k(r)) · g_k(r) / (|g_k(c)| · |g_k(r)|)

  idf(g) = log(#items) − log(max(1, df(g))), df(g) = number of items whose references contain g:
  document frequencies come from the references of the corpus being scored, so a one-item corpus
  scores 0 (every idf is 0). ℓ is the length in tokens; the COCO code counts bigrams instead,
  which gives the same difference whenever both sides are non-empty, and an empty side scores 0
  either way. Tokenisation: `cider_tokens` with option `tokenization` ("normalized", the
  default: `cider_tokenize`; "raw": split on whitespace, as the VisATB release scores).

  These are CIDEr-D's per-sample scores: their `mean_score` is the corpus score (`cider`). Each
  depends on the whole corpus through the idf, so a bootstrap that resamples them keeps the full
  corpus's idf rather than recomputing it per resample.

  Returns:
    float64 [n].
  """
  _check_lengths(predictions, references)
  if n < 1 or sigma <= 0.0:
    raise ValueError(f"need n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
  cider_tokens("", tokenization)  # an unknown tokenization fails before any work
  hyps = [cider_tokens(p, tokenization) for p in predictions]
  refs = [[cider_tokens(r, tokenization) for r in _reference_list(i, rs)]
          for i, rs in enumerate(references)]
  hyp_counts = [_ngram_counts(h, n) for h in hyps]
  ref_counts = [[_ngram_counts(r, n) for r in rs] for rs in refs]

  document_frequency: Counter = Counter()
  for counts in ref_counts:
    document_frequency.update(set().union(*counts))
  log_num_items = math.log(len(predictions))

  def idf(gram: tuple[str, ...]) -> float:
    # An n-gram unseen in every reference counts as seen once (the COCO convention).
    return log_num_items - math.log(max(1.0, document_frequency[gram]))

  scores = np.zeros(len(predictions))
  for j, (hyp, counts_c, counts_rs) in enumerate(zip(hyps, hyp_counts, ref_counts)):
    vec_c, norm_c = _tfidf(counts_c, idf, n)
    total = 0.0
    for ref, counts_r in zip(refs[j], counts_rs):
      vec_r, norm_r = _tfidf(counts_r, idf, n)
      penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2.0 * sigma ** 2))
      total += penalty * sum(
          _clipped_cosine(vec_c[k], norm_c[k], vec_r[k], norm_r[k]) for k in range(n))
    scores[j] = 10.0 * total / (n * len(refs[j]))
  return scores


def cider(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          *, n: int = 4, sigma: float = 6.0, tokenization: str = "normalized") -> float:
  """Corpus CIDEr-D: the mean of `cider_scores` (scale [0, 10], as pycocoevalcap reports it).

  Args:
    predictions: one generated caption per image.
    references: per image, a list of reference captions (a bare string is one reference);
      several references give multi-reference CIDEr-D (the mean over them, as in `cider_scores`).
    n: option `n` (default 4), the largest n-gram order.
    sigma: option `sigma` (default 6.0), the width of the Gaussian length penalty.
    tokenization: option `tokenization`, one of CIDER_TOKENIZATIONS: "normalized" (default,
      lower-cased without punctuation, close to the COCO caption evaluation) or "raw" (split on
      whitespace as written, as the VisATB release computes the CIDEr of its tables).
  """
  return mean_score(cider_scores(predictions, references, n=n, sigma=sigma,
                                 tokenization=tokenization))


# ---------------------------------------------------------------------------------------------
# VQA soft accuracy (VQAv2, TextVQA, VizWiz)
# ---------------------------------------------------------------------------------------------

# The answer normalisation tables of the official VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py, last revised in 2021), transcribed as they are.
# Keys with capitals ("Im", "Ive", ...) can never match (answers are lower-cased first); they are
# kept so that the table stays the official one.
VQA_CONTRACTIONS: dict[str, str] = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell': "someone'll",
    'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's",
    'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're",
    'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't",
    'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll",
    'youre': "you're", 'youve': "you've",
}
VQA_DIGITS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
VQA_ARTICLES: tuple[str, ...] = ("a", "an", "the")
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!")
# As written in the official code: "(?!<=\d)" is a lookahead for the text "<=" and a digit (a
# slip for the lookbehind "(?<!\d)"), so the pattern removes every period not followed by a digit.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
# most re.UNICODE (= 32) periods go. Kept: it only matters for answers with over 32 periods.
_VQA_PERIOD_COUNT = int(re.UNICODE)


def _vqa_punctuation(text: str) -> str:
  """The official `processPunctuation`.

  Each mark of VQA_PUNCTUATION is deleted where it touches a space (or wherever the answer has a
  digit-comma-digit, so "1,000" → "1000"), else replaced by a space ("black-and-white" →
  "black and white"); then periods not followed by a digit are deleted ("3.5" stays).
  """
  out = text
  delete_all = _VQA_COMMA_STRIP.search(text) is not None
  for mark in VQA_PUNCTUATION:
    # The test reads the original text, the replacement the text rewritten so far (as there).
    if delete_all or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_digit_article(text: str) -> str:
  """The official `processDigitArticle`: lower-case, number words → digits, drop articles, then
  expand contractions written without their apostrophe ("dont" → "don't")."""
  words = [VQA_DIGITS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in VQA_ARTICLES]
  return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
  """An answer normalised as by the official VQA evaluation.

  Newlines and tabs become spaces, surrounding whitespace goes, then `_vqa_punctuation` and
  `_vqa_digit_article`: "Two dogs." → "2 dogs", "the 1,000 ones!" → "1000 ones",
  "dont know" → "don't know".
  """
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  return _vqa_digit_article(_vqa_punctuation(text))


def _vqa_item_accuracy(answer: str, humans: Sequence[str]) -> float:
  """min(#matching human answers / 3, 1), averaged over the leave-one-out subsets of `humans`."""
  if len(humans) == 1:
    # With one reference there are no annotators to agree: it is the answer key.
    return float(answer == humans[0])
  matches = sum(h == answer for h in humans)
  # Leaving out a matching answer leaves matches − 1 of them, leaving out another leaves all.
  total = sum(min((matches - (h == answer)) / 3.0, 1.0) for h in humans)
  return total / len(humans)


def vqa_accuracy_scores(predictions: Sequence[str],
                        references: Sequence[str | Sequence[str]]) -> np.ndarray:
  """Per item the VQA soft accuracy of the official VQAv2 / TextVQA / VizWiz evaluation.

  With the item's human answers h_1..h_n (ten in those datasets) and the prediction, all
  normalised by `vqa_normalize`,

      acc = (1/n) Σ_j min(#{k ≠ j : h_k = prediction} / 3, 1),

  the mean over the n leave-one-out subsets of "min(#humans who gave that answer / 3, 1)": an
  answer given by 3 or more of the 10 humans scores 1, by 2 of them 0.6, by 1 of them 0.3.
  An item with a single reference (a bare string) scores 1.0 on a normalised match, else 0.0;
  with 2 to 9 references the same formula applies (so at most (n − 1)/3 for n ≤ 3).

  Normalisation of the references. The official code (2021 revision) normalises the prediction
  and the human answers only when the ten answers are not all identical; its answer files were
  normalised when the dataset was built, and LLaVA-style submissions normalise the prediction
  with the same processor beforehand. Here both sides are always normalised: that is the official
  score of a normalised prediction, and it keeps raw references (TextVQA, user data) comparable.

  Options: none. Returns float64 [n], each in [0, 1].
  """
  _check_lengths(predictions, references)
  scores = np.zeros(len(predictions))
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    humans = [vqa_normalize(r) for r in _reference_list(i, refs)]
    scores[i] = _vqa_item_accuracy(vqa_normalize(pred), humans)
  return scores


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """VQA accuracy in [0, 1] (the official one × 1/100): the mean of `vqa_accuracy_scores`."""
  return mean_score(vqa_accuracy_scores(predictions, references))


# ---------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMBench, SEED-Bench, ...)
# ---------------------------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
# The whole answer is one letter: "A", "a", "(A)", "[A]", "A.", "A)", "A:", "(A).".
_LETTER_ONLY_RE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
# The answer starts with a letter marker and goes on: "A. text", "(A) text", "A) text", "A: text".
_LETTER_LEAD_RE = re.compile(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)])\s")
# "The answer is A", "the correct answer is (B).", "Answer: C", "answer: option D".
_ANSWER_IS_RE = re.compile(
    r"(?i:\banswer\b(?:\s+is)?\s*:?\s*(?:option\s+)?)[(\[]?([A-Z])(?![A-Za-z0-9])")
# "The correct option is B", "I choose option (C)", "choice D".
_OPTION_IS_RE = re.compile(
    r"(?i:\b(?:option|choice)\b(?:\s+is)?\s*:?\s*)[(\[]?([A-Z])(?![A-Za-z0-9])")
_PAREN_LETTER_RE = re.compile(r"[(\[]([A-Z])[)\]]")

Options = Union[Mapping[str, str], Sequence[str]]


def _option_map(options: Options | None, where: str) -> dict[str, str] | None:
  """{letter: option text} from a letter → text mapping or a list of texts (A, B, ... in order)."""
  if options is None:
    return None
  if isinstance(options, Mapping):
    out = {}
    for letter, text in options.items():
      if not (isinstance(letter, str) and len(letter) == 1 and letter in _LETTERS):
        raise ValueError(f"{where}: option key {letter!r} is not a capital letter A–Z")
      if not isinstance(text, str):
        raise ValueError(f"{where}: option {letter} is {text!r}, not a string")
      out[letter] = text
  elif isinstance(options, Sequence) and not isinstance(options, str):
    if len(options) > len(_LETTERS):
      raise ValueError(f"{where}: {len(options)} options, at most {len(_LETTERS)}")
    if not all(isinstance(t, str) for t in options):
      raise ValueError(f"{where}: options {options!r} are not all strings")
    out = dict(zip(_LETTERS, options))
  else:
    raise ValueError(f"{where}: choices must be a list of option texts or a mapping letter → "
                     f"text, got {options!r}")
  if not out:
    raise ValueError(f"{where}: empty list of options")
  return out


def _unique(letters: Sequence[str]) -> str | None:
  distinct = set(letters)
  return distinct.pop() if len(distinct) == 1 else None


def parse_choice(text: Any, options: Options | None = None) -> str | None:
  """The option letter an answer picks, or None.

  Rules, in order (the first that gives an allowed letter wins; with `options`, allowed letters
  are their letters, else A–Z):

    1. the whole answer is a letter, any case: "A", "b", "(A)", "[C]", "A.", "A)", "A:";
    2. it starts with a capital letter marker and goes on: "A. text", "(A) text", "A) text";
    3. the first "answer [is] [:] [option] X": "The answer is A", "Answer: (B).";
    4. the first "option / choice [is] X": "The correct option is C";
    5. one distinct parenthesised capital letter anywhere: "... so (D) is right";
    6. with options: the normalised answer (`normalize_answer`) equals one option's text;
    7. with options: exactly one option's normalised text occurs in the answer as whole words.

  Capital letters only beyond rule 1, so the article in "a dog" or the pronoun "I" is never an
  option. An answer that names the letter in no such form ("I think B") is not parsed.
  """
  if not isinstance(text, str):
    return None
  letters = _option_map(options, "parse_choice")
  allowed = set(letters) if letters is not None else set(_LETTERS)
  answer = text.strip()
  match = _LETTER_ONLY_RE.fullmatch(answer)
  if match and match.group(1).upper() in allowed:
    return match.group(1).upper()
  match = _LETTER_LEAD_RE.match(answer)
  lead = next(g for g in match.groups() if g) if match else None
  if lead in allowed:
    return lead
  for pattern in (_ANSWER_IS_RE, _OPTION_IS_RE):
    found = [m.group(1) for m in pattern.finditer(answer) if m.group(1) in allowed]
    if found:
      return found[0]
  letter = _unique([m for m in _PAREN_LETTER_RE.findall(answer) if m in allowed])
  if letter is not None:
    return letter
  if letters is None:
    return None
  normalized = normalize_answer(answer)
  exact = [k for k, v in letters.items() if normalize_answer(v) == normalized]
  if exact:
    return _unique(exact)
  words = f" {_words(answer)} "
  return _unique([k for k, v in letters.items() if _words(v) and f" {_words(v)} " in words])


def _words(text: str) -> str:
  """Lower-case alphanumeric words of `text`, space-joined (for whole-word containment)."""
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _per_sample_options(choices: Any, n: int) -> list[Options | None]:
  """The `choices` option as one entry per item.

  Accepted: None (no options), one mapping letter → text or one list of option texts shared by
  every item, or a list of n per-item entries (each a mapping, a list of texts, or None).
  """
  if choices is None:
    return [None] * n
  if isinstance(choices, Mapping):
    return [choices] * n
  if not isinstance(choices, Sequence) or isinstance(choices, str):
    raise ValueError(f"choices must be a list or a mapping, got {choices!r}")
  if choices and all(isinstance(c, str) for c in choices):
    return [choices] * n
  if len(choices) != n:
    raise ValueError(f"choices has {len(choices)} per-item entries for {n} predictions")
  return list(choices)


def _reference_letters(i: int, refs: str | Sequence[str],
                       options: dict[str, str] | None) -> set[str]:
  """Item i's correct letters ("A", "(A)", "A." ...), each one of its options' letters."""
  out = set()
  for ref in _reference_list(i, refs):
    match = _LETTER_ONLY_RE.fullmatch(ref.strip())
    letter = match.group(1).upper() if match else None
    if letter is None or (options is not None and letter not in options):
      raise ValueError(f"item {i}: reference {ref!r} is not the letter of one of its options")
    out.add(letter)
  return out


def multiple_choice_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                           choices: Any = None) -> np.ndarray:
  """Per item 1.0 if the answer picks the correct option letter (`parse_choice`), else 0.0.

  Args:
    predictions: one generated answer per item.
    references: per item, the correct letter ("A", "(A)" or "A."), or a list of accepted letters.
    choices: option `choices`: the items' options, so that an answer giving the option's text
      counts and letters beyond the options do not. One list of option texts (lettered A, B, ...)
      or one mapping letter → text shared by all items, or a list with one such entry (or None)
      per item. Default None: letters only, any of A–Z.

  Returns:
    float64 [n]; an answer no rule parses scores 0.0.
  """
  _check_lengths(predictions, references)
  per_item = _per_sample_options(choices, len(predictions))
  hits = np.zeros(len(predictions))
  for i, (pred, refs, options) in enumerate(zip(predictions, references, per_item)):
    letters = _option_map(options, f"item {i}")
    correct = _reference_letters(i, refs, letters)
    hits[i] = parse_choice(pred, letters) in correct
  return hits


def multiple_choice(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                    choices: Any = None) -> float:
  """Multiple-choice accuracy: the mean of `multiple_choice_scores` (same arguments, options)."""
  return mean_score(multiple_choice_scores(predictions, references, choices))


# MMBench's circular copies of a question: the k-th rotation of its options is a row whose index
# is the question's plus k · 10^6 (the index is the question's modulo 10^6).
MMBENCH_COPY_STRIDE = 10**6


def _circular_groups(questions: Sequence[Any], shifts: Sequence[Any] | None) -> dict[str, list[int]]:
  """{question: its items, in order}; a shift given twice for one question is refused."""
  groups: dict[str, list[int]] = {}
  seen: dict[str, set] = {}
  for i, question in enumerate(questions):
    key = str(question)
    groups.setdefault(key, []).append(i)
    if shifts is not None:
      shift = shifts[i]
      if shift in seen.setdefault(key, set()):
        raise ValueError(f"item {i}: question {question!r} has shift {shift!r} twice")
      seen[key].add(shift)
  return groups


def mmbench_circular_scores(predictions: Sequence[str],
                            references: Sequence[str | Sequence[str]], questions: Sequence[Any],
                            shifts: Sequence[Any] | None = None, choices: Any = None
                            ) -> np.ndarray:
  """MMBench's circular evaluation, as per-item values whose mean is its accuracy.

  MMBench asks each question once per circular shift of its options (A B C D, B C D A, ...); a
  question counts as right only if every one of its shifts is answered right (each item scored
  as `multiple_choice_scores`). The accuracy is the fraction of questions right.

  Args:
    predictions, references, choices: as in `multiple_choice_scores`, one per item (per shift).
    questions: per item, the id of its question (shared by its shifts); a sample's `question_id`,
      else its MMBench `index` modulo 10^6 (`mmbench_sample_arguments`).
    shifts: per item, its shift (optional): a shift seen twice for one question raises.

  Returns:
    float64 [n]: item i of question q holds right(q) · n / (Q · k_q), for Q questions and k_q
    items of q, so that the mean over items is the fraction of questions right. With the same
    number of shifts for every question this is right(q) itself, 1.0 or 0.0.
  """
  _check_lengths(predictions, references)
  if len(questions) != len(predictions):
    raise ValueError(f"{len(questions)} questions for {len(predictions)} predictions")
  if shifts is not None and len(shifts) != len(predictions):
    raise ValueError(f"{len(shifts)} shifts for {len(predictions)} predictions")
  correct = multiple_choice_scores(predictions, references, choices)
  groups = _circular_groups(questions, shifts)
  out = np.zeros(len(predictions))
  n, q = len(predictions), len(groups)
  for items in groups.values():
    if all(correct[i] for i in items):
      out[items] = n / (q * len(items))
  return out


def mmbench_circular(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                     questions: Sequence[Any], shifts: Sequence[Any] | None = None,
                     choices: Any = None) -> float:
  """MMBench's circular accuracy: the mean of `mmbench_circular_scores`."""
  return mean_score(mmbench_circular_scores(predictions, references, questions, shifts, choices))


def mmbench_sample_arguments(sample: Mapping[str, Any]) -> dict[str, Any]:
  """A sample's question and shift for `mmbench_circular_scores`.

  `question_id` (and `shift`, else 0) where the sample has one; else its MMBench `index`, whose
  question is index mod 10^6 and shift index // 10^6 (MMBENCH_COPY_STRIDE).

  Raises:
    ValueError: a sample with neither field, or an index that is not an integer.
  """
  if sample.get("question_id") not in (None, ""):
    return {"questions": sample["question_id"], "shifts": sample.get("shift", 0)}
  index = sample.get("index")
  if isinstance(index, bool) or not isinstance(index, (int, str)) or not str(index).isdigit():
    raise ValueError("an mmbench_circular sample needs its 'question_id' (and 'shift') or its "
                     f"MMBench 'index' (an integer), got index={index!r}")
  shift, question = divmod(int(index), MMBENCH_COPY_STRIDE)
  return {"questions": question, "shifts": shift}


# ---------------------------------------------------------------------------------------------
# Yes/no benchmarks: POPE and MME
# ---------------------------------------------------------------------------------------------


def _yes_no_label(i: int, refs: str | Sequence[str]) -> str:
  """Item i's label, "yes" or "no" (any case, one trailing period); a list must agree."""
  labels = {normalize_answer(r) for r in _reference_list(i, refs)}
  if len(labels) != 1 or not labels <= {"yes", "no"}:
    raise ValueError(f"item {i}: reference {refs!r} is not one label, 'yes' or 'no'")
  return labels.pop()


def pope_answer(text: str) -> str:
  """"yes" or "no" as POPE's official evaluation reads an answer.

  Only the text before the first period counts; commas are deleted; the answer is "no" when a
  space-separated word of it is "No", "no" or "not", and "yes" otherwise (so "NO" and "Nope" read
  as yes, as there).
  """
  first = text.split(".")[0] if "." in text else text
  words = first.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str],
                references: Sequence[str | Sequence[str]]) -> np.ndarray:
  """Per item 1.0 if `pope_answer` of the prediction is the label ("yes"/"no"), else 0.0.

  Their mean is POPE's accuracy; POPE's headline F1 is in `pope_report`. Options: none.
  Returns float64 [n].
  """
  _check_lengths(predictions, references)
  return np.array([float(pope_answer(p) == _yes_no_label(i, r))
                   for i, (p, r) in enumerate(zip(predictions, references))])


def pope(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """POPE accuracy: the mean of `pope_scores` (the score the pipeline's tables use)."""
  return mean_score(pope_scores(predictions, references))


def _ratio(numerator: int | float, denominator: int | float) -> float:
  return float(numerator / denominator) if denominator else 0.0


def pope_report(predictions: Sequence[str],
                references: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """POPE's corpus metrics, "yes" being the positive class, each in [0, 1].

  Returns:
    {"accuracy", "precision", "recall", "f1", "yes_ratio"} as POPE's evaluation prints them
    (yes_ratio: the fraction of answers read as "yes"). `accuracy` is exactly `pope(...)`. A
    precision or recall with a zero denominator (no "yes" answer, no "yes" label) is 0, and so
    is F1 when both are 0.
  """
  correct = pope_scores(predictions, references)
  said_yes = np.array([pope_answer(p) == "yes" for p in predictions])
  is_yes = np.array([_yes_no_label(i, r) == "yes" for i, r in enumerate(references)])
  tp = int(np.sum(said_yes & is_yes))
  precision = _ratio(tp, int(np.sum(said_yes)))
  recall = _ratio(tp, int(np.sum(is_yes)))
  return {"accuracy": mean_score(correct), "precision": precision, "recall": recall,
          "f1": _ratio(2 * precision * recall, precision + recall),
          "yes_ratio": float(np.mean(said_yes))}


def pope_split_report(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                      splits: Sequence[str]) -> dict[str, dict[str, Any]]:
  """POPE's metrics per split and their mean over the splits.

  POPE asks the same kind of question under three negative samplings ("random", "popular",
  "adversarial"); its evaluation (LLaVA's `eval_pope.py`, which the VisATB release runs) prints
  `pope_report`'s metrics for each split separately, and LLaVA-1.5's tables give the F1 averaged
  over the splits.

  Args:
    predictions, references: as in `pope_scores`, one per question.
    splits: per question, its split (POPE's `category`).

  Returns:
    {"splits": {split: pope_report of its questions}, in order of first appearance,
     "mean": {metric: mean over the splits of that metric}}.
  """
  if len(splits) != len(predictions):
    raise ValueError(f"{len(splits)} splits for {len(predictions)} predictions")
  _check_lengths(predictions, references)
  rows: dict[str, list[int]] = {}
  for i, split in enumerate(splits):
    rows.setdefault(str(split), []).append(i)
  per_split = {split: pope_report([predictions[i] for i in idx], [references[i] for i in idx])
               for split, idx in rows.items()}
  mean = {key: float(np.mean([r[key] for r in per_split.values()]))
          for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")} if per_split else {}
  return {"splits": per_split, "mean": mean}


def mme_answer(text: str) -> str:
  """"yes", "no" or "other" as MME's official `calculation.py` reads an answer.

  Lower-cased; "yes" or "no" as it is; otherwise "yes" if its first 4 characters contain "yes",
  else "no" if they contain "no" ("not sure" reads as no, as there), else "other".
  """
  answer = text.lower()
  if answer in ("yes", "no"):
    return answer
  prefix = answer[:4]
  if "yes" in prefix:
    return "yes"
  return "no" if "no" in prefix else "other"


def mme_scores(predictions: Sequence[str],
               references: Sequence[str | Sequence[str]]) -> np.ndarray:
  """Per question 1.0 if `mme_answer` of the prediction is the label ("yes"/"no"), else 0.0.

  Their mean is MME's accuracy of the subtask; its score (accuracy + accuracy+) is
  `mme_score`. Options: none. Returns float64 [n].
  """
  _check_lengths(predictions, references)
  return np.array([float(mme_answer(p) == _yes_no_label(i, r))
                   for i, (p, r) in enumerate(zip(predictions, references))])


def mme(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """MME accuracy in [0, 1]: the mean of `mme_scores` (the score the pipeline's tables use)."""
  return mean_score(mme_scores(predictions, references))


def mme_report(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
               pair_ids: Sequence[Any]) -> dict[str, float]:
  """MME's metrics of one subtask: {"accuracy", "accuracy_plus", "score"}.

  Args:
    predictions, references: as in `mme_scores`, one per question.
    pair_ids: per question, the id of its image (MME asks two questions per image, one "yes"
      and one "no").

  Returns:
    accuracy: fraction of questions answered right (= `mme(...)`); accuracy_plus: fraction of
    images whose questions are all answered right (MME counts images with both right); score:
    100 · (accuracy + accuracy_plus), in [0, 200], MME's subtask score (its perception and
    cognition totals are sums of these over the subtasks).
  """
  correct = mme_scores(predictions, references)
  if len(pair_ids) != len(correct):
    raise ValueError(f"{len(pair_ids)} pair ids for {len(correct)} predictions")
  by_image: dict[Any, bool] = {}
  for pair, right in zip(pair_ids, correct):
    by_image[pair] = by_image.get(pair, True) and bool(right)
  accuracy = mean_score(correct)
  accuracy_plus = float(np.mean(list(by_image.values())))
  return {"accuracy": accuracy, "accuracy_plus": accuracy_plus,
          "score": 100.0 * (accuracy + accuracy_plus)}


def mme_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
              pair_ids: Sequence[Any]) -> float:
  """MME's score of one subtask, 100 · (accuracy + accuracy+) in [0, 200] (see `mme_report`)."""
  return mme_report(predictions, references, pair_ids)["score"]


# MME's subtasks as its official eval_tool/calculation.py groups them: the perception total is the
# sum of 10 subtask scores (at most 2000), the cognition total of 4 (at most 800).
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_totals(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
               pair_ids: Sequence[Any], subtasks: Sequence[str]) -> dict[str, Any]:
  """MME's perception and cognition totals: the sums of `mme_report`'s subtask scores.

  Args:
    predictions, references: as in `mme_scores`, one per question.
    pair_ids: per question, its image (two questions per image); images are told apart within
      a subtask, so two subtasks may reuse a file name.
    subtasks: per question, its subtask, a name of MME_PERCEPTION or MME_COGNITION (MME's
      `category`).

  Returns:
    {"perception": Σ scores of the perception subtasks present, "cognition": the same for
     cognition, "subtasks": {subtask: mme_report}, "missing": [subtasks with no question]}. A
     total over fewer subtasks than MME's is not MME's total: `missing` says which are absent.

  Raises:
    ValueError: lengths that differ, or a subtask MME does not have (named).
  """
  if not len(pair_ids) == len(subtasks) == len(predictions):
    raise ValueError(f"{len(pair_ids)} pair ids and {len(subtasks)} subtasks for "
                     f"{len(predictions)} predictions")
  _check_lengths(predictions, references)
  known = MME_PERCEPTION + MME_COGNITION
  rows: dict[str, list[int]] = {}
  for i, subtask in enumerate(subtasks):
    if subtask not in known:
      raise ValueError(f"question {i}: MME has no subtask {subtask!r}; its subtasks: "
                       f"{list(known)}")
    rows.setdefault(subtask, []).append(i)
  reports = {name: mme_report([predictions[i] for i in rows[name]],
                              [references[i] for i in rows[name]],
                              [pair_ids[i] for i in rows[name]])
             for name in known if name in rows}
  return {"perception": float(sum(reports[n]["score"] for n in MME_PERCEPTION if n in reports)),
          "cognition": float(sum(reports[n]["score"] for n in MME_COGNITION if n in reports)),
          "subtasks": reports, "missing": [n for n in known if n not in rows]}


# ---------------------------------------------------------------------------------------------
# Corpus reports from per-sample scores (what the test stage writes to scores/test_reports.json)
# ---------------------------------------------------------------------------------------------


def yes_no_answers(correct: Sequence[float], references: Sequence[str | Sequence[str]]
                   ) -> list[str]:
  """Each answer as POPE or MME read it, recovered from its per-sample score: the label when the
  answer was right, the other label when it was wrong.

  Exact for POPE, which reads every answer as "yes" or "no" (`pope_answer`). An MME answer read as
  neither ("other") is wrong and comes back as the wrong label; MME's score counts only whether an
  answer is right, so `mme_totals` is the same on the answers and on these.
  """
  if len(correct) != len(references):
    raise ValueError(f"{len(correct)} scores for {len(references)} references")
  out = []
  for i, (right, refs) in enumerate(zip(correct, references)):
    label = _yes_no_label(i, refs)
    if right not in (0, 1):
      raise ValueError(f"item {i}: score {right!r} is not a yes/no correctness (0 or 1)")
    out.append(label if right else ("no" if label == "yes" else "yes"))
  return out


def pope_report_from_scores(correct: Sequence[float], references: Sequence[str | Sequence[str]],
                            splits: Sequence[str]) -> dict[str, dict[str, Any]]:
  """`pope_split_report` of the answers behind POPE per-sample scores (`yes_no_answers`)."""
  return pope_split_report(yes_no_answers(correct, references), references, splits)


def mme_totals_from_scores(correct: Sequence[float], references: Sequence[str | Sequence[str]],
                           pair_ids: Sequence[Any], subtasks: Sequence[str]) -> dict[str, Any]:
  """`mme_totals` of the answers behind MME per-sample scores (`yes_no_answers`)."""
  return mme_totals(yes_no_answers(correct, references), references, pair_ids, subtasks)


# POPE's files name a question's negative sampling "category" (LLaVA's llava_pope_test.jsonl).
POPE_ALL_SPLITS = "all"


def pope_sample_arguments(sample: Mapping[str, Any]) -> dict[str, Any]:
  """A POPE sample's split: its `category` (random / popular / adversarial), else "all"."""
  return {"splits": str(sample.get("category") or POPE_ALL_SPLITS)}


def mme_sample_arguments(sample: Mapping[str, Any]) -> dict[str, Any]:
  """An MME sample's subtask (its `category`, LLaVA's llava_mme.jsonl) and its image (its
  `pair_id`, else its `image`: MME asks two questions of each image).

  Raises:
    ValueError: a sample without a category or without an image to pair its questions by.
  """
  subtask = sample.get("category")
  if not isinstance(subtask, str) or not subtask:
    raise ValueError("MME's perception and cognition totals need each sample's 'category' (its "
                     f"subtask, one of {list(MME_PERCEPTION + MME_COGNITION)})")
  pair = sample.get("pair_id")
  if pair in (None, ""):
    pair = sample.get("image")
  if pair in (None, "", []):
    raise ValueError("MME's accuracy+ needs each sample's 'pair_id' or 'image' (its two "
                     "questions share one image)")
  return {"pair_ids": str(pair), "subtasks": subtask}


# {metric: (its corpus report from per-sample scores, the per-sample arguments of that report)}:
# POPE's F1 / accuracy / yes-ratio per split and MME's totals, beside the per-sample mean.
CORPUS_REPORTS: dict[str, tuple[Callable[..., dict], Callable[[Mapping], dict]]] = {
    "pope": (pope_report_from_scores, pope_sample_arguments),
    "mme": (mme_totals_from_scores, mme_sample_arguments),
}

# Scorer arguments read from each sample's own fields, not from the config:
# {metric: (argument names, sample → {argument: value})}.
SAMPLE_ARGUMENTS: dict[str, tuple[tuple[str, ...], Callable[[Mapping], dict]]] = {
    "mmbench_circular": (("questions", "shifts"), mmbench_sample_arguments),
}


def gather_sample_arguments(extract: Callable[[Mapping], dict], samples: Sequence[Mapping]
                            ) -> dict[str, list[Any]]:
  """{argument: one value per sample} of `extract` over `samples`.

  Raises:
    ValueError: naming the sample (its `id`, else its position) whose fields `extract` refuses.
  """
  out: dict[str, list[Any]] = {}
  for i, sample in enumerate(samples):
    try:
      values = extract(sample)
    except ValueError as e:
      raise ValueError(f"sample {sample.get('id', i)!r}: {e}") from None
    for name, value in values.items():
      out.setdefault(name, []).append(value)
  return out


def sample_argument_names(metric_name: str) -> tuple[str, ...]:
  """The scorer arguments of `metric_name` that come from its samples (`SAMPLE_ARGUMENTS`)."""
  return SAMPLE_ARGUMENTS.get(metric_name, ((), None))[0]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SCORERS: dict[str, Callable[..., Any]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "iou_accuracy": iou_accuracy,
    "cider": cider,
    "vqa_accuracy": vqa_accuracy,
    "multiple_choice": multiple_choice,
    "mmbench_circular": mmbench_circular,
    "pope": pope,
    "mme": mme,
}

# Same names as SCORERS: each scalar scorer is the mean of its per-sample scorer.
SAMPLE_SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "exact_match": exact_match_scores,
    "accuracy": accuracy_scores,
    "iou_accuracy": iou_hits,
    "cider": cider_scores,
    "vqa_accuracy": vqa_accuracy_scores,
    "multiple_choice": multiple_choice_scores,
    "mmbench_circular": mmbench_circular_scores,
    "pope": pope_scores,
    "mme": mme_scores,
}


def metric_options(metric_name: str) -> tuple[str, ...]:
  """The keyword options a registered metric accepts from a config (e.g. ("threshold",) for
  iou_accuracy); the arguments its samples give (`SAMPLE_ARGUMENTS`) are not options."""
  if metric_name not in SAMPLE_SCORERS:
    raise ValueError(f"unknown metric {metric_name!r}; known: {sorted(SAMPLE_SCORERS)}")
  params = inspect.signature(SAMPLE_SCORERS[metric_name]).parameters
  own = ("predictions", "references") + sample_argument_names(metric_name)
  return tuple(name for name in params if name not in own)


# Options whose value is one of a fixed set, checked with the config (`check_metric_options`)
# rather than at the first score, hours into a run.
OPTION_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "cider": {"tokenization": CIDER_TOKENIZATIONS},
}


def check_metric_options(metric_name: str, options: Mapping[str, Any]) -> None:
  """Raises ValueError (one line, naming the option) for an option `metric_name` does not take
  or a value outside its choices (`OPTION_CHOICES`)."""
  known = metric_options(metric_name)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"{metric_name} takes no option(s) {unknown}; its options: {list(known)}")
  for name, choices in OPTION_CHOICES.get(metric_name, {}).items():
    if name in options and options[name] not in choices:
      raise ValueError(f"{metric_name} option {name}={options[name]!r}; choose one of "
                       f"{list(choices)}")


def sample_scores(metric_name: str, predictions: Sequence[Any], references: Sequence[Any],
                  **options: Any) -> np.ndarray:
  """Per-sample scores (float64 [n]) of a registered metric; their `mean_score` is `score`.

  A reference is a string or a list of strings (several acceptable answers; iou_accuracy also
  takes boxes as four numbers). Keyword options go to the scorer (`metric_options`):

    accuracy         choices (the closed label set)
    iou_accuracy     threshold (IoU a hit must exceed, default 0.5)
    cider            n (largest n-gram, default 4), sigma (length penalty width, default 6),
                     tokenization ("normalized", default, or "raw": the VisATB release's)
    multiple_choice  choices (option texts: one list or mapping letter → text, or one per item)
    mmbench_circular choices, as multiple_choice; and, from the samples (`SAMPLE_ARGUMENTS`),
                     questions (one question id per item) and shifts (optional)
    exact_match, vqa_accuracy, pope, mme: none

  Every scorer but cider and mmbench_circular gives a per-sample value that depends on that
  sample alone (1.0 / 0.0, or VQA's soft accuracy); cider gives each image's CIDEr-D within the
  corpus being scored (see `cider_scores`), mmbench_circular each item its question's result
  (see `mmbench_circular_scores`).

  Raises:
    ValueError: an unknown metric or option, or invalid predictions, references or options.
  """
  unknown = sorted(set(options) - set(metric_options(metric_name))
                   - set(sample_argument_names(metric_name)))
  if unknown:
    raise ValueError(f"metric {metric_name!r} takes no option(s) {unknown}; its options: "
                     f"{list(metric_options(metric_name))}")
  values = np.asarray(SAMPLE_SCORERS[metric_name](predictions, references, **options),
                      np.float64)
  if values.shape != (len(predictions),):  # a guard on the registry, not on the caller
    raise AssertionError(f"{metric_name}: {values.shape} per-sample scores for "
                         f"{len(predictions)} predictions")
  return values


def score(metric_name: str, predictions: Sequence[Any], references: Sequence[Any],
          **options: Any) -> float:
  """The scalar score of a registered metric: `mean_score` of `sample_scores` (same options)."""
  return mean_score(sample_scores(metric_name, predictions, references, **options))
