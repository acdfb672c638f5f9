"""The balanced units and the scores the λ formulas read (docs/method.md §2–6).

`resolve_plan` checks tasks, fixed weights and groups and works out the balanced units;
`required_models` names every model a form needs (the paper's names: `mini`, `u+mini`, `u`,
`mini_u`, `base`); `collect_scores` looks each score up with a message naming the model and task;
`score_table` averages a group's member scores (§6) into the unit-level arrays of `ScoreTable`.
Shared by `balancing` (the λ API) and `bootstrap` (which resamples these scores), so both read the
scores one way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Scores = Mapping[str, Mapping[str, Any]]

from visatb_jax.core.options import FORMS, ON_DEGENERATE


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_form(form: str) -> str:
  if not isinstance(form, str) or form not in FORMS:
    raise ValueError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
  return form


def check_on_degenerate(on_degenerate: str) -> str:
  if not isinstance(on_degenerate, str) or on_degenerate not in ON_DEGENERATE:
    raise ValueError(f"unknown on_degenerate {on_degenerate!r}; expected one of "
                     f"{', '.join(ON_DEGENERATE)}")
  return on_degenerate


@dataclasses.dataclass(frozen=True)
class Plan:
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
    if not is_traced(weight):
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


def resolve_plan(tasks: Sequence[str], fixed: Mapping[str, float] | None,
             groups: Mapping[str, str] | None) -> Plan:
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
  return Plan(tasks, units, members, fixed, groups, groups is not None)


def own_model(form: str, unit: str) -> str:
  """The model trained with unit's own (large) data: 'u+mini', or 'u' in the base form."""
  return unit if form == "base" else f"{unit}+mini"


def reference_model(form: str) -> str:
  return "base" if form == "base" else "mini"


def difficulty_models(form: str, unit: str) -> tuple[str, str]:
  """(numerator, denominator) models of D[unit] = 1 − V(numerator) / V(denominator)."""
  if form == "real":
    return "mini", f"{unit}+mini"
  return f"mini_{unit}", unit


PARTS = ("c", "d")


def required_models(plan: Plan, form: str, parts: Sequence[str]) -> dict[str, tuple[int, ...]]:
  """Every model that C ("c") and/or D ("d") need, with the units it must be scored on."""
  everywhere = tuple(range(len(plan.units)))
  need: dict[str, set[int]] = {}
  if "c" in parts:
    need[reference_model(form)] = set(everywhere)
    for u in plan.units:
      need.setdefault(own_model(form, u), set()).update(everywhere)
  if "d" in parts:
    for i, u in enumerate(plan.units):
      for model in difficulty_models(form, u):
        need.setdefault(model, set()).add(i)
  return {m: tuple(sorted(ix)) for m, ix in need.items()}


def _missing_model_message(model: str, form: str, plan: Plan) -> str:
  """Names the missing model, what needs it and, for a per-task model, the way out."""
  if model in ("mini", "base"):
    return f"missing model {model!r} (form {form!r} needs it for every balanced {plan.kind})"
  unit = next(u for u in plan.units
              if model in (own_model(form, u),) + difficulty_models(form, u))
  hint = "" if plan.grouped else "; to exclude that task from balancing, give it a fixed weight"
  return f"missing model {model!r} (form {form!r} needs it for {plan.kind} {unit!r}{hint})"


def _check_scalar(value: Any, model: str, task: str) -> None:
  """A score must be a real scalar and, when concrete, finite."""
  where = f"score of model {model!r} on task {task!r}"
  if is_traced(value):
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


def collect_scores(scores: Scores, plan: Plan, form: str,
             parts: Sequence[str]) -> dict[tuple[str, int], tuple[Any, ...]]:
  """Looks up every score `parts` need: (model, unit index) -> raw member-task scores."""
  if not isinstance(scores, Mapping):
    raise ValueError(f"scores must be a mapping {{model: {{task: score}}}}, got "
                     f"{type(scores).__name__}")
  required = required_models(plan, form, parts)
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


def any_traced(raw: Mapping[Any, tuple[Any, ...]]) -> bool:
  return any(is_traced(v) for values in raw.values() for v in values)


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """The unit-level scores of one form, as arrays (jax or numpy float64); None if not needed."""
  own: Any = None     # [N, N]: own[i, j] = V_j(own model of i)
  ref: Any = None     # [N]:    ref[j] = V_j(mini) or V_j(base)
  d_num: Any = None   # [N]:    V_i(mini) (real) or V_i(mini_i)
  d_den: Any = None   # [N]:    V_i(i+mini) (real) or V_i(i)


def score_table(raw: Mapping[tuple[str, int], tuple[Any, ...]], plan: Plan, form: str,
           xp: Any, parts: Sequence[str]) -> ScoreTable:
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
    table["own"] = stack([stack([unit(raw[(own_model(form, u), j)]) for j in range(n)])
                          for u in plan.units])
    table["ref"] = stack([unit(raw[(reference_model(form), j)]) for j in range(n)])
  if "d" in parts:
    models = [difficulty_models(form, u) for u in plan.units]
    table["d_num"] = stack([unit(raw[(m[0], i)]) for i, m in enumerate(models)])
    table["d_den"] = stack([unit(raw[(m[1], i)]) for i, m in enumerate(models)])
  return ScoreTable(**table)


def check_drop(drop: Sequence[str], plan: Plan) -> np.ndarray | None:
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
