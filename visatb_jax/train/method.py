"""`TrainMethod`: how one training run makes its task weights λ, in one object.

Four kinds, one per way λ reaches the loss:
  * static: a fixed λ [T] (VisATB's computed weights, EW's ones), or a function of the step;
  * tla: task-level averaging, λ_k = base_k / (count of task k in the global batch), made in the
    step;
  * dynamic: a `core.weighting` strategy (RLW, DWA, IGB, UW) updates λ from the per-task losses;
  * gradient: a `core.gradmtl` method combines the per-task gradients (IMGrad, CAGrad, ...), each
    task's loss scaled by its base weight.
`base` holds every task's weight before the method acts: 1 for balanced tasks, the fixed weight
for fixed-weight tasks, so that a fixed weight is honoured alike by every kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from visatb_jax.core import gradmtl
from visatb_jax.core import weighting as weighting_lib

KINDS = ("static", "tla", "dynamic", "gradient")


@dataclasses.dataclass(frozen=True)
class TrainMethod:
  """How a run makes λ. Build it with the class methods, not the constructor."""

  name: str
  kind: str
  lam: Any  # float32 [T], or Callable[[int], [T]] (static); the base weights (other kinds)
  weighting: weighting_lib.Strategy | None = None
  gradient_method: str | None = None
  gradient_options: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def static(cls, lam: Any, name: str = "static") -> TrainMethod:
    """λ fixed for the whole run (an array [T]) or a function of the step index."""
    return cls(name, "static", lam if callable(lam) else _vector(lam, name))

  @classmethod
  def tla(cls, base: Sequence[float], name: str = "tla") -> TrainMethod:
    return cls(name, "tla", _vector(base, name))

  @classmethod
  def dynamic(cls, strategy_name: str, base: Sequence[float], fixed: Sequence[bool] | None = None,
              options: Mapping[str, Any] | None = None) -> TrainMethod:
    """A `core.weighting` strategy over the tasks not marked `fixed`; fixed tasks keep their base
    weight (default: no task is fixed)."""
    base = _vector(base, strategy_name)
    fixed = tuple(bool(f) for f in fixed) if fixed is not None else (False,) * base.size
    if len(fixed) != base.size:
      raise ValueError(f"method {strategy_name!r}: {len(fixed)} fixed flags for {base.size} tasks")
    strategy = weighting_lib.get_strategy(
        strategy_name, fixed_mask=fixed, fixed_values=tuple(float(w) for w in base),
        **dict(options or {}))
    return cls.from_strategy(strategy, base)

  @classmethod
  def from_strategy(cls, strategy: weighting_lib.Strategy, base: Sequence[float]) -> TrainMethod:
    """A dynamic method from a strategy built elsewhere; `base` gives the number of tasks."""
    return cls(strategy.name, "dynamic", _vector(base, strategy.name), weighting=strategy)

  @classmethod
  def gradient(cls, method: str, base: Sequence[float],
               options: Mapping[str, Any] | None = None) -> TrainMethod:
    if method not in gradmtl.METHODS:
      raise ValueError(f"unknown gradient method {method!r}; known: {sorted(gradmtl.METHODS)}")
    return cls(method, "gradient", _vector(base, method), gradient_method=method,
               gradient_options=tuple(sorted(dict(options or {}).items())))

  @classmethod
  def coerce(cls, method_or_lam: Any) -> TrainMethod:
    """A TrainMethod as is; anything else is a static λ."""
    if isinstance(method_or_lam, TrainMethod):
      return method_or_lam
    return cls.static(method_or_lam)

  def lam_at(self, step: int) -> np.ndarray:
    """The λ passed to step `step` (static and tla; the base weights otherwise)."""
    value = self.lam(step) if callable(self.lam) else self.lam
    return np.asarray(value, np.float32)

  @property
  def num_tasks(self) -> int:
    return int(self.lam_at(0).shape[0])


def _vector(values: Any, name: str) -> np.ndarray:
  lam = np.asarray(values, np.float32)
  if lam.ndim != 1 or lam.size == 0:
    raise ValueError(f"method {name!r}: task weights must be a non-empty vector, got shape "
                     f"{lam.shape}")
  if not np.all(np.isfinite(lam)) or np.any(lam < 0):
    raise ValueError(f"method {name!r}: task weights must be finite and >= 0, got {lam.tolist()}")
  return lam

