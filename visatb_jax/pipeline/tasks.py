"""The task plan: which tasks are trained, scored, fixed or balanced, and the preparation models
each balance form needs (docs/method.md §2, §4, §6, §7); and the zero-shot tasks, scored but never
trained on (§12)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from visatb_jax.core.options import FORMS


@dataclasses.dataclass(frozen=True)
class TaskPlan:
  """Tasks in config order, with their fixed weights, groups, metrics and directions."""

  names: tuple[str, ...]
  fixed: Mapping[str, float]         # task -> fixed weight (kept out of the balancing)
  groups: Mapping[str, str]          # balanced task -> group ({} without groups)
  metrics: Mapping[str, str | None]  # task -> scorer name (None: trained, never scored)
  higher_is_better: Mapping[str, bool]

  @classmethod
  def from_config(cls, tasks: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> TaskPlan:
    """Raises ValueError on duplicates, unknown tasks, or groups given to only some tasks."""
    names = tuple(order)
    if len(set(names)) != len(names):
      raise ValueError(f"config.task_order has duplicates: {list(names)}")
    fixed, groups = {}, {}
    for t in names:
      if t not in tasks:
        raise ValueError(f"task {t!r} is in config.task_order but not in config.tasks")
      info = tasks[t]
      if info.get("fixed_weight") is not None:
        fixed[t] = float(info["fixed_weight"])
      elif info.get("group"):
        groups[t] = str(info["group"])
    if groups and len(groups) != len(names) - len(fixed):
      missing = [t for t in names if t not in fixed and t not in groups]
      raise ValueError(f"tasks {missing} have no group while others do; give every balanced "
                       "task a group or none")
    return cls(names, fixed, groups,
               {t: tasks[t].get("metric") for t in names},
               {t: bool(tasks[t].get("higher_is_better", True)) for t in names})

  @property
  def num_tasks(self) -> int:
    return len(self.names)

  @property
  def balanced_tasks(self) -> tuple[str, ...]:
    return tuple(t for t in self.names if t not in self.fixed)

  @property
  def eval_tasks(self) -> tuple[str, ...]:
    """The scored tasks (a task with no metric, like ShareGPT, is trained only)."""
    return tuple(t for t in self.names if self.metrics[t])

  @property
  def balanced_units(self) -> tuple[str, ...]:
    """What λ is computed for: the balanced tasks, or their groups in order of appearance."""
    if self.groups:
      return tuple(dict.fromkeys(self.groups[t] for t in self.balanced_tasks))
    return self.balanced_tasks

  def unit_of(self, task: str) -> str | None:
    if task in self.fixed:
      return None
    return self.groups.get(task, task)

  def unit_tasks(self, unit: str) -> list[str]:
    return [t for t in self.names if self.unit_of(t) == unit]

  def base_weights(self) -> np.ndarray:
    """float32 [T]: every task's weight before a method acts (1, or the fixed weight)."""
    return np.array([self.fixed.get(t, 1.0) for t in self.names], np.float32)

  def fixed_mask(self) -> tuple[bool, ...]:
    return tuple(t in self.fixed for t in self.names)

  def prep_models(self, form: str) -> list[tuple[str, list[str] | None]]:
    """The preparation models of a balance form, each with the tasks it is validated on
    (None: every scored task).

    real: `mini` and `<u>+mini`; precise: those and `<u>`, `mini_<u>`; base: `base` (the
    initial model, not trained), `<u>` and `mini_<u>`. `<u>` and `<u>+mini` are scored on every
    task (they give C); `mini_<u>` only on u's tasks (it gives D).
    """
    units = self.balanced_units
    if form == "real":
      return [("mini", None)] + [(f"{u}+mini", None) for u in units]
    own = [(u, None) for u in units] + [(f"mini_{u}", self.unit_tasks(u)) for u in units]
    if form == "precise":
      return [("mini", None)] + [(f"{u}+mini", None) for u in units] + own
    if form == "base":
      return [("base", None)] + own
    raise ValueError(f"config.balance.form={form!r}; known forms: {list(FORMS)}")

  def prep_subsets(self, model_name: str) -> list[tuple[str, str]] | None:
    """(task, "large" | "mini") pairs a preparation model trains on; None for `base`.

    `mini`: every task's mini subset; `<u>+mini`: u's large subsets and the others' mini ones;
    `<u>`: u's large subsets alone; `mini_<u>`: u's mini subsets alone.
    """
    if model_name == "base":
      return None
    if model_name == "mini":
      return [(t, "mini") for t in self.names]
    if model_name.endswith("+mini"):
      mine = self.unit_tasks(model_name.removesuffix("+mini"))
      if not mine:
        raise ValueError(f"unknown preparation model {model_name!r}")
      return [(t, "large") for t in mine] + [(t, "mini") for t in self.names if t not in mine]
    if model_name.startswith("mini_") and self.unit_tasks(model_name.removeprefix("mini_")):
      return [(t, "mini") for t in self.unit_tasks(model_name.removeprefix("mini_"))]
    if model_name in self.balanced_units:
      return [(t, "large") for t in self.unit_tasks(model_name)]
    raise ValueError(f"unknown preparation model {model_name!r}")


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """A task evaluated but never trained on (docs/method.md §12): no train file, no λ, no STL.

  `files`: {split: file} ("test", optionally "val"); empty for a task of the built-in benchmark
  read from its generated splits, or when `data.files` names the file.
  """

  name: str
  metric: str
  higher_is_better: bool = True
  files: Mapping[str, str] = dataclasses.field(default_factory=dict)
  prompt_suffix: str = ""
  metric_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_entry(cls, name: str, entry: Mapping[str, Any]) -> ZeroShotTask:
    """From a checked `config.zero_shot` entry (pipeline/config.py checks it first)."""
    return cls(name, str(entry["metric"]), bool(entry.get("higher_is_better", True)),
               dict(entry.get("files") or {}), str(entry.get("prompt_suffix") or ""),
               dict(entry.get("metric_options") or {}))
