"""Is one model better than another on a task, beyond the test set's sampling noise?

Two final models scored on the same test samples give paired per-sample scores a_k and b_k. Their
difference of means, mean(b) − mean(a), is resampled by a paired bootstrap (the same indices for
both models, as `bootstrap.py` does for the validation table): a percentile interval that excludes
0 says the difference is more than the luck of which test samples were drawn. It says nothing about
training variance (another training seed may order the two models differently; BENCHMARKS.md B9
gives that spread over seeds).

Pure numpy, no I/O: the report (pipeline/report.py) feeds it scores/test_samples.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from visatb_jax.core import metrics

__all__ = ["aligned", "paired_delta_difference", "paired_difference", "percentile_interval"]


def percentile_interval(x: np.ndarray, level: float) -> np.ndarray:
  """The central `level` percentile interval over the leading axis: [..., 2] = (lo, hi).

  The one percentile rule of every bootstrap interval here (and of core/bootstrap.py)."""
  tail = 100.0 * (1.0 - level) / 2.0
  return np.moveaxis(np.percentile(x, [tail, 100.0 - tail], axis=0), 0, -1)


def aligned(*scores: Mapping[str, float], what: str) -> tuple[np.ndarray, ...]:
  """Several models' per-sample scores `{sample_id: score}` as arrays in one sample order.

  Raises:
    ValueError: the models were not all scored on the same samples (`what` names the comparison).
  """
  first = scores[0]
  for other in scores[1:]:
    if set(first) != set(other):
      raise ValueError(f"{what}: the models were scored on different samples "
                       f"({len(set(first) - set(other))} only in the first, "
                       f"{len(set(other) - set(first))} only in another)")
  if not first:
    raise ValueError(f"{what}: no samples")
  keys = sorted(first)
  return tuple(np.asarray([float(m[k]) for k in keys], np.float64) for m in scores)


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = 1000,
                      level: float = 0.9, seed: int = 0) -> dict[str, float | list[float]]:
  """mean(b) − mean(a) with its paired-bootstrap percentile interval.

  Args:
    a, b: per-sample scores of two models on the same samples, in the same order.
    resamples: bootstrap resamples (>= 1).
    level: coverage of the central percentile interval, in (0, 1).
    seed: seed of the index draw.

  Returns:
    {"difference": float, "interval": [lo, hi], "n": number of samples}.

  Raises:
    ValueError: lengths differ, no samples, a non-finite score, or bad resamples/level.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or a.size == 0:
    raise ValueError(f"paired scores must be two non-empty vectors of one length, got "
                     f"{a.shape} and {b.shape}")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ValueError("paired scores must be finite")
  if int(resamples) < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  diff = b - a
  n = diff.size
  indices = np.random.default_rng(seed).integers(0, n, size=(int(resamples), n))
  means = diff[indices].mean(axis=1)
  lo, hi = percentile_interval(means, level)
  return {"difference": float(diff.mean()), "interval": [float(lo), float(hi)], "n": int(n)}


def paired_delta_difference(scores: Mapping[str, Mapping[str, Sequence[float]]], method: str,
                            other: str, *, reference: str = "stl", resamples: int = 1000,
                            level: float = 0.9, seed: int = 0) -> dict[str, dict]:
  """ΔI% and ΔE% (docs/method.md §8) of `method` minus those of `other`, both against
  `reference`, with a paired-bootstrap interval over the test samples.

  Args:
    scores: {model: {task: per-sample scores}}, every model scored on the same samples of a
      task in the same order (`aligned`), higher is better, one metric per task; the tasks of
      `reference` are compared.
    method, other, reference: model names in `scores`.

  Each resample draws, per task, one index vector used by all three models, recomputes the
  per-task means and so I_i = (M_i − M_ref,i)/M_ref,i of both methods, ΔI = 100·mean I,
  ΔE = 100·mean max(0, −I).

  Returns:
    {"delta_i": {"difference", "interval"}, "delta_e": {...}}.

  Raises:
    ValueError: a task missing from a model, different sample counts, a reference mean of 0.
  """
  tasks = list(scores[reference])
  if not tasks:
    raise ValueError(f"{reference!r} has no tasks")
  rng = np.random.default_rng(seed)
  point, draws = [], []
  for task in tasks:
    arrays = []
    for name in (method, other, reference):
      if task not in scores[name]:
        raise ValueError(f"task {task!r} has no per-sample scores of {name!r}")
      arrays.append(np.asarray(scores[name][task], np.float64))
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
      raise ValueError(f"task {task!r}: the three models have different sample counts")
    stacked = np.stack(arrays)                                   # [3, n]
    n = stacked.shape[1]
    idx = rng.integers(0, n, size=(int(resamples), n))
    point.append(stacked.mean(axis=1))                           # [3]
    draws.append(stacked[:, idx].mean(axis=2).T)                 # [B, 3]
  point, draws = np.stack(point), np.stack(draws, axis=1)        # [T, 3], [B, T, 3]
  if np.any(point[:, 2] == 0) or np.any(draws[..., 2] == 0):
    raise ValueError(f"a task's mean score of {reference!r} is 0: ΔI is undefined")

  def deltas(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rel = (m[..., :2] - m[..., 2:]) / m[..., 2:]                 # [..., T, 2]
    d_i, d_e = metrics.delta_from_improvements(rel, axis=-2)
    return d_i[..., 0] - d_i[..., 1], d_e[..., 0] - d_e[..., 1]

  out = {}
  for key, p_val, d_val in zip(("delta_i", "delta_e"), deltas(point), deltas(draws)):
    lo, hi = percentile_interval(d_val, level)
    out[key] = {"difference": float(p_val), "interval": [float(lo), float(hi)]}
  return out
