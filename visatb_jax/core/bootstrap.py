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

The resamples are computed in float64 numpy (no JAX compilation, so a first call is as fast as
the next); the point values are `balance_report`'s, in JAX's default float dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from visatb_jax.core import balancing as B

__all__ = ["bootstrap_draws", "bootstrap_report", "resample_indices"]

PerSample = Mapping[str, Mapping[str, Sequence[float]]]


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


def _sample_array(values: Any, model: str, task: str) -> np.ndarray:
  """One model's per-sample scores on one task as a finite float64 vector (or ValueError)."""
  where = f"per-sample scores of model {model!r} on task {task!r}"
  if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray,
                                                                          jax.Array)):
    raise ValueError(f"{where} must be a sequence of numbers, got {type(values).__name__}")
  try:
    arr = np.asarray(values)
  except ValueError:  # ragged nesting
    arr = np.asarray(values, dtype=object)
  if arr.ndim != 1:
    raise ValueError(f"{where} must be a flat sequence of numbers, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{where} are empty")
  if arr.dtype.kind not in "iuf":
    # Only when numpy did not read plain numbers: find the first culprit to name it.
    # The caller's own items: numpy would have turned [0.1, "x"] into strings.
    items = list(values) if isinstance(values, Sequence) else arr.tolist()
    for k, v in enumerate(items):
      if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"sample {k} of model {model!r} on task {task!r} is not a number: "
                         f"{v!r}")
  arr = arr.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(arr))
  if bad.size:
    k = int(bad[0])
    raise ValueError(f"sample {k} of model {model!r} on task {task!r} is not finite: {arr[k]} "
                     f"({bad.size} non-finite sample{'s' if bad.size > 1 else ''})")
  return arr


def _check_per_sample(per_sample: PerSample) -> dict[str, dict[str, np.ndarray]]:
  """Validates `{model: {task: samples}}`; every model of a task has the same number of samples."""
  if not isinstance(per_sample, Mapping):
    raise ValueError(f"per_sample must be a mapping {{model: {{task: [scores]}}}}, got "
                     f"{type(per_sample).__name__}")
  out: dict[str, dict[str, np.ndarray]] = {}
  first: dict[str, tuple[str, int]] = {}  # task -> (first model having it, its sample count)
  for model, row in per_sample.items():
    if not isinstance(row, Mapping):
      raise ValueError(f"model {model!r} must map task -> per-sample scores, got "
                       f"{type(row).__name__}")
    out[model] = {}
    for task, values in row.items():
      arr = _sample_array(values, model, task)
      other, n = first.setdefault(task, (model, arr.size))
      if arr.size != n:
        raise ValueError(f"model {model!r} has {arr.size} samples on task {task!r} but model "
                         f"{other!r} has {n}: every model must be scored on the same samples of "
                         "a task, in the same order")
      out[model][task] = arr
  return out


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
  reproduces exactly the indices the report used, e.g. to check it against a plain loop.
  """
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  return dict(_draw(n_samples, resamples, seed))


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
  """How often each sample occurs in each resample: float64 [resamples, n]."""
  rows = indices.shape[0]
  flat = (np.arange(rows)[:, None] * n + indices).ravel()
  return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _models_per_task(plan: Any, form: str) -> dict[str, list[str]]:
  """task -> the models whose score on it balancing needs, tasks in the order of `plan.tasks`."""
  need: dict[str, list[str]] = {}
  for model, unit_ixs in B._required(plan, form, B._BOTH).items():
    for i in unit_ixs:
      for task in plan.members[i]:
        need.setdefault(task, []).append(model)
  return {t: need[t] for t in plan.tasks if t in need}


def _resampled_means(samples: Mapping[str, Mapping[str, np.ndarray]],
                     models: Mapping[str, Sequence[str]], n_samples: Mapping[str, int],
                     resamples: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
  """(model, task) -> its mean score in each resample, float64 [resamples] (paired indices)."""
  means = {}
  for task, indices in _draw(n_samples, resamples, seed):
    n = n_samples[task]
    scores = np.stack([samples[m][task] for m in models[task]])  # [M, n]
    task_means = _counts(indices, n) @ scores.T / n               # [R, M]
    for k, model in enumerate(models[task]):
      means[(model, task)] = task_means[:, k]
  return means


def _unit_table(value: Any, plan: Any, form: str) -> B._Table:
  """The balancing table with a leading resample axis: own [R, N, N], ref/d_num/d_den [R, N].

  `value(model, task)` gives the [R] scores; a group's score is the plain mean of its tasks'.
  """
  def unit(model: str, i: int) -> np.ndarray:
    values = [value(model, t) for t in plan.members[i]]
    return values[0] if len(values) == 1 else np.mean(np.stack(values), axis=0)

  n = len(plan.units)
  own = np.stack([np.stack([unit(B._own_model(form, u), j) for j in range(n)], axis=-1)
                  for u in plan.units], axis=-2)
  ref = np.stack([unit(B._reference_model(form), j) for j in range(n)], axis=-1)
  models = [B._difficulty_models(form, u) for u in plan.units]
  d_num = np.stack([unit(m[0], i) for i, m in enumerate(models)], axis=-1)
  d_den = np.stack([unit(m[1], i) for i, m in enumerate(models)], axis=-1)
  return B._Table(own=own, ref=ref, d_num=d_num, d_den=d_den)


def _gain(table: B._Table) -> np.ndarray:
  """Own-data gain V_u(own_u) − V_u(ref) per unit, [R, N]."""
  return np.diagonal(table.own, axis1=-2, axis2=-1) - table.ref


# ----------------------------------------------------------------------------------------------
# The balancing maths over all resamples at once (numpy float64, masked as with "warn").


def _draws(samples: Mapping[str, Mapping[str, np.ndarray]], plan: Any, form: str,
           temperature: Any, alpha: tuple[float, float, float], dropped: np.ndarray | None,
           resamples: int, seed: int) -> dict[str, Any]:
  """Every resampled quantity as float64 numpy arrays with a leading resample axis."""
  models = _models_per_task(plan, form)
  n_samples = {t: samples[models[t][0]][t].size for t in models}
  means = _resampled_means(samples, models, n_samples, resamples, seed)
  table = _unit_table(lambda m, t: means[(m, t)], plan, form)
  # The masks of on_degenerate="warn", always on (see the module docstring).
  c_valid = B._c_valid(np.diagonal(table.own, axis1=-2, axis2=-1), table.ref, np)
  d_valid = B._d_valid(table.d_num, table.d_den)
  c = B._contributions(table.own, table.ref, c_valid, xp=np)
  d = B._difficulty(table.d_num, table.d_den, d_valid, xp=np)
  c_out, c_in = B._outward_inward(c, dropped, xp=np)
  x = np.stack([c_out, c_in, d], axis=1)  # [R, 3, N]
  if isinstance(temperature, str):
    t, feasible = B.auto_temperature_batch(c_out, c_in, d, alpha=alpha)
  else:
    t, feasible = np.full(resamples, float(temperature)), np.ones(resamples, dtype=bool)
  l_out, l_in, l_d = np.moveaxis(B._np_components(x, t), 1, 0)
  return {
      "units": list(plan.units), "samples": n_samples,
      "C": c, "c_out": c_out, "c_in": c_in, "d": d,
      "lambda_out": l_out, "lambda_in": l_in, "lambda_d": l_d,
      "lambda": alpha[0] * l_out + alpha[1] * l_in + alpha[2] * l_d,
      "temperature": t, "gain": _gain(table),
      "degenerate": ~(c_valid.all(axis=-1) & d_valid.all(axis=-1)),
      "temperature_feasible": feasible,
  }


def bootstrap_draws(per_sample: PerSample, *, tasks: Sequence[str], form: str = "real",
                    temperature: float | str = 0.5,
                    alpha: Sequence[float] = B.DEFAULT_ALPHA,
                    fixed: Mapping[str, float] | None = None,
                    groups: Mapping[str, str] | None = None, drop: Sequence[str] = (),
                    resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
  """The raw resampled values behind `bootstrap_report` (same arguments, no point values).

  Returns:
    A dict of numpy arrays, resamples first: "C" [R, N, N]; "c_out", "c_in", "d",
    "lambda_out", "lambda_in", "lambda_d", "lambda" (per balanced unit) and "gain" [R, N];
    "temperature" [R]; "degenerate" [R] (bool: some denominator was masked) and
    "temperature_feasible" [R] (bool; False where "auto" found no feasible T); plus "units" (the
    N balanced units) and "samples" (task -> n, in the order the indices were drawn).

  Raises:
    ValueError: as `bootstrap_report`, except for the point values' degenerate-data errors.
  """
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  samples = _check_per_sample(per_sample)
  form = B._check_form(form)
  alpha = B.check_alpha(alpha)
  temperature = B.check_temperature(temperature)
  plan = B._resolve(tasks, fixed, groups)
  dropped = B._check_drop(drop, plan)
  # The structural checks (missing models or tasks) of balancing, on the means.
  B._collect(_means(samples), plan, form, B._BOTH)
  return _draws(samples, plan, form, temperature, alpha, dropped, resamples, seed)


# ----------------------------------------------------------------------------------------------
# The report.


def _means(samples: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
  return {m: {t: float(v.mean()) for t, v in row.items()} for m, row in samples.items()}


def _percentiles(x: np.ndarray, level: float) -> np.ndarray:
  """The central `level` percentile interval over the leading axis: [..., 2] = (lo, hi)."""
  tail = 100.0 * (1.0 - level) / 2.0
  return np.moveaxis(np.percentile(x, [tail, 100.0 - tail], axis=0), 0, -1)


def _interval(x: np.ndarray, level: float) -> list[Any]:
  return _percentiles(x, level).tolist()


def bootstrap_report(per_sample: PerSample, *, tasks: Sequence[str], form: str = "real",
                     temperature: float | str = 0.5, alpha: Sequence[float] = B.DEFAULT_ALPHA,
                     fixed: Mapping[str, float] | None = None,
                     groups: Mapping[str, str] | None = None, on_degenerate: str = "error",
                     drop: Sequence[str] = (), resamples: int = 1000, seed: int = 0,
                     level: float = 0.9) -> dict[str, Any]:
  """`balancing.balance_report` on the per-sample means, with paired-bootstrap intervals.

  Args:
    per_sample: `{model_name: {task: sequence of per-sample scores}}`; every model that has a
      task is scored on the same samples, in the same order (the model names of `balancing`).
    tasks, form, temperature, alpha, fixed, groups, on_degenerate, drop: as
      `balancing.balance_report`; `on_degenerate` applies to the point values only (the
      resamples are always masked, see the module docstring), `drop` to both.
    resamples: number of bootstrap resamples R (>= 1).
    seed: seed (>= 0) of the numpy generator that draws the indices (`resample_indices`).
    level: coverage of the percentile intervals, in (0, 1): 0.9 gives the 5th and 95th
      percentiles.

  Returns:
    A JSON-serialisable dict: every key of `balance_report` (the point values, unchanged), plus
    "gain" (unit -> own-data gain V_u(own_u) − V_u(ref) of the means), "intervals" ("C": [lo, hi]
    per entry in the layout of "C"; "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d",
    "gain": unit -> [lo, hi]; "lambda": task -> [lo, hi], [w, w] for fixed tasks, a grouped task
    gets its group's; "temperature": [lo, hi]), "noisy" (the units whose gain interval contains
    0, see `balancing.noisy_units`) and "bootstrap" ("resamples", "seed", "level", "samples":
    task -> n in the order the indices were drawn, "drop": the dropped units,
    "degenerate_resamples": how many resamples needed a degenerate-data mask,
    "infeasible_temperature_resamples": how many had no feasible automatic T).

  Raises:
    ValueError: per-sample lists that are not flat sequences of finite numbers, empty, or of
      different lengths for one task (the message names the model, the task and the sample
      index or lengths); bad resamples/seed/level; and whatever `balance_report` raises on the
      means (missing models or tasks, degenerate data with on_degenerate="error", ...).
  """
  resamples = _check_int(resamples, "resamples", 1)
  seed = _check_int(seed, "seed", 0)
  level = _check_level(level)
  samples = _check_per_sample(per_sample)
  means = _means(samples)
  report = B.balance_report(means, tasks=tasks, form=form, temperature=temperature, alpha=alpha,
                            fixed=fixed, groups=groups, on_degenerate=on_degenerate, drop=drop)
  plan = B._resolve(tasks, fixed, groups)
  dropped = B._check_drop(drop, plan)
  form, alpha = report["form"], tuple(report["alpha"])
  draws = _draws(samples, plan, form, B.check_temperature(temperature), alpha, dropped,
                 resamples, seed)
  units = plan.units
  point_table = _unit_table(lambda m, t: np.array([means[m][t]]), plan, form)
  gain = {u: float(g) for u, g in zip(units, _gain(point_table)[0])}

  def per_unit(key: str) -> dict[str, list[float]]:
    return dict(zip(units, _interval(draws[key], level)))

  unit_lambda = per_unit("lambda")
  unit_of = {t: u for u, members in zip(units, plan.members) for t in members}
  lam = {}
  for task in plan.tasks:
    if task in report["fixed"]:
      w = float(report["fixed"][task])
      lam[task] = [w, w]
    else:
      lam[task] = unit_lambda[unit_of[task]]
  if isinstance(temperature, str):
    t_interval = _interval(draws["temperature"], level)
  else:
    t_interval = [float(report["temperature"])] * 2
  intervals = {"C": _interval(draws["C"], level)}
  intervals.update({k: per_unit(k) for k in ("c_out", "c_in", "d", "lambda_out", "lambda_in",
                                             "lambda_d", "gain")})
  intervals.update({"lambda": lam, "temperature": t_interval})
  return {
      **report,
      "gain": gain,
      "intervals": intervals,
      "noisy": B.noisy_units(intervals["gain"]),
      "bootstrap": {
          "resamples": resamples, "seed": seed, "level": level,
          "samples": dict(draws["samples"]),
          "drop": [] if dropped is None else [u for u, d in zip(units, dropped) if d],
          "degenerate_resamples": int(draws["degenerate"].sum()),
          "infeasible_temperature_resamples": int((~draws["temperature_feasible"]).sum()),
      },
  }


def align_by_id(per_sample: Mapping[str, Mapping[str, Mapping[str, float]]]
                ) -> dict[str, dict[str, list[float]]]:
  """`{model: {task: {sample_id: score}}}` → `{model: {task: [score by sorted sample id]}}`, the
  input of `bootstrap_report` (as the pipeline stores per-sample scores).

  Raises:
    ValueError: two models were scored on different samples of a task (says which, with a few
      of the ids that differ).
  """
  ids: dict[str, tuple[str, list[str]]] = {}  # task -> (first model having it, its sample ids)
  out: dict[str, dict[str, list[float]]] = {}
  for model, row in per_sample.items():
    out[model] = {}
    for task, scores in row.items():
      keys = sorted(scores)
      first, first_keys = ids.setdefault(task, (model, keys))
      if keys != first_keys:
        raise ValueError(_id_disagreement(task, first, first_keys, model, keys))
      out[model][task] = [scores[k] for k in keys]
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
