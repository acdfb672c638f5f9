"""Evaluation metrics: ΔI% / ΔE% against a baseline, and per-task scorers.

Overall metrics (docs/method.md §8), for tasks i with metrics k and sign s_ik (+1 if higher is better,
-1 otherwise):

    I_i  = (1/K_i) Σ_k s_ik · (M_e,ik − M_b,ik) / M_b,ik
    ΔI%  = 100 · mean_i I_i
    ΔE%  = 100 · mean_i max(0, −I_i)

Per-task scorers take a list of predictions and a list of references (one entry per item):
`exact_match`, `accuracy`, `iou_accuracy` (each in [0, 1]) and `cider` (CIDEr-D on the COCO caption
evaluation's scale, [0, 10]). Each has a per-sample form (`exact_match_scores`, `accuracy_scores`,
`iou_hits`, `cider_scores`) whose `mean_score` is the scalar, so a score and the per-sample values
that a bootstrap resamples cannot drift apart. `SCORERS`, `SAMPLE_SCORERS`, `score` and
`sample_scores` give the evaluation loop one entry point.

Everything here is plain Python/numpy: nothing needs jax, Java or a network.
"""

from __future__ import annotations

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
  improvements = np.array(list(per_task.values()))
  return {
      "delta_i": float(100.0 * improvements.mean()),
      "delta_e": float(100.0 * np.maximum(0.0, -improvements).mean()),
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


def accuracy_scores(predictions: Sequence[str], references: Sequence[str],
                    choices: Sequence[str] | None = None) -> np.ndarray:
  """Per item 1.0 if the normalised prediction equals the (closed-set) label, else 0.0.

  Args:
    predictions: one generated answer per item.
    references: one label per item.
    choices: the label set. A prediction outside it counts as wrong; a reference outside it is a
      data error (ValueError), since no prediction could then be right.

  Returns:
    float64 [n].
  """
  _check_lengths(predictions, references)
  allowed = None if choices is None else {normalize_answer(c) for c in choices}
  hits = np.zeros(len(predictions))
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    if not isinstance(ref, str):
      raise ValueError(f"item {i}: reference {ref!r} is not a string")
    label = normalize_answer(ref)
    if allowed is not None and label not in allowed:
      raise ValueError(f"item {i}: reference {ref!r} is not one of the choices")
    answer = normalize_answer(pred)
    hits[i] = (allowed is None or answer in allowed) and answer == label
  return hits


def accuracy(predictions: Sequence[str], references: Sequence[str],
             choices: Sequence[str] | None = None) -> float:
  """Closed-set accuracy: the mean of `accuracy_scores` (same arguments)."""
  return mean_score(accuracy_scores(predictions, references, choices))


# ---------------------------------------------------------------------------------------------
# Box grounding: IoU accuracy
# ---------------------------------------------------------------------------------------------

_NUMBER = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
# The whole answer must be the box (an optional trailing period aside): text around it means the
# model did not learn the answer format, which the metric should show rather than hide.
_BOX_RE = re.compile(r"^\s*\[" + ",".join([_NUMBER] * 4) + r"\]\s*\.?\s*$")


def _is_valid_box(box: Sequence[float]) -> bool:
  """Four finite coordinates in [0, 1] with x1 < x2 and y1 < y2 (a box with area)."""
  if len(box) != 4 or not all(math.isfinite(v) for v in box):
    return False
  x1, y1, x2, y2 = box
  return all(0.0 <= v <= 1.0 for v in box) and x1 < x2 and y1 < y2


def parse_box(text: Any) -> Box | None:
  """Parses "[x1, y1, x2, y2]" (values in [0, 1], x1 < x2, y1 < y2) into a tuple, else None.

  Whitespace around the numbers and the brackets and one trailing period are allowed. Missing
  brackets, a wrong count of numbers, other text, out-of-range values and degenerate boxes
  (x2 <= x1 or y2 <= y1) all give None.
  """
  if not isinstance(text, str):
    return None
  match = _BOX_RE.match(text)
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


def _reference_box(i: int, ref: str | Sequence[float]) -> Box:
  try:
    box = parse_box(ref) if isinstance(ref, str) else tuple(float(v) for v in ref)
  except (TypeError, ValueError):
    box = None
  if box is None or not _is_valid_box(box):
    raise ValueError(f"item {i}: reference {ref!r} is not a valid box")
  return box


def _check_threshold(threshold: float) -> None:
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"threshold must be in [0, 1), got {threshold}")


def _iou_items(predictions: Sequence[str], references: Sequence[str | Sequence[float]],
               threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """(hit, parsed) per item: float64 1.0/0.0 hits and bool "the prediction parsed as a box"."""
  _check_threshold(threshold)
  _check_lengths(predictions, references)
  hits = np.zeros(len(predictions))
  parsed = np.zeros(len(predictions), bool)
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    target = _reference_box(i, ref)
    box = parse_box(pred)
    parsed[i] = box is not None
    hits[i] = box is not None and box_iou(box, target) > threshold
  return hits, parsed


def iou_hits(predictions: Sequence[str], references: Sequence[str | Sequence[float]],
             threshold: float = 0.5) -> np.ndarray:
  """Per item 1.0 if the predicted box has IoU > `threshold` with the reference box, else 0.0.

  Arguments as in `iou_accuracy`; an unparsable prediction scores 0.0. Returns float64 [n].
  """
  return _iou_items(predictions, references, threshold)[0]


def iou_accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[float]],
                 threshold: float = 0.5) -> tuple[float, dict[str, int]]:
  """Fraction of predicted boxes with IoU > `threshold` against the reference box.

  Args:
    predictions: generated answers, each expected to be "[x1, y1, x2, y2]" (see `parse_box`).
    references: per item, the box as text in the same format or as four numbers.
    threshold: a hit needs IoU strictly above it.

  Returns:
    (score, {"unparsable": n}): the score is the mean of `iou_hits`; n counts predictions that
    `parse_box` rejects (no box, wrong format, out-of-range or degenerate box); each scores 0.
  """
  hits, parsed = _iou_items(predictions, references, threshold)
  return mean_score(hits), {"unparsable": int((~parsed).sum())}


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def cider_tokenize(text: str) -> list[str]:
  """Lower-cases, deletes ASCII punctuation and splits on whitespace.

  The COCO caption evaluation tokenises with the Stanford PTB tokenizer (Java) and then drops
  punctuation tokens; this is a Java-free stand-in. It differs on contractions and possessives
  ("man's" → "mans" here, "man 's" there) and on hyphenated or dotted words ("e.g." → "eg").
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
                 *, n: int = 4, sigma: float = 6.0) -> np.ndarray:
  """Per-item CIDEr-D scores, as pycocoevalcap's `Cider` (which implements CIDEr-D) computes them.

  For item j with candidate c and references R_j, with g_k(·) the tf·idf vector of k-grams:

      CIDEr-D_j = 10 / (n · |R_j|) · Σ_{r∈R_j} Σ_{k=1..n} exp(−(ℓ_c − ℓ_r)² / 2σ²) ·
                  Σ min(g_k(c), g_k(r)) · g_k(r) / (|g_k(c)| · |g_k(r)|)

  idf(g) = log(#items) − log(max(1, df(g))), df(g) = number of items whose references contain g:
  document frequencies come from the references of the corpus being scored, so a one-item corpus
  scores 0 (every idf is 0). ℓ is the length in tokens; the COCO code counts bigrams instead,
  which gives the same difference whenever both sides are non-empty, and an empty side scores 0
  either way. Tokenisation: `cider_tokenize`.

  These are CIDEr-D's per-sample scores: their `mean_score` is the corpus score (`cider`). Each
  depends on the whole corpus through the idf, so a bootstrap that resamples them keeps the full
  corpus's idf rather than recomputing it per resample.

  Returns:
    float64 [n].
  """
  _check_lengths(predictions, references)
  if n < 1 or sigma <= 0.0:
    raise ValueError(f"need n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
  hyps = [cider_tokenize(p) for p in predictions]
  refs = [[cider_tokenize(r) for r in _reference_list(i, rs)] for i, rs in enumerate(references)]
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
          *, n: int = 4, sigma: float = 6.0) -> float:
  """Corpus CIDEr-D: the mean of `cider_scores` (scale [0, 10], as pycocoevalcap reports it).

  Args:
    predictions: one generated caption per image.
    references: per image, a list of reference captions (a bare string is one reference).
    n: the largest n-gram order.
    sigma: the width of the Gaussian length penalty.
  """
  return mean_score(cider_scores(predictions, references, n=n, sigma=sigma))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SCORERS: dict[str, Callable[..., Any]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "iou_accuracy": iou_accuracy,
    "cider": cider,
}

# Same names as SCORERS: each scalar scorer is the mean of its per-sample scorer.
SAMPLE_SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "exact_match": exact_match_scores,
    "accuracy": accuracy_scores,
    "iou_accuracy": iou_hits,
    "cider": cider_scores,
}


def sample_scores(metric_name: str, predictions: Sequence[Any], references: Sequence[Any],
                  **options: Any) -> np.ndarray:
  """Per-sample scores (float64 [n]) of a registered metric; their `mean_score` is `score`.

  exact_match, accuracy and iou_accuracy give 1.0 or 0.0 per sample; cider gives each image's
  CIDEr-D within the corpus being scored (see `cider_scores`). Keyword options go to the scorer
  (e.g. `choices` for accuracy, `threshold` for iou_accuracy, `n`/`sigma` for cider).
  """
  if metric_name not in SAMPLE_SCORERS:
    raise ValueError(f"unknown metric {metric_name!r}; known: {sorted(SAMPLE_SCORERS)}")
  values = np.asarray(SAMPLE_SCORERS[metric_name](predictions, references, **options),
                      np.float64)
  if values.shape != (len(predictions),):  # a guard on the registry, not on the caller
    raise AssertionError(f"{metric_name}: {values.shape} per-sample scores for "
                         f"{len(predictions)} predictions")
  return values


def score(metric_name: str, predictions: Sequence[Any], references: Sequence[Any],
          **kwargs: Any) -> float:
  """The scalar score of a registered metric: `mean_score` of `sample_scores`.

  Keyword arguments go to the scorer (e.g. `choices` for accuracy, `threshold` for iou_accuracy).
  """
  return mean_score(sample_scores(metric_name, predictions, references, **kwargs))
