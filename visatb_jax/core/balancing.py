"""VisATB task balancing: contributions, difficulties and task weights λ (pure JAX).

The user-facing API over `formulas` (the array maths) and `score_table` (the units and the score
lookup): argument and score checks whose messages name the model and task, the on_degenerate /
drop / spread policies, the automatic T and the report dict. Its length is those checks and this
docstring, which states every choice beyond the paper.

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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from visatb_jax.core.formulas import (MIN_RELATIVE_DENOMINATOR, auto_search, contributions,
                                      difficulty, difficulty_valid, gain_valid, np_weights,
                                      outward_inward_of, shrink)
from visatb_jax.core.score_table import (FORMS, ON_DEGENERATE, PARTS, Plan, ScoreTable, Scores,
                                         any_traced, check_drop, check_form, check_on_degenerate,
                                         collect_scores, difficulty_models, is_traced,
                                         own_model, reference_model, resolve_plan, score_table)

__all__ = [
    "AUTO_T_RANGE", "DEFAULT_ALPHA", "FORMS", "MIN_RELATIVE_DENOMINATOR", "ON_DEGENERATE",
    "WEIGHT_BOUNDS", "DegenerateScoresWarning", "auto_temperature", "balance_report",
    "balanced_units", "check_alpha", "check_temperature", "compute_lambda", "contribution_matrix",
    "auto_temperature_batch", "difficulties", "lambda_components", "lambda_from_components",
    "noisy_units", "outward_inward", "validate_scores", "BOUND_RELATIVE_TOLERANCE",
    "SPREAD_COMPONENTS", "TemperatureAtBoundWarning", "at_bound_message", "shrink_toward_mean",
    "shrinkage_factor", "bound_units",
]

DEFAULT_ALPHA = (0.25, 0.25, 0.5)
# docs/method.md §5: the recommended T is the lowest one keeping every final weight within these bounds.
WEIGHT_BOUNDS = (0.5, 2.0)
# Search range of temperature="auto": a log grid of AUTO_GRID_POINTS over it, refined by bisection.
AUTO_T_RANGE = (0.05, 20.0)
# A final weight within this relative distance of a bound of WEIGHT_BOUNDS counts as at the bound.
BOUND_RELATIVE_TOLERANCE = 1e-3
# The λ component inputs that `spread` shrinks, in the order (C_out, C_in, D).
SPREAD_COMPONENTS = ("c_out", "c_in", "d")

Array = jax.Array


class DegenerateScoresWarning(UserWarning):
  """A unit's denominator is not clearly positive and on_degenerate="warn" masked it."""


class TemperatureAtBoundWarning(UserWarning):
  """temperature="auto" left a final weight on a bound: the bound, not the data, sets λ's spread."""


# ----------------------------------------------------------------------------------------------
# Argument checks.


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


def _numeric_temperature(temperature: Any) -> Any:
  """Validates a numeric temperature: a finite number > 0 (a traced one is passed through)."""
  if isinstance(temperature, str) or isinstance(temperature, bool):
    raise ValueError(f"temperature must be a number > 0 or 'auto', got {temperature!r}")
  if is_traced(temperature):
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


def balanced_units(tasks: Sequence[str], fixed: Mapping[str, float] | None = None,
                   groups: Mapping[str, str] | None = None) -> list[str]:
  """The units that are balanced: the non-fixed tasks, or their groups in order of appearance.

  Raises:
    ValueError: duplicate tasks, fixed/groups naming unknown tasks, a fixed task in a group, a
      balanced task without a group, bad fixed weights, or fewer than 2 units.
  """
  return list(resolve_plan(tasks, fixed, groups).units)


# ----------------------------------------------------------------------------------------------
# Looking the scores up.


def _value_problems(t: ScoreTable, plan: Plan, form: str) -> list[tuple[str, int, str]]:
  """Degenerate denominators of a concrete (numpy) table as ("c" | "d", unit index, message).

  The messages name the unit, the models and their scores; which units fail is decided by
  `gain_valid` / `difficulty_valid`, the same tests that make the masks of on_degenerate="warn".
  """
  problems = []
  ref_model = reference_model(form)
  over = " over 'base'" if form == "base" else ""
  if t.own is not None:
    valid = gain_valid(np.diagonal(t.own), t.ref, np)
    for j, u in enumerate(plan.units):
      if valid[j]:
        continue
      a, b = float(t.own[j, j]), float(t.ref[j])
      own = own_model(form, u)
      if a - b <= 0:
        message = (f"{plan.kind} {u!r} did not improve{over} with its own data: "
                   f"V_{u}({own})={a:.6g} <= V_{u}({ref_model})={b:.6g}")
      else:
        message = (f"{plan.kind} {u!r} barely improved{over} with its own data: "
                   f"V_{u}({own})={a:.6g} - V_{u}({ref_model})={b:.6g} = {a - b:.3g} is "
                   f"within {MIN_RELATIVE_DENOMINATOR:g}×|V| of 0")
      problems.append(("c", j, message))
  if t.d_den is not None:
    valid = difficulty_valid(t.d_num, t.d_den)
    for i, u in enumerate(plan.units):
      if valid[i]:
        continue
      num_model, den_model = difficulty_models(form, u)
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
  table: ScoreTable
  c_valid: Any
  d_valid: Any
  warnings: tuple[str, ...]


def _prepare(scores: Scores, plan: Plan, form: str, on_degenerate: str,
             parts: Sequence[str] = PARTS, stacklevel: int = 1) -> _Prepared:
  """Structural and (when concrete) value checks, then the jax score arrays C and/or D need.

  With on_degenerate="error", value problems raise one `ValueError` listing them all. With "warn"
  each one is issued as a `DegenerateScoresWarning` and its denominator is masked; under tracing
  the masks are computed from the traced values and nothing is warned. `stacklevel` is counted
  as in `warnings.warn` from the caller of `_prepare` (2: that caller's caller).
  """
  raw = collect_scores(scores, plan, form, parts)
  warn = on_degenerate == "warn"
  if any_traced(raw):
    table = score_table(raw, plan, form, jnp, parts)
    c_valid = d_valid = None
    if warn and table.own is not None:
      c_valid = gain_valid(jnp.diagonal(table.own), table.ref, jnp)
    if warn and table.d_den is not None:
      d_valid = difficulty_valid(table.d_num, table.d_den)
    return _Prepared(table, c_valid, d_valid, ())
  table = score_table(raw, plan, form, np, parts)
  problems = _value_problems(table, plan, form)
  if problems and not warn:
    raise ValueError("; ".join(message for _, _, message in problems))
  messages = tuple(message + _warn_suffix(part, plan.units[k]) for part, k, message in problems)
  for message in messages:
    warnings.warn(message, DegenerateScoresWarning, stacklevel=stacklevel + 1)
  c_valid = d_valid = None
  if warn and table.own is not None:
    c_valid = jnp.asarray(gain_valid(np.diagonal(table.own), table.ref, np))
  if warn and table.d_den is not None:
    d_valid = jnp.asarray(difficulty_valid(table.d_num, table.d_den))
  # One transfer per array instead of one per score.
  table = ScoreTable(**{k: None if v is None else jnp.asarray(v, dtype=float)
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
  on_degenerate = check_on_degenerate(on_degenerate)
  prepared = _prepare(scores, resolve_plan(tasks, fixed, groups), check_form(form), on_degenerate,
                      stacklevel=2)
  return list(prepared.warnings)


# ----------------------------------------------------------------------------------------------
# The formulas (docs/method.md §3–5).


def contribution_matrix(scores: Scores, tasks: Sequence[str], form: str = "real", *,
                        groups: Mapping[str, str] | None = None,
                        on_degenerate: str = "error") -> Array:
  """The N×N inter-task contribution matrix, C[i, j] = C[i→j] (row = contributor).

  Rows and columns follow `tasks` (or the groups in order of first appearance when `groups` is
  given). "real"/"precise" use models `mini` and `<i>+mini`, "base" uses `base` and `<i>`.
  `on_degenerate`: "error" raises for a receiver that did not clearly improve with its own data;
  "warn" warns and sets its column to 0 off the diagonal (see the module docstring).
  """
  on_degenerate = check_on_degenerate(on_degenerate)
  p = _prepare(scores, resolve_plan(tasks, None, groups), check_form(form), on_degenerate, ("c",),
               stacklevel=2)
  return contributions(p.table.own, p.table.ref, p.c_valid)


def difficulties(scores: Scores, tasks: Sequence[str], form: str = "real", *,
                 groups: Mapping[str, str] | None = None,
                 on_degenerate: str = "error") -> Array:
  """Intra-task difficulty D [N]: real 1 − V_i(mini)/V_i(i+mini), else 1 − V_i(mini_i)/V_i(i).

  `on_degenerate`: "error" raises for a denominator that is not clearly positive; "warn" warns
  and sets that D[i] to 0.
  """
  on_degenerate = check_on_degenerate(on_degenerate)
  p = _prepare(scores, resolve_plan(tasks, None, groups), check_form(form), on_degenerate, ("d",),
               stacklevel=2)
  return difficulty(p.table.d_num, p.table.d_den, p.d_valid)


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
  return outward_inward_of(c, dropped)


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


def _check_sd(x: Array, sd: Any) -> Array:
  sd = jnp.asarray(sd, dtype=x.dtype)
  try:
    jnp.broadcast_shapes(sd.shape, x.shape)
  except ValueError:
    raise ValueError(f"sd of shape {sd.shape} does not broadcast against x of shape "
                     f"{x.shape}") from None
  # +inf is allowed: no evidence at all, the mean (bootstrap's rule for a noisy own-data gain).
  if not is_traced(sd) and not bool(jnp.all(~jnp.isnan(sd) & (sd >= 0))):
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
  x = jnp.asarray(x, dtype=float) if not is_traced(x) else x
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"x must have at least one unit (last axis), got shape {x.shape}")
  return shrink(x, _check_sd(x, sd))[0]


def shrinkage_factor(x: Any, sd: Any) -> Array:
  """max(0, 1 − 1/z²) of `shrink_toward_mean` per unit: 1 keeps x_i, 0 replaces it by the mean."""
  x = jnp.asarray(x, dtype=float) if not is_traced(x) else x
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"x must have at least one unit (last axis), got shape {x.shape}")
  return shrink(x, _check_sd(x, sd))[1]


def _check_spread(spread: Any, plan: Plan) -> tuple[Any, Any, Any] | None:
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
      if any(is_traced(v) for v in values):
        vec = jnp.stack([jnp.asarray(v, dtype=float) for v in values])
      else:
        vec = np.asarray(values)
    elif isinstance(value, (list, tuple)) and any(is_traced(v) for v in value):
      vec = jnp.stack([jnp.asarray(v, dtype=float) for v in value])
    else:
      vec = value
    if not is_traced(vec):
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
  if any(is_traced(v) for v in (c_out, c_in, d)):
    raise ValueError("temperature='auto' needs concrete scores (it is not jittable): pick T "
                     "eagerly (balance_report(...)['temperature']) and pass the number")
  x = np.stack(_check_vectors(c_out, c_in, d, xp=np))[None]
  t_lo, t_hi = _check_t_range(t_range)
  t, found = auto_search(x, a, (t_lo, t_hi), bounds)
  if not found[0]:
    w = np_weights(x, np.array([t_hi]), a)
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
  return auto_search(x, a, _check_t_range(t_range), bounds)


# ----------------------------------------------------------------------------------------------
# Public entry points.


@dataclasses.dataclass(frozen=True)
class _Balance:
  plan: Plan
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
  form = check_form(form)
  alpha = check_alpha(alpha)
  check_temperature(temperature)
  on_degenerate = check_on_degenerate(on_degenerate)
  plan = resolve_plan(tasks, fixed, groups)
  dropped = check_drop(drop, plan)
  sds = _check_spread(spread, plan)
  # Warnings point at the caller of compute_lambda / balance_report.
  p = _prepare(scores, plan, form, on_degenerate, stacklevel=3)
  c = contributions(p.table.own, p.table.ref, p.c_valid)
  d = difficulty(p.table.d_num, p.table.d_den, p.d_valid)
  c_out, c_in = outward_inward(c, dropped=dropped)
  inputs, shrunk, factors = (c_out, c_in, d), None, None
  if sds is not None:
    pairs = [shrink(x, sd.astype(x.dtype)) for x, sd in zip(inputs, sds)]
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
  return _task_lambdas(b, is_traced(b.lam))


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
  traced = is_traced(b.lam)
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
      "temperature": _out(b.temperature, is_traced(b.temperature)),
      "alpha": list(b.alpha),
      "C": b.c if traced else [[float(v) for v in row] for row in np.asarray(b.c)],
      "c_out": per_unit(b.c_out),
      "c_in": per_unit(b.c_in),
      "d": per_unit(b.d),
      "lambda_out": per_unit(b.l_out),
      "lambda_in": per_unit(b.l_in),
      "lambda_d": per_unit(b.l_d),
      "lambda": _task_lambdas(b, traced),
      "fixed": {t: _out(w, is_traced(w)) for t, w in b.plan.fixed.items()},
      "groups": groups_out,
      "warnings": list(b.warnings),
      "at_bound": list(b.at_bound),
  }
  if b.shrunk is not None:
    for comp, x in zip(SPREAD_COMPONENTS, b.shrunk):
      report[f"{comp}_shrunk"] = per_unit(x)
    report["shrinkage"] = {comp: per_unit(f) for comp, f in zip(SPREAD_COMPONENTS, b.factors)}
  return report
