"""Paired bootstrap of VisATB balancing: how uncertain C, D and λ are, from per-sample scores.

Each validation score V_j(m) is a mean over the n_j validation samples of task j, and every model
is scored on the same samples. Given each sample's own score, `{model: {task: [s_1, ..., s_n]}}`
(the same samples, in the same order, for every model that has the task), `bootstrap_report`
returns `balancing.balance_report` on the per-sample means (the point values) together with
percentile intervals from a paired bootstrap:

* For each task, `resamples` index vectors of length n are drawn with replacement (one numpy
  `Generator` seeded by `seed`, task by task in the order of `tasks`, see `resample_indices`).
  The same indices serve every model (paired): the differences between models, which is what C
  and D are made of, are then resampled as differences, not as independent noise.
* Each resample gives a table of means (computed at once for all resamples as multinomial counts
  @ scores), from which everything is recomputed as `balancing` does: group means of task means,
  C, C_out, C_in, D, λ_out, λ_in, λ_D, λ (with `temperature="auto"` re-solved per resample by
  `balancing.auto_temperature_batch`, the scalar search run for all resamples at once), and the
  own-data gain of each unit, `gain[u] = V_u(own model of u) − V_u(reference model)`
  (V_u(u+mini) − V_u(mini) in the "real" and "precise" forms, V_u(u) − V_u(base) in "base").
* Nothing loops over the resamples in Python: the formulas of `balancing` (the same functions,
  which accept leading batch axes and numpy) run on arrays with a leading resample axis.

Degenerate resamples (choice): inside the resamples, the masked maths of
`on_degenerate="warn"` always apply (a receiver whose own-data gain is not clearly positive gets a
zero column of C, a degenerate difficulty denominator D = 0; see `balancing`), silently, so that
one unlucky resample never raises nor makes a NaN; how many resamples needed a mask is reported
as "degenerate_resamples". Likewise, a resample for which no T in `AUTO_T_RANGE` is feasible gets
the top of the range (counted as "infeasible_temperature_resamples") instead of an error. The
point values keep the caller's `on_degenerate` and raise as `balance_report` does.

Noise: a unit whose gain interval contains 0 (`balancing.noisy_units`, the report's "noisy") did
not clearly improve with its own data, and its column of C is noise; pass it as `drop` to leave
that column out of C_out/C_in (see "Noisy own-data gain" in `balancing`). `drop` applies to the
point values and to every resample alike.

Preparation replicates (docs/method.md §13). Each preparation model may be trained R times;
replicate r of every model uses the same data-subset seed, so replicates are paired across models
as validation samples are. A model's scores on a task are then `[R, n]` (R replicates scored on
the same n samples in the same order) instead of `[n]`; every model has the same R. The point
value V is the mean over replicates and samples. The two-level paired bootstrap draws, per
resample, R replicate indices with replacement (the same for every model and task) and, per task
as above, n sample indices (the same for every model): the resampled mean of (model, task) is
c·S·d/(R·n), with c [R] and d [n] the multinomial counts and S [R, n] the scores. The replicate
indices come from their own generator, `np.random.default_rng([seed, 1])` (`replicate_indices`),
so the sample indices are `resample_indices`' whatever R; with R = 1 nothing is drawn for the
replicates and every number is that of the single-level bootstrap.

Variance shares (§13): which level does a quantity's uncertainty come from? For every reported
quantity, two more bootstraps with the same number of resamples give "training_var" (replicates
resampled, samples fixed; generator `default_rng([seed, 2])`) and "sampling_var" (samples
resampled, replicates fixed; `default_rng([seed, 3])`), and "training_share" = training /
(training + sampling): near 1, more replicates would narrow the interval; near 0, more validation
samples. With R = 1 the training variance is invisible (0, share 0.0: the report says
"replicates": 1) and the sampling variance is that of the main resamples. A variance at the level
of float rounding (sd <= 1e-12 × the quantity's magnitude) counts as 0; a share is null (None)
where both are 0 (C's diagonal, a fixed task's λ, a quantity that no resample moves).

Evidence shrinkage (`shrinkage="evidence"`, docs/method.md §14): the bootstrap sd of each λ
component's deviation from its mean over units (C_out, C_in, D; std over the resamples, ddof=1)
is passed as `spread` to `balancing.balance_report` for the point values, and the same sds shrink
every resample's components (auto T re-solved on the shrunk values), so the λ intervals are those
of the shrunk estimator. See `balancing.shrink_toward_mean`.

The resamples are computed in float64 numpy (no JAX compilation, so a first call is as fast as
the next); the point values are `balance_report`'s, in JAX's default float dtype.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from visatb_jax.core import balancing as B
from visatb_jax.core import formulas as F
from visatb_jax.core.options import SHRINKAGE
from visatb_jax.core import score_table as T
from visatb_jax.core.differences import percentile_interval

__all__ = ["SHRINKAGE", "VARIANCE_KEYS", "align_by_id", "bootstrap_draws", "bootstrap_report",
           "replicate_indices", "resample_indices", "stack_replicates"]

# {model: {task: [n] per-sample scores, or [R, n]: one list per replicate}}
PerSample = Mapping[str, Mapping[str, Any]]
# The quantities whose variance is split into training and sampling shares.
VARIANCE_KEYS = ("C", "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d", "lambda",
                 "gain")
# Streams derived from `seed` (np.random.default_rng([seed, stream])): the replicate draw of the
# two-level bootstrap, the replicate-only and the sample-only bootstraps of the variance shares.
# They are non-zero: default_rng([seed, 0]) is the same generator as default_rng(seed).
_REPLICATE_STREAM, _TRAINING_STREAM, _SAMPLING_STREAM = 1, 2, 3
# A variance whose sd is below this fraction of the quantity's magnitude counts as 0.
_ROUNDING = 1e-12


# ----------------------------------------------------------------------------------------------
# Argument checks.


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_level(level: Any) -> float:
  if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
    raise ValueError(f"level must be a number in (0, 1), e.g. 0.9, got {level!r}")
  return float(level)


def _check_shrinkage(shrinkage: Any) -> str:
  if not isinstance(shrinkage, str) or shrinkage not in SHRINKAGE:
    raise ValueError(f"unknown shrinkage {shrinkage!r}; expected one of {', '.join(SHRINKAGE)}")
  return shrinkage


def _is_list(value: Any) -> bool:
  return (isinstance(value, (Sequence, np.ndarray, jax.Array))
          and not isinstance(value, (str, bytes)))


def _first_non_number(values: Any, model: str, task: str, nested: bool) -> None:
  """Raises naming the first item that is not a real number (only called when numpy read some)."""
  rows = values if nested else [values]
  for r, row in enumerate(rows):
    items = list(row) if isinstance(row, Sequence) else np.asarray(row).tolist()
    for k, v in enumerate(items):
      if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        where = f"sample {k} of replicate {r}" if nested else f"sample {k}"
        raise ValueError(f"{where} of model {model!r} on task {task!r} is not a number: {v!r}")


def _sample_array(values: Any, model: str, task: str) -> tuple[np.ndarray, bool]:
  """One model's scores on one task as finite float64 [R, n] (or ValueError), and whether they
  were given per replicate ([R, n]) rather than flat ([n], then R = 1)."""
  where = f"per-sample scores of model {model!r} on task {task!r}"
  if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray,
                                                                          jax.Array)):
    raise ValueError(f"{where} must be a sequence of numbers, got {type(values).__name__}")
  try:
    arr = np.asarray(values)
  except ValueError:  # ragged nesting
    arr = np.asarray(values, dtype=object)
  if arr.ndim == 1 and arr.dtype == object and len(arr) and all(_is_list(v) for v in arr):
    lengths = [len(v) for v in arr]
    r = next((k for k, m in enumerate(lengths) if m != lengths[0]), None)
    if r is not None:
      raise ValueError(f"replicate {r} of model {model!r} on task {task!r} has {lengths[r]} "
                       f"samples but replicate 0 has {lengths[0]}: every replicate is scored on "
                       "the same samples, in the same order")
  if arr.ndim not in (1, 2):
    raise ValueError(f"{where} must be a flat sequence of numbers [n], or one such sequence per "
                     f"replicate [R, n], got shape {arr.shape}")
  nested = arr.ndim == 2
  if arr.size == 0:
    raise ValueError(f"{where} are empty")
  if arr.dtype.kind not in "iuf":
    # Only when numpy did not read plain numbers: find the first culprit to name it.
    # The caller's own items: numpy would have turned [0.1, "x"] into strings.
    _first_non_number(values if isinstance(values, Sequence) else arr, model, task, nested)
  arr = arr.astype(np.float64)
  if not nested:
    arr = arr[None]
  bad = np.argwhere(~np.isfinite(arr))
  if bad.size:
    r, k = (int(i) for i in bad[0])
    place = f"sample {k} of replicate {r}" if nested else f"sample {k}"
    count = len(bad)
    raise ValueError(f"{place} of model {model!r} on task {task!r} is not finite: {arr[r, k]} "
                     f"({count} non-finite sample{'s' if count > 1 else ''})")
  return arr, nested


def _check_per_sample(per_sample: PerSample) -> tuple[dict[str, dict[str, np.ndarray]], int]:
  """Validates `{model: {task: samples}}` into float64 [R, n] arrays, and returns R.

  Every model of a task has the same number of samples, and every (model, task) the same number
  of replicates R (replicates are paired across models: replicate r of every model was trained
  with the same data-subset seed).
  """
  if not isinstance(per_sample, Mapping):
    raise ValueError(f"per_sample must be a mapping {{model: {{task: [scores]}}}}, got "
                     f"{type(per_sample).__name__}")
  out: dict[str, dict[str, np.ndarray]] = {}
  # task -> (first model having it, its sample count, whether it was given per replicate)
  first: dict[str, tuple[str, int, bool]] = {}
  first_r: tuple[str, str, int] | None = None  # (model, task, R) of the first scores
  for model, row in per_sample.items():
    if not isinstance(row, Mapping):
      raise ValueError(f"model {model!r} must map task -> per-sample scores, got "
                       f"{type(row).__name__}")
    out[model] = {}
    for task, values in row.items():
      arr, nested = _sample_array(values, model, task)
      r, n = arr.shape
      if first_r is None:
        first_r = (model, task, r)
      elif r != first_r[2]:
        m0, t0, r0 = first_r
        other = (f"{r0} on task {t0!r}" if m0 == model
                 else f"model {m0!r} has {r0} (on task {t0!r})")
        raise ValueError(f"model {model!r} has {r} replicate{'s' if r > 1 else ''} on task "
                         f"{task!r} but {other}: every preparation model needs the same "
                         "replicates, paired by seed")
      other, n0, nested0 = first.setdefault(task, (model, n, nested))
      if n != n0:
        if nested or nested0:
          got = f"{r} list{'s' if r > 1 else ''} of {n}" if nested else f"a flat sequence of {n}"
          raise ValueError(f"per-sample scores of model {model!r} on task {task!r} must be a "
                           f"flat sequence of {n0} samples (or {r} replicate "
                           f"list{'s' if r > 1 else ''} of {n0}), as model {other!r} has, got "
                           f"{got}")
        raise ValueError(f"model {model!r} has {n} samples on task {task!r} but model "
                         f"{other!r} has {n0}: every model must be scored on the same samples of "
                         "a task, in the same order")
      out[model][task] = arr
  return out, 1 if first_r is None else first_r[2]


# ----------------------------------------------------------------------------------------------
# Resampling.


def _draw(n_samples: Mapping[str, int], resamples: int,
          seed: int) -> Iterator[tuple[str, np.ndarray]]:
  """(task, indices [resamples, n]) for each task in order, from one generator seeded by `seed`."""
  rng = np.random.default_rng(seed)
  for task, n in n_samples.items():
    yield task, rng.integers(0, n, size=(resamples, n))


def resample_indices(n_samples: Mapping[str, int], *, resamples: int,
                     seed: int) -> dict[str, np.ndarray]:
  """The bootstrap's sample indices: task -> int array [resamples, n] (rows drawn with replacement).

  Drawn from `np.random.default_rng(seed)`, task by task in the order of `n_samples`: with
  `bootstrap_report(...)["bootstrap"]["samples"]` (which lists the tasks in that order) this
  reproduces exactly the indices the report used, e.g. to check it against a plain loop. They do
  not depend on the number of replicates (see `replicate_indices`).
  """
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  return dict(_draw(n_samples, resamples, seed))


def _replicate_draw(replicates: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, replicates, size=(resamples, replicates))


def replicate_indices(replicates: int, *, resamples: int, seed: int) -> np.ndarray:
  """The two-level bootstrap's replicate indices: int array [resamples, R], the same for every
  model and task (paired), drawn from `np.random.default_rng([seed, 1])`.

  With R = 1 nothing is drawn (every resample uses the one replicate): all zeros [resamples, 1].
  """
  replicates = _check_int(replicates, "replicates", 1)
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  if replicates == 1:
    return np.zeros((resamples, 1), dtype=np.int64)
  return _replicate_draw(replicates, resamples,
                         np.random.default_rng([seed, _REPLICATE_STREAM]))


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
  """How often each sample occurs in each resample: float64 [resamples, n]."""
  rows = indices.shape[0]
  flat = (np.arange(rows)[:, None] * n + indices).ravel()
  return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _models_per_task(plan: Any, form: str) -> dict[str, list[str]]:
  """task -> the models whose score on it balancing needs, tasks in the order of `plan.tasks`."""
  need: dict[str, list[str]] = {}
  for model, unit_ixs in T.required_models(plan, form, T.PARTS).items():
    for i in unit_ixs:
      for task in plan.members[i]:
        need.setdefault(task, []).append(model)
  return {t: need[t] for t in plan.tasks if t in need}


def _resampled_means(samples: Mapping[str, Mapping[str, np.ndarray]],
                     models: Mapping[str, Sequence[str]], n_samples: Mapping[str, int],
                     replicates: int, resamples: int, sample_rng: np.random.Generator | None,
                     replicate_counts: np.ndarray | None) -> dict[tuple[str, str], np.ndarray]:
  """(model, task) -> its mean score in each resample, float64 [resamples].

  The mean is c·S·d/(R·n) for scores S [R, n], replicate counts c [R] (`replicate_counts`
  [resamples, R], the same for every model and task; None: every replicate once) and sample
  counts d [n] drawn task by task from `sample_rng` (the same for every model; None: every sample
  once). With one replicate and samples drawn, this is exactly the single-level computation.
  """
  means = {}
  r = replicates
  for task, n in n_samples.items():
    scores = np.stack([samples[m][task] for m in models[task]])  # [M, R, n]
    m = scores.shape[0]
    if sample_rng is not None:
      counts = _counts(sample_rng.integers(0, n, size=(resamples, n)), n)
      if r == 1 and replicate_counts is None:
        task_means = counts @ scores[:, 0].T / n                    # [B, M]
      else:
        per_rep = (counts @ scores.reshape(m * r, n).T).reshape(resamples, m, r)
        summed = (per_rep.sum(axis=-1) if replicate_counts is None
                  else np.einsum("bmr,br->bm", per_rep, replicate_counts))
        task_means = summed / (r * n)
    else:
      per_rep = scores.sum(axis=-1)                                  # [M, R]
      summed = (np.broadcast_to(per_rep.sum(axis=-1), (resamples, m))
                if replicate_counts is None else replicate_counts @ per_rep.T)
      task_means = summed / (r * n)
    for k, model in enumerate(models[task]):
      means[(model, task)] = task_means[:, k]
  return means


def _unit_table(value: Any, plan: Any, form: str) -> T.ScoreTable:
  """The balancing table with a leading resample axis: own [R, N, N], ref/d_num/d_den [R, N].

  `value(model, task)` gives the [R] scores; a group's score is the plain mean of its tasks'.
  """
  def unit(model: str, i: int) -> np.ndarray:
    values = [value(model, t) for t in plan.members[i]]
    return values[0] if len(values) == 1 else np.mean(np.stack(values), axis=0)

  n = len(plan.units)
  own = np.stack([np.stack([unit(T.own_model(form, u), j) for j in range(n)], axis=-1)
                  for u in plan.units], axis=-2)
  ref = np.stack([unit(T.reference_model(form), j) for j in range(n)], axis=-1)
  models = [T.difficulty_models(form, u) for u in plan.units]
  d_num = np.stack([unit(m[0], i) for i, m in enumerate(models)], axis=-1)
  d_den = np.stack([unit(m[1], i) for i, m in enumerate(models)], axis=-1)
  return T.ScoreTable(own=own, ref=ref, d_num=d_num, d_den=d_den)


def _gain(table: T.ScoreTable) -> np.ndarray:
  """Own-data gain V_u(own_u) − V_u(ref) per unit, [R, N]."""
  return np.diagonal(table.own, axis1=-2, axis2=-1) - table.ref


# ----------------------------------------------------------------------------------------------
# The balancing maths over all resamples at once (numpy float64, masked as with "warn").


def _components(means: Mapping[tuple[str, str], np.ndarray], plan: Any, form: str,
                dropped: np.ndarray | None) -> dict[str, np.ndarray]:
  """C, C_out, C_in, D, the gain and the degenerate flag of every resample."""
  table = _unit_table(lambda m, t: means[(m, t)], plan, form)
  # The masks of on_degenerate="warn", always on (see the module docstring).
  c_valid = F.gain_valid(np.diagonal(table.own, axis1=-2, axis2=-1), table.ref, np)
  d_valid = F.difficulty_valid(table.d_num, table.d_den)
  c = F.contributions(table.own, table.ref, c_valid, xp=np)
  d = F.difficulty(table.d_num, table.d_den, d_valid, xp=np)
  c_out, c_in = F.outward_inward_of(c, dropped, xp=np)
  return {"C": c, "c_out": c_out, "c_in": c_in, "d": d, "gain": _gain(table),
          "degenerate": ~(c_valid.all(axis=-1) & d_valid.all(axis=-1))}


def _weights(comp: Mapping[str, np.ndarray], temperature: Any,
             alpha: tuple[float, float, float],
             spread: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """λ_out, λ_in, λ_D, λ and T of every resample, from (shrunk, with `spread`) components."""
  x = tuple(comp[k] for k in B.SPREAD_COMPONENTS)
  out: dict[str, np.ndarray] = {}
  if spread is not None:
    x = tuple(F.shrink(v, spread[k], xp=np)[0] for k, v in zip(B.SPREAD_COMPONENTS, x))
    out.update({f"{k}_shrunk": v for k, v in zip(B.SPREAD_COMPONENTS, x)})
  resamples = x[0].shape[0]
  if isinstance(temperature, str):
    t, feasible = B.auto_temperature_batch(*x, alpha=alpha)
  else:
    t, feasible = np.full(resamples, float(temperature)), np.ones(resamples, dtype=bool)
  l_out, l_in, l_d = np.moveaxis(F.np_components(np.stack(x, axis=1), t), 1, 0)
  out.update({
      "lambda_out": l_out, "lambda_in": l_in, "lambda_d": l_d,
      "lambda": alpha[0] * l_out + alpha[1] * l_in + alpha[2] * l_d,
      "temperature": t, "temperature_feasible": feasible,
  })
  return out


def _spread(comp: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per component, the sd over the resamples (ddof=1) of each unit's deviation from the mean."""
  out = {}
  for k in B.SPREAD_COMPONENTS:
    x = comp[k]
    out[k] = np.std(x - x.mean(axis=-1, keepdims=True), axis=0, ddof=1)
  return out


@dataclasses.dataclass(frozen=True)
class _Setup:
  """Everything the resamples need, checked."""
  samples: dict[str, dict[str, np.ndarray]]
  replicates: int
  plan: Any
  form: str
  temperature: Any
  alpha: tuple[float, float, float]
  dropped: np.ndarray | None
  resamples: int
  seed: int

  @property
  def models(self) -> dict[str, list[str]]:
    return _models_per_task(self.plan, self.form)

  @property
  def n_samples(self) -> dict[str, int]:
    return {t: self.samples[ms[0]][t].shape[1] for t, ms in self.models.items()}

  def resampled(self, sample_rng: np.random.Generator | None,
                replicate_rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """C, C_out, C_in, D, gain of each resample (None: that level is not resampled)."""
    counts = None
    if replicate_rng is not None and self.replicates > 1:
      counts = _counts(_replicate_draw(self.replicates, self.resamples, replicate_rng),
                       self.replicates)
    means = _resampled_means(self.samples, self.models, self.n_samples, self.replicates,
                             self.resamples, sample_rng, counts)
    return _components(means, self.plan, self.form, self.dropped)


# The components that the evidence rule treats as carrying no evidence for a unit whose own-data
# gain is not clearly positive (its interval reaches 0 or below): they compare that unit's
# preparation models on a task that they did not learn, so C_in (the mean of its column of C,
# divided by that gain) is noise and D = 1 − V(mini)/V(u+mini) near 0 says "not learned", not
# "easy". sd = inf puts them at the tasks' mean (docs/method.md §14).
NO_EVIDENCE_WHEN_NOISY = ("c_in", "d")


def _not_clearly_positive(gain: np.ndarray, level: float) -> np.ndarray:
  """[N] bool: the unit's gain interval over the resamples [B, N] has its low end <= 0."""
  return percentile_interval(gain, level)[..., 0] <= 0


def _draws(setup: _Setup, shrinkage: str, level: float) -> dict[str, Any]:
  """Every resampled quantity of the two-level bootstrap, float64, leading resample axis."""
  comp = setup.resampled(np.random.default_rng(setup.seed),
                         np.random.default_rng([setup.seed, _REPLICATE_STREAM]))
  spread = None
  if shrinkage == "evidence":
    spread = _spread(comp)
    unlearned = _not_clearly_positive(comp["gain"], level)
    for k in NO_EVIDENCE_WHEN_NOISY:
      spread[k] = np.where(unlearned, np.inf, spread[k])
  out = {"units": list(setup.plan.units), "samples": setup.n_samples,
         "replicates": setup.replicates, **comp,
         **_weights(comp, setup.temperature, setup.alpha, spread)}
  if spread is not None:
    out["spread"] = spread
  return out


def _variances(setup: _Setup, draws: Mapping[str, Any]) -> tuple[dict, dict]:
  """(training, sampling) variances over the resamples of each of `VARIANCE_KEYS`.

  Training: replicates resampled, samples fixed; sampling: samples resampled, replicates fixed;
  each with `setup.resamples` resamples and the main draws' spread (evidence shrinkage). With one
  replicate, the training variance is 0 and the main draws are the sample-only bootstrap.
  """
  ddof = 1 if setup.resamples > 1 else 0
  spread = draws.get("spread")

  def var(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k in VARIANCE_KEYS:
      v = np.var(d[k], axis=0, ddof=ddof)
      # A quantity that does not vary still wobbles by the rounding of the resampled means
      # (~1e-16 relative): that is 0, not a variance to share.
      rounding = (_ROUNDING * np.max(np.abs(d[k]), axis=0)) ** 2
      out[k] = np.where(v <= rounding, 0.0, v)
    return out

  if setup.replicates == 1:
    sampling = var(draws)
    return {k: np.zeros_like(v) for k, v in sampling.items()}, sampling
  out = []
  for sample_rng, replicate_rng in (
      (None, np.random.default_rng([setup.seed, _TRAINING_STREAM])),
      (np.random.default_rng([setup.seed, _SAMPLING_STREAM]), None)):
    comp = setup.resampled(sample_rng, replicate_rng)
    out.append(var({**comp, **_weights(comp, setup.temperature, setup.alpha, spread)}))
  return out[0], out[1]


def _setup(per_sample: PerSample, tasks: Sequence[str], form: str, temperature: Any,
           alpha: Sequence[float], fixed: Mapping[str, float] | None,
           groups: Mapping[str, str] | None, drop: Sequence[str], resamples: int, seed: int,
           shrinkage: str) -> tuple[_Setup, str]:
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  shrinkage = _check_shrinkage(shrinkage)
  if shrinkage == "evidence" and resamples < 2:
    raise ValueError("shrinkage='evidence' needs resamples >= 2 (it uses their standard "
                     f"deviation), got {resamples}")
  samples, replicates = _check_per_sample(per_sample)
  form = T.check_form(form)
  alpha = B.check_alpha(alpha)
  temperature = B.check_temperature(temperature)
  plan = T.resolve_plan(tasks, fixed, groups)
  dropped = T.check_drop(drop, plan)
  return (_Setup(samples, replicates, plan, form, temperature, alpha, dropped, resamples, seed),
          shrinkage)


def bootstrap_draws(per_sample: PerSample, *, tasks: Sequence[str], form: str = "real",
                    temperature: float | str = 0.5,
                    alpha: Sequence[float] = B.DEFAULT_ALPHA,
                    fixed: Mapping[str, float] | None = None,
                    groups: Mapping[str, str] | None = None, drop: Sequence[str] = (),
                    resamples: int = 1000, seed: int = 0, level: float = 0.9,
                    shrinkage: str = "none") -> dict[str, Any]:
  """The raw resampled values behind `bootstrap_report` (same arguments, no point values).

  Returns:
    A dict of numpy arrays, resamples first: "C" [B, N, N]; "c_out", "c_in", "d",
    "lambda_out", "lambda_in", "lambda_d", "lambda" (per balanced unit) and "gain" [B, N];
    "temperature" [B]; "degenerate" [B] (bool: some denominator was masked) and
    "temperature_feasible" [B] (bool; False where "auto" found no feasible T); plus "units" (the
    N balanced units), "samples" (task -> n, in the order the indices were drawn) and
    "replicates" (R). With shrinkage="evidence" also "c_out_shrunk", "c_in_shrunk", "d_shrunk"
    [B, N] (the softmax inputs; the λ arrays are those of the shrunk estimator) and "spread"
    (component -> sd [N], as passed to `balancing.balance_report`; inf for C_in and D of a unit
    whose gain interval at `level` is not above 0).

  Raises:
    ValueError: as `bootstrap_report`, except for the point values' degenerate-data errors.
  """
  setup, shrinkage = _setup(per_sample, tasks, form, temperature, alpha, fixed, groups, drop,
                            resamples, seed, shrinkage)
  # The structural checks (missing models or tasks) of balancing, on the means.
  T.collect_scores(_means(setup.samples), setup.plan, setup.form, T.PARTS)
  return _draws(setup, shrinkage, _check_level(level))


# ----------------------------------------------------------------------------------------------
# The report.


def _means(samples: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
  """V = mean over replicates and samples ([R, n]; with R = 1 exactly the flat mean)."""
  return {m: {t: float(v[0].mean() if v.shape[0] == 1 else v.mean()) for t, v in row.items()}
          for m, row in samples.items()}


def _interval(x: np.ndarray, level: float) -> list[Any]:
  return percentile_interval(x, level).tolist()


def _share(training: float, sampling: float) -> float | None:
  total = training + sampling
  return training / total if total > 0 else None


def bootstrap_report(per_sample: PerSample, *, tasks: Sequence[str], form: str = "real",
                     temperature: float | str = 0.5, alpha: Sequence[float] = B.DEFAULT_ALPHA,
                     fixed: Mapping[str, float] | None = None,
                     groups: Mapping[str, str] | None = None, on_degenerate: str = "error",
                     drop: Sequence[str] = (), resamples: int = 1000, seed: int = 0,
                     level: float = 0.9, shrinkage: str = "none") -> dict[str, Any]:
  """`balancing.balance_report` on the per-sample means, with paired-bootstrap intervals.

  Args:
    per_sample: `{model_name: {task: scores}}` with scores either a flat sequence of per-sample
      scores [n] or one such sequence per preparation replicate [R, n] (R the same for every
      model); every model that has a task is scored on the same samples, in the same order (the
      model names of `balancing`).
    tasks, form, temperature, alpha, fixed, groups, on_degenerate, drop: as
      `balancing.balance_report`; `on_degenerate` applies to the point values only (the
      resamples are always masked, see the module docstring), `drop` to both.
    resamples: number of bootstrap resamples B (>= 1; >= 2 with shrinkage="evidence").
    seed: seed (>= 0) of the numpy generator that draws the indices (`resample_indices`,
      `replicate_indices`).
    level: coverage of the percentile intervals, in (0, 1): 0.9 gives the 5th and 95th
      percentiles.
    shrinkage: "none" (the paper's λ) or "evidence": shrink each λ component toward its mean over
      units by its bootstrap z-score (docs/method.md §14; see the module docstring).

  Returns:
    A JSON-serialisable dict: every key of `balance_report` (the point values, unchanged), plus
    "gain" (unit -> own-data gain V_u(own_u) − V_u(ref) of the means), "intervals" ("C": [lo, hi]
    per entry in the layout of "C"; "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d",
    "gain": unit -> [lo, hi]; "lambda": task -> [lo, hi], [w, w] for fixed tasks, a grouped task
    gets its group's; "temperature": [lo, hi]; with "evidence" also "c_out_shrunk",
    "c_in_shrunk", "d_shrunk"), "noisy" (the units whose gain interval contains 0, see
    `balancing.noisy_units`), "variance" ("training_share", "training_var", "sampling_var", each
    {"C": [[...]], "c_out" | "c_in" | "d" | "lambda_out" | "lambda_in" | "lambda_d" | "gain":
    {unit: v}, "lambda": {task: v}}; a share is null where both variances are 0, and 0.0 with one
    replicate) and "bootstrap" ("resamples", "seed", "level", "samples": task -> n in the order
    the indices were drawn, "replicates": R, "shrinkage": the rule, "drop": the dropped units,
    "degenerate_resamples": how many resamples needed a degenerate-data mask,
    "infeasible_temperature_resamples": how many had no feasible automatic T). With
    shrinkage="evidence", "shrinkage" is {"rule": "evidence", "factor", "sd", "z"}, each
    {component: {unit: value}} (z null where sd = 0) and "c_out_shrunk" etc. come from
    `balance_report(..., spread=sd)`.

  Raises:
    ValueError: per-sample lists that are not flat sequences of finite numbers (or lists of
      them, one per replicate), empty, of different lengths for one task, or with different
      numbers of replicates (the message names the model, the task and the replicate and sample
      index or lengths); bad resamples/seed/level/shrinkage; and whatever `balance_report` raises
      on the means (missing models or tasks, degenerate data with on_degenerate="error", ...).
  """
  level = _check_level(level)
  setup, shrinkage = _setup(per_sample, tasks, form, temperature, alpha, fixed, groups, drop,
                            resamples, seed, shrinkage)
  means = _means(setup.samples)
  if shrinkage == "none":
    report = B.balance_report(means, tasks=tasks, form=form, temperature=temperature,
                              alpha=alpha, fixed=fixed, groups=groups,
                              on_degenerate=on_degenerate, drop=drop)
  elif T.check_on_degenerate(on_degenerate) == "error":
    # The point values' errors before the resamples (the report itself needs their spread).
    B.validate_scores(means, tasks, setup.form, fixed, groups)
  else:
    T.collect_scores(means, setup.plan, setup.form, T.PARTS)
  draws = _draws(setup, shrinkage, level)
  units, plan = setup.plan.units, setup.plan
  if shrinkage == "evidence":
    spread = {k: dict(zip(units, (float(v) for v in sd))) for k, sd in draws["spread"].items()}
    report = B.balance_report(means, tasks=tasks, form=form, temperature=temperature,
                              alpha=alpha, fixed=fixed, groups=groups,
                              on_degenerate=on_degenerate, drop=drop, spread=spread)
  point_table = _unit_table(lambda m, t: np.array([means[m][t]]), plan, setup.form)
  gain = {u: float(g) for u, g in zip(units, _gain(point_table)[0])}
  unit_of = {t: u for u, members in zip(units, plan.members) for t in members}

  def per_task(per_unit: Mapping[str, Any], fixed_value: Any) -> dict[str, Any]:
    return {t: fixed_value(float(report["fixed"][t])) if t in report["fixed"]
            else per_unit[unit_of[t]] for t in plan.tasks}

  def per_unit(key: str) -> dict[str, list[float]]:
    return dict(zip(units, _interval(draws[key], level)))

  if isinstance(setup.temperature, str):
    t_interval = _interval(draws["temperature"], level)
  else:
    t_interval = [float(report["temperature"])] * 2
  unit_keys = ("c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d", "gain")
  if shrinkage == "evidence":
    unit_keys += tuple(f"{k}_shrunk" for k in B.SPREAD_COMPONENTS)
  intervals = {"C": _interval(draws["C"], level)}
  intervals.update({k: per_unit(k) for k in unit_keys})
  intervals.update({"lambda": per_task(per_unit("lambda"), lambda w: [w, w]),
                    "temperature": t_interval})

  training, sampling = _variances(setup, draws)

  def layout(values: Mapping[str, np.ndarray], fixed_value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"C": values["C"].tolist()}
    for k in VARIANCE_KEYS[1:]:
      out[k] = dict(zip(units, values[k].tolist()))
    out["lambda"] = per_task(out["lambda"], fixed_value)
    return out

  shares = {k: np.vectorize(_share, otypes=[object])(training[k], sampling[k])
            for k in VARIANCE_KEYS}
  variance = {"training_share": layout(shares, lambda w: None),
              "training_var": layout(training, lambda w: 0.0),
              "sampling_var": layout(sampling, lambda w: 0.0)}
  out = {
      **report,
      "gain": gain,
      "intervals": intervals,
      "noisy": B.noisy_units(intervals["gain"]),
      "variance": variance,
      "bootstrap": {
          "resamples": setup.resamples, "seed": setup.seed, "level": level,
          "samples": dict(draws["samples"]), "replicates": setup.replicates,
          "shrinkage": shrinkage,
          "drop": ([] if setup.dropped is None
                   else [u for u, d in zip(units, setup.dropped) if d]),
          "degenerate_resamples": int(draws["degenerate"].sum()),
          "infeasible_temperature_resamples": int((~draws["temperature_feasible"]).sum()),
      },
  }
  if shrinkage == "evidence":
    z = {}
    for k, sd in draws["spread"].items():
      x = np.array([report[k][u] for u in units], dtype=np.float64)
      dev = x - x.mean()
      z[k] = {u: (float(dv / s) if 0 < s < np.inf else None) for u, dv, s in zip(units, dev, sd)}
    no_evidence = [u for u, sd in zip(units, draws["spread"]["d"]) if np.isinf(sd)]
    # JSON has no inf: an sd of no evidence is null, beside the units it concerns.
    sd_out = {k: {u: (v if math.isfinite(v) else None) for u, v in per.items()}
              for k, per in spread.items()}
    out["shrinkage"] = {"rule": "evidence", "factor": report["shrinkage"], "sd": sd_out, "z": z,
                        "no_evidence": no_evidence}
  return out


# ----------------------------------------------------------------------------------------------
# Per-sample files.


def align_by_id(per_sample: Mapping[str, Mapping[str, Mapping[str, Any]]]
                ) -> dict[str, dict[str, list[Any]]]:
  """`{model: {task: {sample_id: score}}}` → `{model: {task: [score by sorted sample id]}}`, the
  input of `bootstrap_report` (as the pipeline stores per-sample scores).

  A score may be a list with one score per preparation replicate, `{sample_id: [s_1, ..., s_R]}`
  (docs/method.md §13): the result is then `[R, n]`, one list per replicate, samples in sorted id
  order. Every such list in the input has the same length R.

  Raises:
    ValueError: two models were scored on different samples of a task (says which, with a few
      of the ids that differ); a task mixing single scores and replicate lists, or replicate
      lists of different lengths (names the model, task and sample).
  """
  ids: dict[str, tuple[str, list[str]]] = {}  # task -> (first model having it, its sample ids)
  first_r: tuple[str, str, str, int] | None = None  # (model, task, sample id, R) of a first list
  out: dict[str, dict[str, list[Any]]] = {}
  for model, row in per_sample.items():
    out[model] = {}
    for task, scores in row.items():
      keys = sorted(scores)
      first, first_keys = ids.setdefault(task, (model, keys))
      if keys != first_keys:
        raise ValueError(_id_disagreement(task, first, first_keys, model, keys))
      values = [scores[k] for k in keys]
      listed = [_is_list(v) for v in values]
      if not any(listed):
        out[model][task] = values
        continue
      where = f"model {model!r}, task {task!r}"
      if not all(listed):
        single, multi = keys[listed.index(False)], keys[listed.index(True)]
        raise ValueError(f"{where}: sample {single!r} has one score but sample {multi!r} a list "
                         "(one score per replicate): give every sample a list of R scores, or "
                         "every sample one score")
      for key, v in zip(keys, values):
        if len(v) == 0:
          raise ValueError(f"{where}, sample {key!r}: empty list of replicate scores")
        if first_r is None:
          first_r = (model, task, key, len(v))
        elif len(v) != first_r[3]:
          m0, t0, k0, r0 = first_r
          raise ValueError(f"{where}, sample {key!r} has {len(v)} replicate scores but model "
                           f"{m0!r}, task {t0!r}, sample {k0!r} has {r0}: every sample of every "
                           "model needs one score per replicate")
      out[model][task] = [[v[r] for v in values] for r in range(first_r[3])]
  return out


def _id_disagreement(task: str, first: str, first_keys: Sequence[str], model: str,
                     keys: Sequence[str]) -> str:
  """Says how two models' sample ids of one task differ (counts and a few examples)."""
  a, b = set(first_keys), set(keys)

  def only(ids: set[str], owner: str) -> str:
    examples = ", ".join(repr(i) for i in sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
    return f"{len(ids)} only in {owner!r} ({examples})"
  parts = [only(x, owner) for x, owner in ((a - b, first), (b - a, model)) if x]
  return (f"models {first!r} and {model!r} disagree on the sample ids of task {task!r}: "
          f"{'; '.join(parts)}; every model must be scored on the same samples")


def _differ(kind: str, ours: Sequence[Any], theirs: Sequence[Any], a: str, b: str) -> str:
  """'...: 2 only in file 0 ('x', 'y'); 1 only in file 1 ('z')', a few examples each."""
  parts = []
  for extra, owner in ((set(ours) - set(theirs), a), (set(theirs) - set(ours), b)):
    if extra:
      examples = sorted(map(str, extra))
      shown = ", ".join(repr(i) for i in examples[:3]) + (", ..." if len(extra) > 3 else "")
      parts.append(f"{len(extra)} only in {owner} ({shown})")
  return f"{a} and {b} disagree on the {kind}: " + "; ".join(parts)


def stack_replicates(files: Sequence[Mapping[str, Mapping[str, Mapping[str, Any]]]],
                     names: Sequence[str] | None = None
                     ) -> dict[str, dict[str, dict[str, list[Any]]]]:
  """Per-sample score files of several replicates → one `{model: {task: {id: [scores]}}}`.

  Each file is `{model: {task: {sample_id: score}}}` from one replicate of the preparation runs
  (the same models, tasks and sample ids in every file); file k's scores become replicate k. A
  file may already hold replicate lists (`{sample_id: [score, ...]}`), which are appended in
  order. Pass the result to `align_by_id`. `names` (e.g. the paths) label the files in messages.

  Raises:
    ValueError: no files, a file that is not a mapping of mappings, or files that disagree on
      the models, a model's tasks or a task's sample ids (names the file index and what differs).
  """
  if isinstance(files, Mapping) or not isinstance(files, Sequence) or not files:
    raise ValueError("stack_replicates needs a non-empty list of per-sample score mappings")
  if names is not None and len(names) != len(files):
    raise ValueError(f"names must label each of the {len(files)} files, got {len(names)}")

  def label(k: int) -> str:
    return f"file {k}" + (f" ({names[k]})" if names is not None else "")

  for k, data in enumerate(files):
    if not isinstance(data, Mapping):
      raise ValueError(f"{label(k)}: expected a mapping {{model: {{task: {{sample_id: score}}}}}}"
                       f", got {type(data).__name__}")
    for model, row in data.items():
      if not isinstance(row, Mapping) or not all(isinstance(v, Mapping) for v in row.values()):
        raise ValueError(f"{label(k)}: model {model!r} must map task -> {{sample_id: score}}")
  ref = files[0]
  for k, data in enumerate(files[1:], start=1):
    if set(data) != set(ref):
      raise ValueError(_differ("models", list(ref), list(data), label(0), label(k)))
    for model, row in ref.items():
      if set(data[model]) != set(row):
        raise ValueError(_differ(f"tasks of model {model!r}", list(row), list(data[model]),
                                 label(0), label(k)))
      for task, scores in row.items():
        if set(data[model][task]) != set(scores):
          raise ValueError(_differ(f"sample ids of model {model!r}, task {task!r}",
                                   list(scores), list(data[model][task]), label(0), label(k)))
  out: dict[str, dict[str, dict[str, list[Any]]]] = {}
  for model, row in ref.items():
    out[model] = {}
    for task, scores in row.items():
      stacked = out[model][task] = {}
      for sample_id in scores:
        values = stacked[sample_id] = []
        for data in files:
          v = data[model][task][sample_id]
          if _is_list(v):
            values.extend(v)
          else:
            values.append(v)
  return out
