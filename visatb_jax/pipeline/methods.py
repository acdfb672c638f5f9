"""The method registry: the one place that says how each final model is trained.

A method is a name, a kind, and (for VisATB) whether it needs the balance stages. Its maths lives
in `core/` (a weighting strategy, a gradient combination); its options are checked by the run
config against that maths. Every method starts from the same base weights — 1 for balanced
tasks, the fixed weight for fixed-weight tasks — so fixed weights are honoured alike:

  kind      λ of the final run
  visatb    the λ of lambda.json (fixed tasks already at their weight)
  static    the base weights (EW)
  tla       base_k / (count of task k in the global batch), made in the step
  dynamic   a core.weighting strategy over the balanced tasks; fixed tasks keep their weight
            (RLW, DWA, IGB, and UW, whose learned log-variances are strategy state)
  gradient  a core.gradmtl combination of the per-task gradients, task k scaled by base_k
  per_task  one model per scored task, on that task's data alone (STL, the reference of ΔI)

Adding a baseline: its maths in core/ (a `weighting.STRATEGIES` or `gradmtl.METHODS` entry),
then one line in `REGISTRY` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from visatb_jax.train.method import TrainMethod


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  name: str
  kind: str

  @property
  def needs_balance(self) -> bool:
    """Whether λ from the preparation runs is needed (prep, validate and lambda stages)."""
    return self.kind == "visatb"

  @property
  def per_task(self) -> bool:
    return self.kind == "per_task"

  def train_method(self, base: np.ndarray, fixed_mask: tuple[bool, ...],
                   options: Mapping[str, Any] | None = None,
                   lam: np.ndarray | None = None) -> TrainMethod:
    """The TrainMethod of a final run over all tasks (`lam`: VisATB's weights)."""
    options = dict(options or {})
    if self.kind == "visatb":
      if lam is None:
        raise ValueError("visatb needs the λ of lambda.json")
      return TrainMethod.static(lam, name=self.name)
    if self.kind in ("static", "per_task"):
      return TrainMethod.static(base, name=self.name)
    if self.kind == "tla":
      return TrainMethod.tla(base, name=self.name)
    if self.kind == "dynamic":
      return TrainMethod.dynamic(self.name, base, fixed_mask, options)
    if self.kind == "gradient":
      return TrainMethod.gradient(self.name, base, options)
    raise ValueError(f"method {self.name!r} has an unknown kind {self.kind!r}")


REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("visatb", "visatb"),
    MethodSpec("ew", "static"),
    MethodSpec("tla", "tla"),
    MethodSpec("stl", "per_task"),
    MethodSpec("rlw", "dynamic"),
    MethodSpec("dwa", "dynamic"),
    MethodSpec("igb", "dynamic"),
    MethodSpec("uw", "dynamic"),
    MethodSpec("imgrad", "gradient"),
    MethodSpec("cagrad", "gradient"),
    MethodSpec("pcgrad", "gradient"),
    MethodSpec("mgda", "gradient"),
    MethodSpec("nash", "gradient"),
    MethodSpec("graddrop", "gradient"),
)}


def get(name: str) -> MethodSpec:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
  return REGISTRY[name]
