"""VisATB task balancing: contributions, difficulties and task weights λ (pure JAX).

The maths follows `docs/method.md` (sections 3 to 7). `V_j(m)` is the validation score of model `m` on
task (or group) `j`, higher is better. With N balanced units (tasks, or groups of tasks):

* Inter-task contribution (§3), "real" and "precise" forms::

      C[i→j] = (V_j(i+mini) − V_j(mini)) / (V_j(j+mini) − V_j(mini)),   C[j→j] = 1

  and in the "base" form (§7) the pretrained model is the reference::

      C[i→j] = (V_j(i) − V_j(base)) / (V_j(j) − V_j(base))

  `C_out[i] = mean_{j≠i} C[i→j]` (how much i helps the others) and
  `C_in[i] = mean_{j≠i} C[j→i]` (how much the others help i).
* Intra-task difficulty (§4): "real" `D[i] = 1 − V_i(mini) / V_i(i+mini)`; "precise" and "base"
  `D[i] = 1 − V_i(mini_i) / V_i(i)`.
* Weights (§5): `λ_out = N·softmax(C_out/T)`, `λ_in = N·softmax(−C_in/T)`,
  `λ_D = N·softmax(D/T)` (each averages exactly 1) and `λ = α_out·λ_out + α_in·λ_in + α_D·λ_D`
  with `α_out + α_in + α_D = 1`. `temperature="auto"` picks the lowest T in `AUTO_T_RANGE` that
  keeps every balanced weight within `WEIGHT_BOUNDS` = [0.5, 2] (see `auto_temperature`).
* Fixed-weight tasks (§5) take no part in the balancing and keep their weight; their models and
  scores need not be present.
* Groups (§6): balancing runs over groups. The score of a model on a group is the plain mean of its
  scores on the group's tasks (normalise the scores beforehand if their scales differ), the
  per-group models are named `<group>+mini`, `<group>` and `mini_<group>` (`mini` and `base` are
  shared), and every task gets its group's λ.

Model names in the scores pytree `{model_name: {task: score}}` (the paper's names):

  ========  =======================================================================
  form      models needed (for every balanced unit u)
  ========  =======================================================================
  real      `mini`, `u+mini` (scored on every unit)
  precise   `mini`, `u+mini` (every unit), `u` and `mini_u` (scored on u only)
  base      `base`, `u` (every unit), `mini_u` (scored on u only)
  ========  =======================================================================

Everything is jittable and differentiable in the scores, except `temperature="auto"`, which
searches over T on concrete numbers. Errors: missing models or tasks, too few balanced units, bad
`form`/`alpha`/`temperature`/`on_degenerate` raise `ValueError` always, and so do non-finite
scores whenever the scores are concrete. Under `jax.jit` / `jax.grad` the scores are tracers and
cannot be inspected, so call `validate_scores` on the concrete scores first. Computation uses
JAX's default float dtype (float32 unless `jax_enable_x64` is on).

Degenerate data (docs/method.md §3: never a silent inf/NaN). A denominator is degenerate when it is not
clearly positive: a unit j whose own-data gain V_j(own_j) − V_j(ref) is <=
`MIN_RELATIVE_DENOMINATOR` × max(|V_j(own_j)|, |V_j(ref)|) (it did not, or barely, improve with its
own data), or a difficulty denominator (V_i(i+mini) real, V_i(i) precise/base) that is <=
`MIN_RELATIVE_DENOMINATOR` × |its numerator|. The keyword `on_degenerate` of
`contribution_matrix`, `difficulties`, `compute_lambda`, `balance_report` and `validate_scores`
says what to do:

* "error" (default): raise one `ValueError` naming every such unit with its models and scores.
* "warn": **(choice)** the project's policy for pipelines that must not stop on a small, noisy
  benchmark. A receiver j that did not clearly improve with its own data carries no information
  about how much the others help it, so its column of C is uninformative: C[i→j] = 0 for every
  i ≠ j (C[j→j] stays 1). It then adds 0 to the others' C_out (still a mean over the N − 1 other
  units), and its C_in is 0. A degenerate difficulty denominator gives D[i] = 0. Each degenerate unit is reported by a
  `DegenerateScoresWarning` (a `UserWarning`) worded like the "error" message plus what was set to
  0, and the messages are listed under `balance_report(...)["warnings"]`.

The masks use `jnp.where` on a safe denominator (1 where degenerate), so the values and gradients
stay finite, jit included. Under tracing the masks still apply (computed from the traced values, in
the working dtype, so a score within rounding of the threshold may go either way), but nothing can
be warned and "warnings" is empty: call `validate_scores(..., on_degenerate="warn")` on the
concrete scores to get the messages. With "error" under tracing the formulas run unmasked, as the
values could not be checked.

Noisy own-data gain, `drop` **(choice, beyond the paper)**. Every score V_j(m) is a mean over the
n_j validation samples of unit j, so the own-data gain V_j(own_j) − V_j(ref), the denominator of
column j of C, carries sampling noise. When its bootstrap interval contains 0
(`visatb_jax.core.bootstrap.bootstrap_report`, its "noisy" list, or `noisy_units` on its
intervals) the unit may not really have improved with its own data, and column j of C is a ratio
of noise to noise. `compute_lambda(..., drop=[j, ...])` / `balance_report(..., drop=...)` then
leave such columns out: for a dropped unit j, C[i→j] (i ≠ j) is left out of every C_out mean
(C_out[i] = mean over the non-dropped j ≠ i, 0 if there are none) and C_in[j] = 0; D[j], its row
of C (its contributions to the others) and C itself, reported in full, are unchanged. Unlike
on_degenerate="warn", which zeroes a degenerate column but still averages over N − 1, a dropped
column does not count in the mean. `drop` names balanced units (groups with `groups`); it is a
static mask, so everything stays jittable and differentiable.

λ no further from 1 than the evidence, `spread` **(choice, beyond the paper; docs/method.md
§14)**. N·softmax(x/T) turns any difference in x into a weight ratio, noise included. Given the
bootstrap standard deviation sd_i of each component's deviation from its mean over the units
(`spread`, as `visatb_jax.core.bootstrap.bootstrap_report(..., shrinkage="evidence")` computes
it), each component input x ∈ (C_out, C_in, D) is shrunk toward its mean before the softmax (and
before the "auto" T search), by positive-part shrinkage on its z-score:

    dev_i = x_i − mean(x),   z_i = dev_i / sd_i,   x̃_i = mean(x) + dev_i · max(0, 1 − 1/z_i²)

so a unit whose deviation is within one sd of the mean (|z| <= 1) gets the mean (weight 1 from
that component) and a clear deviation (|z| >> 1) is nearly kept; sd_i = 0 means no shrinkage.
`shrink_toward_mean` is the formula; with `spread=None` (the default) λ is the paper's.

Automatic T at a bound. The lowest feasible T of temperature="auto" puts some final weight on
a bound of `WEIGHT_BOUNDS` (unless it is the bottom of `AUTO_T_RANGE`): the spread of λ is then
set by the bound, however small the differences behind it (with two units, one of them is always
at 0.5 or the other at 2, whatever the data). `compute_lambda` / `balance_report` then issue a
`TemperatureAtBoundWarning`, list the units under "at_bound" and the message under "warnings".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AUTO_T_RANGE", "DEFAULT_ALPHA", "FORMS", "MIN_RELATIVE_DENOMINATOR", "ON_DEGENERATE",
    "WEIGHT_BOUNDS", "DegenerateScoresWarning", "auto_temperature", "balance_report",
    "balanced_units", "check_alpha", "check_temperature", "compute_lambda", "contribution_matrix",
    "auto_temperature_batch", "difficulties", "lambda_components", "lambda_from_components",
    "noisy_units", "outward_inward", "validate_scores", "BOUND_RELATIVE_TOLERANCE",
    "SPREAD_COMPONENTS", "TemperatureAtBoundWarning", "at_bound_message", "shrink_toward_mean",
    "shrinkage_factor", "bound_units",
]

FORMS = ("real", "precise", "base")
DEFAULT_ALPHA = (0.25, 0.25, 0.5)
# docs/method.md §5: the recommended T is the lowest one keeping every final weight within these bounds.
WEIGHT_BOUNDS = (0.5, 2.0)
# Search range of temperature="auto": a log grid of AUTO_GRID_POINTS over it, refined by bisection.
AUTO_T_RANGE = (0.05, 20.0)
AUTO_GRID_POINTS = 128
AUTO_RELATIVE_TOLERANCE = 1e-6
# A contribution or difficulty denominator must exceed this fraction of the magnitude of the scores
# it is made of: a smaller one is noise, and dividing by it would give meaningless huge weights.
MIN_RELATIVE_DENOMINATOR = 1e-4
# What to do about such a denominator: raise, or warn and mask (see the module docstring).
ON_DEGENERATE = ("error", "warn")
# A final weight within this relative distance of a bound of WEIGHT_BOUNDS counts as at the bound.
BOUND_RELATIVE_TOLERANCE = 1e-3
# The λ component inputs that `spread` shrinks, in the order (C_out, C_in, D).
SPREAD_COMPONENTS = ("c_out", "c_in", "d")

Scores = Mapping[str, Mapping[str, Any]]
Array = jax.Array


class DegenerateScoresWarning(UserWarning):
  """A unit's denominator is not clearly positive and on_degenerate="warn" masked it."""


class TemperatureAtBoundWarning(UserWarning):
  """temperature="auto" left a final weight on a bound: the bound, not the data, sets λ's spread."""


# ----------------------------------------------------------------------------------------------
# Argument checks.


def _check_form(form: str) -> str:
  if not isinstance(form, str) or form not in FORMS:
    raise ValueError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
  return form


def check_alpha(alpha: Sequence[float]) -> tuple[float, float, float]:
  """Validates α = (α_out, α_in, α_D): three finite non-negative numbers summing to 1 (±1e-6)."""
  try:
    values = tuple(float(a) for a in alpha)
  except (TypeError, ValueError) as e:
    raise ValueError(f"alpha must be three numbers (α_out, α_in, α_D), got {alpha!r}") from e
  if len(values) != 3:
    raise ValueError(f"alpha must have 3 entries (α_out, α_in, α_D), got {len(values)}: {alpha!r}")
  if not all(math.isfinite(a) and a >= 0 for a in values):
    raise ValueError(f"alpha entries must be finite and >= 0, got {alpha!r}")
  if abs(sum(values) - 1.0) > 1e-6:
    raise ValueError(f"alpha must sum to 1, got {alpha!r} (sum {sum(values):.6g})")
  return values


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _numeric_temperature(temperature: Any) -> Any:
  """Validates a numeric temperature: a finite number > 0 (a traced one is passed through)."""
  if isinstance(temperature, str) or isinstance(temperature, bool):
    raise ValueError(f"temperature must be a number > 0 or 'auto', got {temperature!r}")
  if _is_traced(temperature):
    return temperature
  try:
    t = float(temperature)
  except (TypeError, ValueError) as e:
    raise ValueError(f"temperature must be a number > 0 or 'auto', got {temperature!r}") from e
  if not (math.isfinite(t) and t > 0):
    raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
  return t


def check_temperature(temperature: Any) -> Any:
  """Validates a temperature: 'auto' or a finite number > 0; returns it ('auto' or a float)."""
  if isinstance(temperature, str):
    if temperature != "auto":
      raise ValueError(f"temperature must be a number > 0 or 'auto', got {temperature!r}")
    return temperature
  return _numeric_temperature(temperature)


# ----------------------------------------------------------------------------------------------
# Which units are balanced (structure only, no scores).


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The tasks, the balanced units (tasks or groups) and the tasks each unit stands for."""
  tasks: tuple[str, ...]
  units: tuple[str, ...]
  members: tuple[tuple[str, ...], ...]
  fixed: dict[str, Any]
  groups: dict[str, str] | None
  grouped: bool

  @property
  def kind(self) -> str:
    return "group" if self.grouped else "task"


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  if isinstance(tasks, str) or not isinstance(tasks, Sequence):
    raise ValueError(f"tasks must be a sequence of task names, got {tasks!r}")
  tasks = tuple(tasks)
  for t in tasks:
    if not isinstance(t, str):
      raise ValueError(f"task names must be strings, got {t!r}")
  dupes = sorted({t for t in tasks if tasks.count(t) > 1})
  if dupes:
    raise ValueError(f"tasks contain duplicates: {dupes}")
  return tasks


def _check_fixed(fixed: Mapping[str, float] | None, tasks: tuple[str, ...]) -> dict[str, Any]:
  if fixed is None:
    return {}
  if not isinstance(fixed, Mapping):
    raise ValueError(f"fixed must be a mapping task -> weight, got {fixed!r}")
  out = {}
  for task, weight in fixed.items():
    if task not in tasks:
      raise ValueError(f"fixed task {task!r} is not in tasks {list(tasks)}")
    if not _is_traced(weight):
      try:
        w = float(weight)
      except (TypeError, ValueError) as e:
        raise ValueError(f"fixed weight of task {task!r} must be a number, got {weight!r}") from e
      if isinstance(weight, bool) or not (math.isfinite(w) and w >= 0):
        raise ValueError(f"fixed weight of task {task!r} must be finite and >= 0, got {weight!r}")
      weight = w
    out[task] = weight
  return out


def _check_groups(groups: Mapping[str, str] | None, tasks: tuple[str, ...],
                  fixed: Mapping[str, Any]) -> dict[str, str] | None:
  if groups is None:
    return None
  if not isinstance(groups, Mapping):
    raise ValueError(f"groups must be a mapping task -> group, got {groups!r}")
  for task, group in groups.items():
    if task not in tasks:
      raise ValueError(f"groups names task {task!r} which is not in tasks {list(tasks)}")
    if not isinstance(group, str) or not group:
      raise ValueError(f"group of task {task!r} must be a non-empty string, got {group!r}")
    if task in fixed:
      raise ValueError(f"task {task!r} has a fixed weight and cannot also be in group {group!r}")
  missing = [t for t in tasks if t not in fixed and t not in groups]
  if missing:
    raise ValueError(f"tasks {missing} have no group; with groups, every balanced task needs one")
  return dict(groups)


def _resolve(tasks: Sequence[str], fixed: Mapping[str, float] | None,
             groups: Mapping[str, str] | None) -> _Plan:
  """Checks tasks/fixed/groups and works out the balanced units."""
  tasks = _check_tasks(tasks)
  fixed = _check_fixed(fixed, tasks)
  groups = _check_groups(groups, tasks, fixed)
  balanced = [t for t in tasks if t not in fixed]
  if groups is None:
    units, members = tuple(balanced), tuple((t,) for t in balanced)
  else:
    units = tuple(dict.fromkeys(groups[t] for t in balanced))
    members = tuple(tuple(t for t in balanced if groups[t] == u) for u in units)
  if len(units) < 2:
    kind = "groups" if groups is not None else "tasks"
    raise ValueError(f"balancing needs at least 2 balanced {kind}, got {len(units)}: {list(units)}"
                     + (f" (fixed: {list(fixed)})" if fixed else ""))
  return _Plan(tasks, units, members, fixed, groups, groups is not None)


def balanced_units(tasks: Sequence[str], fixed: Mapping[str, float] | None = None,
                   groups: Mapping[str, str] | None = None) -> list[str]:
  """The units that are balanced: the non-fixed tasks, or their groups in order of appearance.

  Raises:
    ValueError: duplicate tasks, fixed/groups naming unknown tasks, a fixed task in a group, a
      balanced task without a group, bad fixed weights, or fewer than 2 units.
  """
  return list(_resolve(tasks, fixed, groups).units)


# ----------------------------------------------------------------------------------------------
# Looking the scores up.


def _own_model(form: str, unit: str) -> str:
  """The model trained with unit's own (large) data: 'u+mini', or 'u' in the base form."""
  return unit if form == "base" else f"{unit}+mini"


def _reference_model(form: str) -> str:
  return "base" if form == "base" else "mini"


def _difficulty_models(form: str, unit: str) -> tuple[str, str]:
  """(numerator, denominator) models of D[unit] = 1 − V(numerator) / V(denominator)."""
  if form == "real":
    return "mini", f"{unit}+mini"
  return f"mini_{unit}", unit


_BOTH = ("c", "d")


def _required(plan: _Plan, form: str, parts: Sequence[str]) -> dict[str, tuple[int, ...]]:
  """Every model that C ("c") and/or D ("d") need, with the units it must be scored on."""
  everywhere = tuple(range(len(plan.units)))
  need: dict[str, set[int]] = {}
  if "c" in parts:
    need[_reference_model(form)] = set(everywhere)
    for u in plan.units:
      need.setdefault(_own_model(form, u), set()).update(everywhere)
  if "d" in parts:
    for i, u in enumerate(plan.units):
      for model in _difficulty_models(form, u):
        need.setdefault(model, set()).add(i)
  return {m: tuple(sorted(ix)) for m, ix in need.items()}


def _missing_model_message(model: str, form: str, plan: _Plan) -> str:
  """Names the missing model, what needs it and, for a per-task model, the way out."""
  if model in ("mini", "base"):
    return f"missing model {model!r} (form {form!r} needs it for every balanced {plan.kind})"
  unit = next(u for u in plan.units
              if model in (_own_model(form, u),) + _difficulty_models(form, u))
  hint = "" if plan.grouped else "; to exclude that task from balancing, give it a fixed weight"
  return f"missing model {model!r} (form {form!r} needs it for {plan.kind} {unit!r}{hint})"


def _check_scalar(value: Any, model: str, task: str) -> None:
  """A score must be a real scalar and, when concrete, finite."""
  where = f"score of model {model!r} on task {task!r}"
  if _is_traced(value):
    real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    if value.shape != () or not real:
      raise ValueError(f"{where} must be a real scalar, got {value.dtype}{list(value.shape)}")
    return
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001 - anything np cannot read is not a score.
    raise ValueError(f"{where} is not a number: {value!r}") from e
  if arr.shape != () or arr.dtype.kind not in "iuf":
    raise ValueError(f"{where} is not a number: {value!r}")
  if not math.isfinite(float(arr)):
    raise ValueError(f"{where} is not finite: V_{task}({model})={float(arr)}")


def _collect(scores: Scores, plan: _Plan, form: str,
             parts: Sequence[str]) -> dict[tuple[str, int], tuple[Any, ...]]:
  """Looks up every score `parts` need: (model, unit index) -> raw member-task scores."""
  if not isinstance(scores, Mapping):
    raise ValueError(f"scores must be a mapping {{model: {{task: score}}}}, got "
                     f"{type(scores).__name__}")
  required = _required(plan, form, parts)
  for model in required:  # all missing models first: that is the usual mistake.
    if model not in scores:
      raise ValueError(_missing_model_message(model, form, plan))
  raw = {}
  for model, unit_ixs in required.items():
    row = scores[model]
    if not isinstance(row, Mapping):
      raise ValueError(f"model {model!r} must map task -> score, got {type(row).__name__}")
    for i in unit_ixs:
      values = []
      for task in plan.members[i]:
        if task not in row:
          raise ValueError(f"model {model!r} has no score for task {task!r}")
        _check_scalar(row[task], model, task)
        values.append(row[task])
      raw[(model, i)] = tuple(values)
  return raw


def _any_traced(raw: Mapping[Any, tuple[Any, ...]]) -> bool:
  return any(_is_traced(v) for values in raw.values() for v in values)


@dataclasses.dataclass(frozen=True)
class _Table:
  """The unit-level scores of one form, as arrays (jax or numpy float64); None if not needed."""
  own: Any = None     # [N, N]: own[i, j] = V_j(own model of i)
  ref: Any = None     # [N]:    ref[j] = V_j(mini) or V_j(base)
  d_num: Any = None   # [N]:    V_i(mini) (real) or V_i(mini_i)
  d_den: Any = None   # [N]:    V_i(i+mini) (real) or V_i(i)


def _table(raw: Mapping[tuple[str, int], tuple[Any, ...]], plan: _Plan, form: str,
           xp: Any, parts: Sequence[str]) -> _Table:
  """Builds the unit-level score arrays with `xp` (jnp, or np in float64 for the value checks)."""
  if xp is np:
    def unit(values):
      return float(np.mean([float(np.asarray(v)) for v in values]))
    stack = np.array
  else:
    def unit(values):
      vals = [jnp.asarray(v, dtype=float) for v in values]
      # Group score = mean of its tasks' scores (docs/method.md §6).
      return vals[0] if len(vals) == 1 else jnp.mean(jnp.stack(vals))
    stack = jnp.stack
  n = len(plan.units)
  table = {}
  if "c" in parts:
    table["own"] = stack([stack([unit(raw[(_own_model(form, u), j)]) for j in range(n)])
                          for u in plan.units])
    table["ref"] = stack([unit(raw[(_reference_model(form), j)]) for j in range(n)])
  if "d" in parts:
    models = [_difficulty_models(form, u) for u in plan.units]
    table["d_num"] = stack([unit(raw[(m[0], i)]) for i, m in enumerate(models)])
    table["d_den"] = stack([unit(raw[(m[1], i)]) for i, m in enumerate(models)])
  return _Table(**table)


def _c_valid(own_diag: Any, ref: Any, xp: Any) -> Any:
  """Per receiver j: is the own-data gain V_j(own_j) − V_j(ref) clearly positive?

  Clearly positive means above `MIN_RELATIVE_DENOMINATOR` × the larger of |V_j(own_j)|, |V_j(ref)|
  (a gain <= 0 always fails, since that bound is >= 0).
  """
  bound = MIN_RELATIVE_DENOMINATOR * xp.maximum(xp.abs(own_diag), xp.abs(ref))
  return (own_diag - ref) > bound


def _d_valid(num: Any, den: Any) -> Any:
  """Per unit i: is the difficulty denominator > 0 and not too close to 0 next to the numerator?"""
  return den > MIN_RELATIVE_DENOMINATOR * abs(num)


def _value_problems(t: _Table, plan: _Plan, form: str) -> list[tuple[str, int, str]]:
  """Degenerate denominators of a concrete (numpy) table as ("c" | "d", unit index, message).

  The messages name the unit, the models and their scores; which units fail is decided by
  `_c_valid` / `_d_valid`, the same tests that make the masks of on_degenerate="warn".
  """
  problems = []
  ref_model = _reference_model(form)
  over = " over 'base'" if form == "base" else ""
  if t.own is not None:
    valid = _c_valid(np.diagonal(t.own), t.ref, np)
    for j, u in enumerate(plan.units):
      if valid[j]:
        continue
      a, b = float(t.own[j, j]), float(t.ref[j])
      own = _own_model(form, u)
      if a - b <= 0:
        message = (f"{plan.kind} {u!r} did not improve{over} with its own data: "
                   f"V_{u}({own})={a:.6g} <= V_{u}({ref_model})={b:.6g}")
      else:
        message = (f"{plan.kind} {u!r} barely improved{over} with its own data: "
                   f"V_{u}({own})={a:.6g} - V_{u}({ref_model})={b:.6g} = {a - b:.3g} is "
                   f"within {MIN_RELATIVE_DENOMINATOR:g}×|V| of 0")
      problems.append(("c", j, message))
  if t.d_den is not None:
    valid = _d_valid(t.d_num, t.d_den)
    for i, u in enumerate(plan.units):
      if valid[i]:
        continue
      num_model, den_model = _difficulty_models(form, u)
      num, den = float(t.d_num[i]), float(t.d_den[i])
      if den <= 0:
        message = (f"difficulty of {plan.kind} {u!r} needs V_{u}({den_model}) > 0, "
                   f"got V_{u}({den_model})={den:.6g}")
      else:
        message = (f"difficulty of {plan.kind} {u!r}: V_{u}({den_model})={den:.6g} is too "
                   f"close to 0 next to V_{u}({num_model})={num:.6g}")
      problems.append(("d", i, message))
  return problems


def _warn_suffix(part: str, unit: str) -> str:
  """What on_degenerate="warn" does about a degenerate unit, appended to its message."""
  if part == "c":
    return f"; C[i→{unit}] set to 0 for every other i (on_degenerate='warn')"
  return f"; D[{unit}] set to 0 (on_degenerate='warn')"


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """The jax score arrays, the validity masks and the warning messages of one computation.

  `c_valid` [N] / `d_valid` [N] are boolean masks (True: usable denominator), or None where the
  formulas run unmasked (on_degenerate="error", where concrete scores have already been checked).
  """
  table: _Table
  c_valid: Any
  d_valid: Any
  warnings: tuple[str, ...]


def _check_on_degenerate(on_degenerate: str) -> str:
  if not isinstance(on_degenerate, str) or on_degenerate not in ON_DEGENERATE:
    raise ValueError(f"unknown on_degenerate {on_degenerate!r}; expected one of "
                     f"{', '.join(ON_DEGENERATE)}")
  return on_degenerate


def _prepare(scores: Scores, plan: _Plan, form: str, on_degenerate: str,
             parts: Sequence[str] = _BOTH, stacklevel: int = 1) -> _Prepared:
  """Structural and (when concrete) value checks, then the jax score arrays C and/or D need.

  With on_degenerate="error", value problems raise one `ValueError` listing them all. With "warn"
  each one is issued as a `DegenerateScoresWarning` and its denominator is masked; under tracing
  the masks are computed from the traced values and nothing is warned. `stacklevel` is counted
  as in `warnings.warn` from the caller of `_prepare` (2: that caller's caller).
  """
  raw = _collect(scores, plan, form, parts)
  warn = on_degenerate == "warn"
  if _any_traced(raw):
    table = _table(raw, plan, form, jnp, parts)
    c_valid = d_valid = None
    if warn and table.own is not None:
      c_valid = _c_valid(jnp.diagonal(table.own), table.ref, jnp)
    if warn and table.d_den is not None:
      d_valid = _d_valid(table.d_num, table.d_den)
    return _Prepared(table, c_valid, d_valid, ())
  table = _table(raw, plan, form, np, parts)
  problems = _value_problems(table, plan, form)
  if problems and not warn:
    raise ValueError("; ".join(message for _, _, message in problems))
  messages = tuple(message + _warn_suffix(part, plan.units[k]) for part, k, message in problems)
  for message in messages:
    warnings.warn(message, DegenerateScoresWarning, stacklevel=stacklevel + 1)
  c_valid = d_valid = None
  if warn and table.own is not None:
    c_valid = jnp.asarray(_c_valid(np.diagonal(table.own), table.ref, np))
  if warn and table.d_den is not None:
    d_valid = jnp.asarray(_d_valid(table.d_num, table.d_den))
  # One transfer per array instead of one per score.
  table = _Table(**{k: None if v is None else jnp.asarray(v, dtype=float)
                    for k, v in dataclasses.asdict(table).items()})
  return _Prepared(table, c_valid, d_valid, messages)


def validate_scores(scores: Scores, tasks: Sequence[str], form: str = "real",
                    fixed: Mapping[str, float] | None = None,
                    groups: Mapping[str, str] | None = None, *,
                    on_degenerate: str = "error") -> list[str]:
  """Checks scores for `compute_lambda`; raises `ValueError` for anything it cannot balance.

  Structural problems (missing model or task score, fewer than 2 balanced units, bad
  form/fixed/groups/on_degenerate) always raise; value problems only show when the scores are
  concrete: non-finite scores always raise, degenerate denominators (a unit that did not clearly
  improve with its own data, a non-positive or near-zero difficulty denominator) raise with
  `on_degenerate="error"` and are warned (`DegenerateScoresWarning`) with "warn". Call it before
  `jax.jit`, where the scores are traced.

  Returns:
    The degenerate-data messages that were warned ([] with "error", or when traced).
  """
  on_degenerate = _check_on_degenerate(on_degenerate)
  prepared = _prepare(scores, _resolve(tasks, fixed, groups), _check_form(form), on_degenerate,
                      stacklevel=2)
  return list(prepared.warnings)


# ----------------------------------------------------------------------------------------------
# The formulas (docs/method.md §3–5).


def _contributions(own: Array, ref: Array, valid: Array | None = None, xp: Any = jnp) -> Array:
  """C[i, j] = (own[i, j] − ref[j]) / (own[j, j] − ref[j]), with C[j, j] = 1 exactly.

  With a `valid` mask [N], a receiver j with valid[j] False gets C[i, j] = 0 for i ≠ j; its
  denominator is replaced by 1 before dividing, so that neither the values nor the gradients of
  the branch not taken hold inf/NaN. Leading batch axes are allowed (own [..., N, N], ref and
  valid [..., N]), and `xp` may be numpy (the bootstrap runs these formulas in float64 numpy).
  """
  gain = own - ref[..., None, :]
  den = xp.diagonal(gain, axis1=-2, axis2=-1)
  if valid is None:
    c = gain / den[..., None, :]
  else:
    safe = xp.where(valid, den, xp.ones_like(den))
    c = xp.where(valid[..., None, :], gain / safe[..., None, :], xp.zeros_like(gain))
  # x / x is 1 already; `where` makes it exact and keeps its gradient exactly 0.
  return xp.where(xp.eye(own.shape[-1], dtype=bool), xp.ones_like(c), c)


def _difficulty(num: Array, den: Array, valid: Array | None = None, xp: Any = jnp) -> Array:
  """D = 1 − num / den; with a `valid` mask, D = 0 where it is False (safe denominator as in C).

  Elementwise: any leading batch axes, `xp` jnp or numpy as in `_contributions`.
  """
  if valid is None:
    return 1.0 - num / den
  safe = xp.where(valid, den, xp.ones_like(den))
  return xp.where(valid, 1.0 - num / safe, xp.zeros_like(num))


def contribution_matrix(scores: Scores, tasks: Sequence[str], form: str = "real", *,
                        groups: Mapping[str, str] | None = None,
                        on_degenerate: str = "error") -> Array:
  """The N×N inter-task contribution matrix, C[i, j] = C[i→j] (row = contributor).

  Rows and columns follow `tasks` (or the groups in order of first appearance when `groups` is
  given). "real"/"precise" use models `mini` and `<i>+mini`, "base" uses `base` and `<i>`.
  `on_degenerate`: "error" raises for a receiver that did not clearly improve with its own data;
  "warn" warns and sets its column to 0 off the diagonal (see the module docstring).
  """
  on_degenerate = _check_on_degenerate(on_degenerate)
  p = _prepare(scores, _resolve(tasks, None, groups), _check_form(form), on_degenerate, ("c",),
               stacklevel=2)
  return _contributions(p.table.own, p.table.ref, p.c_valid)


def difficulties(scores: Scores, tasks: Sequence[str], form: str = "real", *,
                 groups: Mapping[str, str] | None = None,
                 on_degenerate: str = "error") -> Array:
  """Intra-task difficulty D [N]: real 1 − V_i(mini)/V_i(i+mini), else 1 − V_i(mini_i)/V_i(i).

  `on_degenerate`: "error" raises for a denominator that is not clearly positive; "warn" warns
  and sets that D[i] to 0.
  """
  on_degenerate = _check_on_degenerate(on_degenerate)
  p = _prepare(scores, _resolve(tasks, None, groups), _check_form(form), on_degenerate, ("d",),
               stacklevel=2)
  return _difficulty(p.table.d_num, p.table.d_den, p.d_valid)


def outward_inward(c: Array, *, dropped: Any = None) -> tuple[Array, Array]:
  """(C_out, C_in): C_out[i] = mean_{j≠i} C[i, j], C_in[i] = mean_{j≠i} C[j, i].

  `dropped`: optional boolean [N], True for the units whose column is left out (see `drop` in
  the module docstring): C_out[i] averages only over the non-dropped j ≠ i (0 if none is left)
  and a dropped unit's C_in is 0.
  """
  c = jnp.asarray(c)
  if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
    raise ValueError(f"C must be a square matrix of size >= 2, got shape {c.shape}")
  if dropped is not None:
    dropped = jnp.asarray(dropped, dtype=bool)
    if dropped.shape != c.shape[:1]:
      raise ValueError(f"dropped must be a boolean vector of length {c.shape[0]}, got shape "
                       f"{dropped.shape}")
  return _outward_inward(c, dropped)


def _outward_inward(c: Array, dropped: Array | None = None,
                    xp: Any = jnp) -> tuple[Array, Array]:
  """`outward_inward` without checks; C may have leading batch axes ([..., N, N]), `xp` numpy."""
  n = c.shape[-1]
  off = xp.where(xp.eye(n, dtype=bool), xp.zeros_like(c), c)
  if dropped is None:
    return off.sum(axis=-1) / (n - 1), off.sum(axis=-2) / (n - 1)
  kept = ~dropped
  # Number of kept receivers j ≠ i for each contributor i; max(·, 1) keeps 0/0 out (the sum is
  # 0 then, so C_out[i] = 0).
  count = kept.sum() - kept.astype(int)
  c_out = xp.where(kept, off, xp.zeros_like(off)).sum(axis=-1)
  c_out = c_out / xp.maximum(count, 1).astype(c_out.dtype)
  c_in = off.sum(axis=-2) / (n - 1)
  return c_out, xp.where(kept, c_in, xp.zeros_like(c_in))


def _check_vectors(*vectors: Any, xp: Any = jnp) -> tuple[Any, ...]:
  """c_out, c_in, d as `xp` arrays, checked to be 1-D, non-empty and of one length."""
  arrays = tuple(xp.asarray(v) if xp is jnp else xp.asarray(v, dtype=np.float64)
                 for v in vectors)
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or arrays[0].ndim != 1 or arrays[0].shape[0] < 1:
    raise ValueError(f"c_out, c_in and d must be 1-D of the same length, got "
                     f"{[a.shape for a in arrays]}")
  return arrays


def lambda_components(c_out: Array, c_in: Array, d: Array, *,
                      temperature: float) -> tuple[Array, Array, Array]:
  """(λ_out, λ_in, λ_D) = N·softmax(C_out/T), N·softmax(−C_in/T), N·softmax(D/T)."""
  t = _numeric_temperature(temperature)
  c_out, c_in, d = _check_vectors(c_out, c_in, d)
  n = c_out.shape[0]
  return (n * jax.nn.softmax(c_out / t), n * jax.nn.softmax(-c_in / t),
          n * jax.nn.softmax(d / t))


def lambda_from_components(c_out: Array, c_in: Array, d: Array, *, temperature: float,
                           alpha: Sequence[float] = DEFAULT_ALPHA) -> Array:
  """Final λ = α_out·λ_out + α_in·λ_in + α_D·λ_D (docs/method.md §5); α must sum to 1."""
  a_out, a_in, a_d = check_alpha(alpha)
  l_out, l_in, l_d = lambda_components(c_out, c_in, d, temperature=temperature)
  return a_out * l_out + a_in * l_in + a_d * l_d


# ----------------------------------------------------------------------------------------------
# Shrinkage toward the mean (docs/method.md §14).


def _shrink(x: Any, sd: Any, xp: Any = jnp) -> tuple[Any, Any]:
  """(x̃, factor) of positive-part shrinkage of x [..., N] toward its mean over the last axis.

  factor = max(0, 1 − sd²/dev²) = max(0, 1 − 1/z²), 1 where sd = 0 (no evidence of noise: no
  shrinkage) and 0 where dev = 0 < sd. The divisions use a safe denominator (1 where dev = 0), so
  neither the values nor the gradients of the branch not taken hold inf/NaN. x̃ is x itself where
  the factor is 1 and the mean itself where it is 0, exactly. `sd` broadcasts against x; `xp`
  may be numpy (the bootstrap shrinks every resample at once in float64).
  """
  # The mean over the units with evidence (finite sd): a unit without any (sd = inf) is put at
  # the others' mean, not at a mean that its own uninformative value pulls.
  sd = xp.broadcast_to(sd, x.shape)
  w = xp.isfinite(sd).astype(x.dtype)
  n = w.sum(axis=-1, keepdims=True)
  mean = xp.where(n > 0, (x * w).sum(axis=-1, keepdims=True) / xp.where(n > 0, n, 1.0),
                  x.mean(axis=-1, keepdims=True))
  dev = x - mean
  dev2, sd2 = dev * dev, sd * sd
  nonzero = dev2 > 0
  ratio = sd2 / xp.where(nonzero, dev2, xp.ones_like(dev2))
  factor = xp.where(nonzero, xp.maximum(1.0 - ratio, 0.0), xp.zeros_like(ratio))
  factor = xp.where(sd2 > 0, factor, xp.ones_like(factor))
  shrunk = xp.where(factor == 0, xp.broadcast_to(mean, dev.shape), x - dev * (1.0 - factor))
  return shrunk, factor


def _check_sd(x: Array, sd: Any) -> Array:
  sd = jnp.asarray(sd, dtype=x.dtype)
  try:
    jnp.broadcast_shapes(sd.shape, x.shape)
  except ValueError:
    raise ValueError(f"sd of shape {sd.shape} does not broadcast against x of shape "
                     f"{x.shape}") from None
  # +inf is allowed: no evidence at all, the mean (bootstrap's rule for a noisy own-data gain).
  if not _is_traced(sd) and not bool(jnp.all(~jnp.isnan(sd) & (sd >= 0))):
    raise ValueError(f"sd must be >= 0 (or inf), got {np.asarray(sd).tolist()}")
  return sd


def shrink_toward_mean(x: Any, sd: Any) -> Array:
  """Positive-part shrinkage of x [..., N] toward its mean over units (the last axis).

  x̃_i = mean(x) + (x_i − mean(x))·max(0, 1 − 1/z_i²), z_i = (x_i − mean(x))/sd_i
  (docs/method.md §14): |z| <= 1 gives the mean, |z| → ∞ gives x_i, sd_i = 0 gives x_i (no
  shrinkage), sd_i = inf gives the mean of the units with a finite sd (no evidence at all; the
  mean is then taken over those units alone). `sd` ([..., N], or anything broadcasting to x) is the standard deviation of
  x_i − mean(x), e.g. from the bootstrap. Pure, jittable and differentiable (finite gradients
  everywhere; `jnp.where` on safe denominators). The mean of x̃ is in general not that of x.

  Raises:
    ValueError: sd does not broadcast against x, or (when concrete) is negative or NaN.
  """
  x = jnp.asarray(x, dtype=float) if not _is_traced(x) else x
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"x must have at least one unit (last axis), got shape {x.shape}")
  return _shrink(x, _check_sd(x, sd))[0]


def shrinkage_factor(x: Any, sd: Any) -> Array:
  """max(0, 1 − 1/z²) of `shrink_toward_mean` per unit: 1 keeps x_i, 0 replaces it by the mean."""
  x = jnp.asarray(x, dtype=float) if not _is_traced(x) else x
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"x must have at least one unit (last axis), got shape {x.shape}")
  return _shrink(x, _check_sd(x, sd))[1]


def _check_spread(spread: Any, plan: _Plan) -> tuple[Any, Any, Any] | None:
  """`spread` as three sd vectors [N] (C_out, C_in, D) in unit order, or None.

  Each of "c_out", "c_in", "d" maps unit -> sd (exactly the balanced units) or is a sequence /
  array of N values in unit order; concrete values must be finite and >= 0.
  """
  if spread is None:
    return None
  if not isinstance(spread, Mapping):
    raise ValueError(f"spread must map each of {list(SPREAD_COMPONENTS)} to the sd of its units, "
                     f"got {type(spread).__name__}")
  keys = set(spread)
  if keys != set(SPREAD_COMPONENTS):
    raise ValueError(f"spread must have exactly the keys {list(SPREAD_COMPONENTS)}, got "
                     f"{sorted(map(str, keys))}")
  n = len(plan.units)
  out = []
  for comp in SPREAD_COMPONENTS:
    value = spread[comp]
    if isinstance(value, Mapping):
      missing = [u for u in plan.units if u not in value]
      extra = [u for u in value if u not in plan.units]
      if missing or extra:
        raise ValueError(f"spread[{comp!r}] must name exactly the balanced {plan.kind}s "
                         f"{list(plan.units)}" + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {extra}" if extra else ""))
      values = [value[u] for u in plan.units]
      if any(_is_traced(v) for v in values):
        vec = jnp.stack([jnp.asarray(v, dtype=float) for v in values])
      else:
        vec = np.asarray(values)
    elif isinstance(value, (list, tuple)) and any(_is_traced(v) for v in value):
      vec = jnp.stack([jnp.asarray(v, dtype=float) for v in value])
    else:
      vec = value
    if not _is_traced(vec):
      try:
        arr = np.asarray(vec, dtype=np.float64)
      except (TypeError, ValueError):
        raise ValueError(f"spread[{comp!r}] must hold {n} numbers, got {value!r}") from None
      if arr.shape != (n,):
        raise ValueError(f"spread[{comp!r}] must hold one sd per balanced {plan.kind} ({n}), "
                         f"got shape {arr.shape}")
      bad = [u for u, v in zip(plan.units, arr) if not v >= 0]  # NaN fails; +inf is the mean
      if bad:
        raise ValueError(f"spread[{comp!r}] must be >= 0 (or inf), got "
                         + ", ".join(f"{u}={arr[plan.units.index(u)]}" for u in bad))
      vec = jnp.asarray(arr, dtype=float)
    elif vec.shape != (n,):
      raise ValueError(f"spread[{comp!r}] must hold one sd per balanced {plan.kind} ({n}), got "
                       f"shape {vec.shape}")
    out.append(vec)
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Automatic temperature.


def _np_components(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """(λ_out, λ_in, λ_D) [R, 3, N] in float64 numpy from x [R, 3, N] = (C_out, C_in, D), T [R].

  The formulas of `lambda_components`, for R rows at once.
  """
  sign = np.array([1.0, -1.0, 1.0])
  z = sign[:, None] * x / t[:, None, None]
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return x.shape[-1] * z / z.sum(axis=-1, keepdims=True)


def _np_weights(x: np.ndarray, t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Final weights λ [R, N] in float64 from x [R, 3, N] = (C_out, C_in, D) and T [R]."""
  components = _np_components(x, t)
  # Written out (not `alpha @ components`) so that every row is computed by the same operations.
  return alpha[0] * components[:, 0] + alpha[1] * components[:, 1] + alpha[2] * components[:, 2]


def _auto_search(x: np.ndarray, alpha: np.ndarray, t_range: tuple[float, float],
                 bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """The search of `auto_temperature` for R rows at once: (T [R], feasible [R]).

  Row by row it takes exactly the steps of a scalar search: the first feasible point of the log
  grid, then bisection (in log scale) of the step before it until its relative width is at most
  `AUTO_RELATIVE_TOLERANCE`. Rows with no feasible grid point get T = t_range[1] and False.
  The loops run over the grid points and the bisection steps, never over the rows.
  """
  t_lo, t_hi = t_range
  w_lo, w_hi = bounds
  rows = x.shape[0]

  def feasible(ix: np.ndarray, t: np.ndarray) -> np.ndarray:
    w = _np_weights(x[ix], t, alpha)
    return np.all((w >= w_lo) & (w <= w_hi), axis=-1)

  grid = np.geomspace(t_lo, t_hi, AUTO_GRID_POINTS)
  first = np.full(rows, -1)  # index of the first feasible grid point, -1 while none
  for k, t in enumerate(grid):
    todo = np.flatnonzero(first < 0)
    if todo.size == 0:
      break
    ok = feasible(todo, np.full(todo.size, float(t)))
    first[todo[ok]] = k
  found = first >= 0
  out = np.full(rows, float(t_hi))
  out[found & (first == 0)] = t_lo
  bisect = np.flatnonzero(found & (first > 0))
  lo, hi = grid[first[bisect] - 1].astype(np.float64), grid[first[bisect]].astype(np.float64)
  # Invariant: lo infeasible, hi feasible.
  active = hi - lo > AUTO_RELATIVE_TOLERANCE * hi
  while active.any():
    ix = np.flatnonzero(active)
    mid = np.sqrt(lo[ix] * hi[ix])
    ok = feasible(bisect[ix], mid)
    hi[ix[ok]] = mid[ok]
    lo[ix[~ok]] = mid[~ok]
    active[ix] = hi[ix] - lo[ix] > AUTO_RELATIVE_TOLERANCE * hi[ix]
  out[bisect] = hi
  return out, found


def _check_t_range(t_range: tuple[float, float]) -> tuple[float, float]:
  t_lo, t_hi = (float(v) for v in t_range)
  if not (0 < t_lo < t_hi and math.isfinite(t_hi)):
    raise ValueError(f"t_range must satisfy 0 < low < high < inf, got {t_range!r}")
  return t_lo, t_hi


def auto_temperature(c_out: Any, c_in: Any, d: Any, *, alpha: Sequence[float] = DEFAULT_ALPHA,
                     t_range: tuple[float, float] = AUTO_T_RANGE,
                     bounds: tuple[float, float] = WEIGHT_BOUNDS) -> float:
  """The lowest T in `t_range` for which every final weight lies within `bounds`.

  A log grid of `AUTO_GRID_POINTS` temperatures over `t_range` finds the first feasible one; the
  step from the last infeasible grid point is then refined by bisection to a relative tolerance of
  `AUTO_RELATIVE_TOLERANCE` (a feasible pocket narrower than one grid step, ~5 %, can be missed).
  Returns `t_range[0]` when that is already feasible. Needs concrete values (not jittable); the
  search runs in float64, so float32 weights at the returned T may exceed a bound by rounding.
  `auto_temperature_batch` runs the same search for many rows at once.

  Raises:
    ValueError: no T in `t_range` is feasible, or the inputs are traced.
  """
  a = np.asarray(check_alpha(alpha), dtype=np.float64)
  if any(_is_traced(v) for v in (c_out, c_in, d)):
    raise ValueError("temperature='auto' needs concrete scores (it is not jittable): pick T "
                     "eagerly (balance_report(...)['temperature']) and pass the number")
  x = np.stack(_check_vectors(c_out, c_in, d, xp=np))[None]
  t_lo, t_hi = _check_t_range(t_range)
  t, found = _auto_search(x, a, (t_lo, t_hi), bounds)
  if not found[0]:
    w = _np_weights(x, np.array([t_hi]), a)
    w_lo, w_hi = bounds
    raise ValueError(
        f"temperature='auto': no T in [{t_lo:g}, {t_hi:g}] keeps every weight within "
        f"[{w_lo:g}, {w_hi:g}] (at T={t_hi:g} they range over [{w.min():.4g}, {w.max():.4g}]); "
        "the contributions/difficulties are too spread: check the scores or pass a temperature")
  return float(t[0])


def auto_temperature_batch(c_out: Any, c_in: Any, d: Any, *,
                           alpha: Sequence[float] = DEFAULT_ALPHA,
                           t_range: tuple[float, float] = AUTO_T_RANGE,
                           bounds: tuple[float, float] = WEIGHT_BOUNDS
                           ) -> tuple[np.ndarray, np.ndarray]:
  """`auto_temperature` for each row of [R, N] arrays at once, without raising.

  Returns:
    (T [R] float64, feasible [R] bool): row r's T is what `auto_temperature` returns for row r;
    where no T in `t_range` is feasible, feasible is False and T = t_range[1] (the flattest
    weights the range allows) instead of an error.
  """
  a = np.asarray(check_alpha(alpha), dtype=np.float64)
  x = np.stack([np.asarray(v, dtype=np.float64) for v in (c_out, c_in, d)], axis=1)
  if x.ndim != 3 or x.shape[0] < 1 or x.shape[2] < 1:
    raise ValueError(f"c_out, c_in and d must be [R, N] arrays of one shape, got "
                     f"{[np.shape(v) for v in (c_out, c_in, d)]}")
  return _auto_search(x, a, _check_t_range(t_range), bounds)


# ----------------------------------------------------------------------------------------------
# Public entry points.


@dataclasses.dataclass(frozen=True)
class _Balance:
  plan: _Plan
  form: str
  alpha: tuple[float, float, float]
  temperature: Any
  c: Array
  c_out: Array
  c_in: Array
  d: Array
  l_out: Array
  l_in: Array
  l_d: Array
  lam: Array
  warnings: tuple[str, ...]
  # With `spread`: the shrunk (C_out, C_in, D) and their shrinkage factors; else None.
  shrunk: tuple[Array, Array, Array] | None = None
  factors: tuple[Array, Array, Array] | None = None
  at_bound: tuple[str, ...] = ()


def _check_drop(drop: Sequence[str], plan: _Plan) -> np.ndarray | None:
  """The `drop` names as a boolean mask over the balanced units (None when nothing is dropped)."""
  if isinstance(drop, (str, bytes)) or not isinstance(drop, Iterable):
    raise ValueError(f"drop must be a sequence of balanced {plan.kind} names, got {drop!r}")
  names = list(drop)
  bad = [u for u in names if not isinstance(u, str)]
  if bad:
    raise ValueError(f"drop must name balanced {plan.kind}s (strings), got {bad!r}")
  unknown = [u for u in dict.fromkeys(names) if u not in plan.units]
  if unknown:
    raise ValueError(f"drop names {unknown}, which are not balanced {plan.kind}s "
                     f"{list(plan.units)}")
  mask = np.array([u in names for u in plan.units])
  return mask if mask.any() else None


def noisy_units(intervals_gain: Mapping[str, Sequence[float]]) -> list[str]:
  """The units whose own-data gain interval [lo, hi] contains 0 (lo <= 0 <= hi), in order.

  `intervals_gain` is `bootstrap_report(...)["intervals"]["gain"]`; the result is what to pass as
  `drop` (see "Noisy own-data gain" in the module docstring).

  Raises:
    ValueError: an interval that is not two finite numbers lo <= hi.
  """
  noisy = []
  for unit, interval in intervals_gain.items():
    try:
      lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError) as e:
      raise ValueError(f"gain interval of {unit!r} must be [lo, hi], got {interval!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
      raise ValueError(f"gain interval of {unit!r} must be finite with lo <= hi, got "
                       f"{interval!r}")
    if lo <= 0 <= hi:
      noisy.append(unit)
  return noisy


def bound_units(weights: Any, units: Sequence[str],
                bounds: tuple[float, float] = WEIGHT_BOUNDS) -> list[str]:
  """The units whose weight lies on a bound (within `BOUND_RELATIVE_TOLERANCE` relative)."""
  w = np.asarray(weights, dtype=np.float64)
  lo, hi = bounds
  tol = BOUND_RELATIVE_TOLERANCE
  at = (np.abs(w - lo) <= tol * abs(lo)) | (np.abs(w - hi) <= tol * abs(hi))
  return [u for u, a in zip(units, at) if a]


def at_bound_message(units: Sequence[str], weights: Sequence[float], temperature: float,
                     kind: str = "task") -> str:
  """The `TemperatureAtBoundWarning` text: which units are on a bound, at which T, what to do."""
  lo, hi = WEIGHT_BOUNDS
  which = ", ".join(f"{u!r} ({w:.4g})" for u, w in zip(units, weights))
  return (f"temperature='auto' chose T={temperature:.4g}, which puts the weight of {kind}"
          f"{'s' if len(units) > 1 else ''} {which} on a bound of [{lo:g}, {hi:g}]: the spread "
          "of λ is then set by the bound, not by the size of the differences in C and D; for "
          "weights that follow the evidence, pass a fixed temperature (the paper's 0.5 or 1.0) "
          "with shrinkage='evidence' (bootstrap_report, docs/method.md §14)")


def _balance(scores: Scores, tasks: Sequence[str], form: str, temperature: Any,
             alpha: Sequence[float], fixed: Mapping[str, float] | None,
             groups: Mapping[str, str] | None, on_degenerate: str,
             drop: Sequence[str] = (), spread: Any = None) -> _Balance:
  form = _check_form(form)
  alpha = check_alpha(alpha)
  check_temperature(temperature)
  on_degenerate = _check_on_degenerate(on_degenerate)
  plan = _resolve(tasks, fixed, groups)
  dropped = _check_drop(drop, plan)
  sds = _check_spread(spread, plan)
  # Warnings point at the caller of compute_lambda / balance_report.
  p = _prepare(scores, plan, form, on_degenerate, stacklevel=3)
  c = _contributions(p.table.own, p.table.ref, p.c_valid)
  d = _difficulty(p.table.d_num, p.table.d_den, p.d_valid)
  c_out, c_in = outward_inward(c, dropped=dropped)
  inputs, shrunk, factors = (c_out, c_in, d), None, None
  if sds is not None:
    pairs = [_shrink(x, sd.astype(x.dtype)) for x, sd in zip(inputs, sds)]
    shrunk = tuple(x for x, _ in pairs)
    factors = tuple(f for _, f in pairs)
    inputs = shrunk
  auto = isinstance(temperature, str)
  if auto:
    temperature = auto_temperature(*inputs, alpha=alpha)
  l_out, l_in, l_d = lambda_components(*inputs, temperature=temperature)
  lam = alpha[0] * l_out + alpha[1] * l_in + alpha[2] * l_d
  messages, at_bound = p.warnings, ()
  if auto:  # "auto" needs concrete values, so lam is concrete here.
    at_bound = tuple(bound_units(lam, plan.units))
    if at_bound:
      weights = [float(lam[plan.units.index(u)]) for u in at_bound]
      message = at_bound_message(at_bound, weights, temperature, plan.kind)
      warnings.warn(message, TemperatureAtBoundWarning, stacklevel=3)
      messages = messages + (message,)
  return _Balance(plan, form, alpha, temperature, c, c_out, c_in, d, l_out, l_in, l_d, lam,
                  messages, shrunk, factors, at_bound)


def _out(x: Any, traced: bool) -> Any:
  """A python float when concrete, the 0-d jax array itself when traced.

  A float32 value becomes the shortest decimal that reads back as the same float32 (0.06, not
  0.05999999865889549): JSON outputs then show the digits the computation has, and nothing else.
  """
  if traced:
    return x
  value = np.asarray(x)
  if value.dtype == np.float32:
    return float(str(np.float32(value)))
  return float(value)


def _task_lambdas(b: _Balance, traced: bool) -> dict[str, Any]:
  unit_index = {t: i for i, members in enumerate(b.plan.members) for t in members}
  out = {}
  for task in b.plan.tasks:
    if task in b.plan.fixed:
      w = b.plan.fixed[task]
      out[task] = jnp.asarray(w, dtype=b.lam.dtype) if traced else float(w)
    else:
      out[task] = _out(b.lam[unit_index[task]], traced)
  return out


def compute_lambda(scores: Scores, *, tasks: Sequence[str], form: str = "real",
                   temperature: float | str = 0.5, alpha: Sequence[float] = DEFAULT_ALPHA,
                   fixed: Mapping[str, float] | None = None,
                   groups: Mapping[str, str] | None = None,
                   on_degenerate: str = "error", drop: Sequence[str] = (),
                   spread: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """VisATB task weights λ for every task in `tasks` (docs/method.md §3–6, §14).

  Args:
    scores: `{model_name: {task: score}}`, higher is better; python floats, numpy or jax
      scalars, or tracers. See the module docstring for the model names of each form.
    tasks: all tasks, fixed ones included; the order of the result.
    form: "real" (default), "precise" or "base".
    temperature: T > 0, or "auto" for the lowest T in `AUTO_T_RANGE` that keeps every balanced
      weight within [0.5, 2] (needs concrete scores: not usable under jit/grad).
    alpha: (α_out, α_in, α_D), non-negative, summing to 1.
    fixed: task -> weight for tasks kept out of the balancing (no scores needed for them).
    groups: task -> group to balance at group level (every non-fixed task needs a group).
    on_degenerate: "error" (default) raises for a unit that did not clearly improve with its own
      data or a difficulty denominator that is not clearly positive; "warn" issues a
      `DegenerateScoresWarning` per such case and sets the unit's column of C (off the diagonal),
      or its D, to 0 (the project's choice, see the module docstring).
    drop: balanced units (groups with `groups`) whose column of C is left out of C_out and C_in
      (their C_in is 0), e.g. the units whose own-data gain is within noise (`noisy_units`); the
      project's choice beyond the paper, see "Noisy own-data gain" in the module docstring.
    spread: None (default: the paper's λ) or `{"c_out": sd, "c_in": sd, "d": sd}`, each sd a
      mapping balanced unit -> the bootstrap standard deviation of that unit's deviation from the
      mean over units (or a sequence in unit order): each component is shrunk toward its mean by
      `shrink_toward_mean` before the softmax and before the "auto" search (docs/method.md §14;
      `bootstrap.bootstrap_report(..., shrinkage="evidence")` computes the sds).

  With temperature="auto", a final weight left on a bound of [0.5, 2] issues a
  `TemperatureAtBoundWarning` (see "Automatic T at a bound" in the module docstring).

  Returns:
    task -> λ: python floats when the scores are concrete; 0-d jax arrays when traced (under
    `jax.jit` / `jax.grad`), fixed tasks included. Jittable and differentiable in the scores.

  Raises:
    ValueError: bad arguments, missing models/scores, fewer than 2 balanced units, or (concrete
      scores only) non-finite scores, or with on_degenerate="error" denominators <= 0 / near 0;
      the message names the model and task; `drop` naming a unit that is not balanced. Under
      tracing value problems cannot be detected: use `validate_scores` first.
  """
  b = _balance(scores, tasks, form, temperature, alpha, fixed, groups, on_degenerate, drop,
               spread)
  return _task_lambdas(b, _is_traced(b.lam))


def balance_report(scores: Scores, *, tasks: Sequence[str], form: str = "real",
                   temperature: float | str = 0.5, alpha: Sequence[float] = DEFAULT_ALPHA,
                   fixed: Mapping[str, float] | None = None,
                   groups: Mapping[str, str] | None = None,
                   on_degenerate: str = "error", drop: Sequence[str] = (),
                   spread: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`compute_lambda` plus its diagnostics, as a JSON-serialisable dict when concrete.

  Same arguments as `compute_lambda` (with `drop`, "C" is still reported in full; only
  "c_out"/"c_in" and what follows change). Keys: "tasks" (all, in order), "balanced" (the balanced
  units: tasks, or groups in order of first appearance), "form", "temperature" (the T used),
  "alpha" (list), "C" (list of rows; row = contributor, column = receiver, order of "balanced"),
  "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d" (each unit -> float), "lambda"
  (task -> float, fixed tasks included), "fixed" (task -> weight), "groups" (task -> group,
  null for fixed tasks; null altogether without groups) and "warnings" (the messages of the
  degenerate units masked by on_degenerate="warn", in order: C problems, then D problems, then
  the `TemperatureAtBoundWarning` message, if any; always present, [] when none, with "error",
  or when traced) and "at_bound" (the balanced units whose final weight is on a bound of
  [0.5, 2] with temperature="auto", in unit order; always [] with a numeric T). With `spread`,
  also "c_out_shrunk", "c_in_shrunk", "d_shrunk" (unit -> the shrunk input of the softmax; "c_out"
  etc. stay the plain values) and "shrinkage" ({"c_out" | "c_in" | "d": {unit: factor}}, the
  factor max(0, 1 − 1/z²) of `shrinkage_factor`: 1 kept, 0 pulled to the mean). When the scores
  are traced, numbers are 0-d jax arrays and "C" is an [N, N] jax array.
  """
  b = _balance(scores, tasks, form, temperature, alpha, fixed, groups, on_degenerate, drop,
               spread)
  traced = _is_traced(b.lam)
  units = b.plan.units

  def per_unit(v: Array) -> dict[str, Any]:
    return {u: _out(v[i], traced) for i, u in enumerate(units)}

  groups_out = None
  if b.plan.groups is not None:
    groups_out = {t: b.plan.groups.get(t) for t in b.plan.tasks}
  report = {
      "tasks": list(b.plan.tasks),
      "balanced": list(units),
      "form": b.form,
      "temperature": _out(b.temperature, _is_traced(b.temperature)),
      "alpha": list(b.alpha),
      "C": b.c if traced else [[float(v) for v in row] for row in np.asarray(b.c)],
      "c_out": per_unit(b.c_out),
      "c_in": per_unit(b.c_in),
      "d": per_unit(b.d),
      "lambda_out": per_unit(b.l_out),
      "lambda_in": per_unit(b.l_in),
      "lambda_d": per_unit(b.l_d),
      "lambda": _task_lambdas(b, traced),
      "fixed": {t: _out(w, _is_traced(w)) for t, w in b.plan.fixed.items()},
      "groups": groups_out,
      "warnings": list(b.warnings),
      "at_bound": list(b.at_bound),
  }
  if b.shrunk is not None:
    for comp, x in zip(SPREAD_COMPONENTS, b.shrunk):
      report[f"{comp}_shrunk"] = per_unit(x)
    report["shrinkage"] = {comp: per_unit(f) for comp, f in zip(SPREAD_COMPONENTS, b.factors)}
  return report
