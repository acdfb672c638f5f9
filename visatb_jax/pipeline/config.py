"""The run config: built once from a config file's ConfigDict, every default and check in one
place, before any stage runs.

A mistake in a config (a bad α, an unknown method option, a mesh that does not divide the
devices, a non-positive epoch count) is a `ConfigError` naming the field, raised before the data
stage rather than after hours of preparation runs.

Stages see the config through `RunConfig.restricted(sections)`: a view that raises when a stage
reads a section its hash does not cover, so a stage's output can never depend on a setting whose
change would not re-run it (docs/architecture.md, "Stage inputs").
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from visatb_jax.core import balancing, gradmtl, metrics
from visatb_jax.core import weighting as weighting_lib
from visatb_jax.core.options import FORMS, ON_DEGENERATE, ON_NOISY_GAIN, SHRINKAGE
from visatb_jax.data import template as template_lib
from visatb_jax.pipeline import methods as methods_lib
from visatb_jax.pipeline.errors import ConfigError
from visatb_jax.pipeline.tasks import TaskPlan, ZeroShotTask
from visatb_jax.runtime.sharding import MESH_AXES
from visatb_jax.train.state import TrainConfig

DATA_SOURCES = ("shapes", "llava_json")
LOADERS = ("memory", "grain")
# Fields of a zero-shot entry; `group` and `fixed_weight` only because presets.task() writes them
# (as None): a task that is never trained has neither.
ZERO_SHOT_FIELDS = ("metric", "higher_is_better", "files", "prompt_suffix", "metric_options",
                    "max_new_tokens", "group", "fixed_weight")
ZERO_SHOT_SPLITS = ("val", "test")

# Sections every stage may read without hashing them: where the run executes (the device mesh)
# and what it is called, not what it computes.
UNHASHED = ("name", "mesh")


def plain(value: Any) -> Any:
  """A ConfigDict / FieldReference / tuple tree as plain dicts, lists and scalars."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def _get(section: Mapping[str, Any], key: str, default: Any = None) -> Any:
  value = section.get(key, default)
  return default if value is None else value


def _number(where: str, value: Any, *, kind: type = float, minimum: float | None = None,
            exclusive: bool = False, maximum: float | None = None) -> Any:
  try:
    if isinstance(value, bool) or (kind is int and float(value) != int(value)):
      raise TypeError
    out = kind(value)
  except (TypeError, ValueError):
    raise ConfigError(f"config.{where} must be {'an integer' if kind is int else 'a number'}, "
                      f"got {value!r}") from None
  if isinstance(out, float) and not math.isfinite(out):
    raise ConfigError(f"config.{where} must be finite, got {value!r}")
  if minimum is not None and (out <= minimum if exclusive else out < minimum):
    raise ConfigError(f"config.{where} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
  if maximum is not None and out > maximum:
    raise ConfigError(f"config.{where} must be <= {maximum}, got {value!r}")
  return out


def _choice(where: str, value: Any, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ConfigError(f"config.{where}={value!r}; choose one of {list(choices)}")
  return value


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
  form: str = "real"
  temperature: float | str = 0.5
  alpha: tuple[float, float, float] = balancing.DEFAULT_ALPHA
  on_degenerate: str = "error"
  on_noisy_gain: str = "warn"
  resamples: int = 1000
  level: float = 0.9
  # Beyond the paper, so the default of user configs; the paper configs select "none".
  shrinkage: str = "evidence"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run, checked; `sections` keeps each section's plain values for hashing."""

  name: str
  seed: int
  tasks: TaskPlan
  balance: BalanceConfig
  methods: tuple[str, ...]  # the run's own final model first, then the baselines
  method_options: Mapping[str, Mapping[str, Any]]
  train_epochs: float
  sections: Mapping[str, Any]  # section -> plain value (dicts, lists, scalars)
  # Evaluated, never trained on (docs/method.md §12); read by the test stage alone.
  zero_shot: Mapping[str, ZeroShotTask] = dataclasses.field(default_factory=dict)

  @property
  def main_method(self) -> str:
    return self.methods[0]

  @property
  def pretrain(self) -> Mapping[str, Any] | None:
    """The pretrain stage's settings (None: the runs start from the initial model)."""
    return self.sections.get("pretrain")

  @property
  def needs_balance(self) -> bool:
    """Whether VisATB is among the final models (else prep, validate and lambda are skipped)."""
    return any(methods_lib.get(m).needs_balance for m in self.methods)

  def section(self, name: str) -> Any:
    """A section's plain value, or a dotted field of one ("balance.form")."""
    head, _, rest = name.partition(".")
    value = self.sections[head]
    for key in filter(None, rest.split(".")):
      value = value.get(key) if isinstance(value, Mapping) else None
    return value

  def train_config(self, steps: int, rows_per_step: int | None = None) -> TrainConfig:
    """The TrainConfig of a run of `steps` steps. train.batch_size counts samples; the trainer's
    batch_size is the rows a step's samples are packed into (`rows_per_step`; None: unchecked)."""
    fields = {k: v for k, v in self.sections["train"].items() if k != "epochs"}
    return TrainConfig.of({**fields, "steps": max(1, int(steps)), "seed": self.seed,
                           "batch_size": rows_per_step})

  def restricted(self, allowed: Iterable[str], stage: str) -> ConfigView:
    return ConfigView(self, frozenset(allowed) | frozenset(UNHASHED), stage)


class StageInputError(RuntimeError):
  """A stage read a config section its hash does not cover: a bug in the stage's declaration."""


class ConfigView:
  """The RunConfig as one stage may see it: sections outside `allowed` raise StageInputError.

  `allowed` holds section names ("data") or dotted fields ("balance.form"); RunConfig's derived
  attributes are mapped to the sections they come from.
  """

  _SOURCES = {"name": "name", "seed": "seed", "tasks": "tasks", "balance": "balance",
              "pretrain": "pretrain", "zero_shot": "zero_shot",
              "methods": "methods", "method_options": "methods", "main_method": "methods",
              "needs_balance": "methods", "train_epochs": "train", "train_config": "train"}

  def __init__(self, config: RunConfig, allowed: frozenset[str], stage: str):
    self._config, self._allowed, self._stage = config, allowed, stage

  def _check(self, name: str) -> None:
    head = name.partition(".")[0]
    if name in self._allowed or head in self._allowed:
      return
    raise StageInputError(
        f"stage {self._stage!r} read config.{name}, which its hash does not cover; add it to the "
        "stage's sections in pipeline/stages.py")

  def section(self, name: str) -> Any:
    self._check(name)
    return self._config.section(name)

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_"):
      raise AttributeError(name)
    if name == "balance":
      return _BalanceView(self)
    self._check(self._SOURCES.get(name, name))
    return getattr(self._config, name)


class _BalanceView:
  """config.balance field by field, so that prep may read balance.form alone."""

  def __init__(self, view: ConfigView):
    self._view = view

  def __getattr__(self, name: str) -> Any:
    self._view._check(f"balance.{name}")  # pylint: disable=protected-access
    return getattr(self._view._config.balance, name)  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------ building


def _task_plan(tasks: Mapping[str, Any], order: Sequence[str], needs_balance: bool) -> TaskPlan:
  if not order:
    raise ConfigError("config.task_order is empty")
  if len(set(order)) != len(order):
    raise ConfigError(f"config.task_order has duplicates: {list(order)}")
  for t in order:
    if t not in tasks:
      raise ConfigError(f"task {t!r} is in config.task_order but not in config.tasks")
    info = tasks[t]
    metric = info.get("metric")
    if metric is not None and metric not in metrics.SCORERS:
      raise ConfigError(f"config.tasks.{t}.metric={metric!r}; known: {sorted(metrics.SCORERS)}")
    if info.get("fixed_weight") is not None:
      _number(f"tasks.{t}.fixed_weight", info["fixed_weight"], minimum=0.0)
    if metric is not None:
      _metric_options(f"tasks.{t}.metric_options", metric, info.get("metric_options"))
    _max_new_tokens(f"tasks.{t}", info)
  try:
    plan = TaskPlan.from_config(tasks, order)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if needs_balance and len(plan.balanced_units) < 2:
    raise ConfigError(f"VisATB needs at least 2 balanced tasks or groups, got "
                      f"{list(plan.balanced_units)}")
  unscored = [t for t in plan.balanced_tasks if t not in plan.eval_tasks]
  if unscored:
    raise ConfigError(f"balanced task(s) {unscored} have no metric; λ is computed from validation "
                      "scores, so only fixed-weight tasks may go unscored")
  return plan


def _metric_options(where: str, metric: str, options: Any) -> dict:
  """A task's `metric_options` (keyword options of its scorer), checked by name."""
  if not options:
    return {}
  if not isinstance(options, Mapping):
    raise ConfigError(f"config.{where} must map option names to values, got {options!r}")
  try:
    metrics.check_metric_options(metric, options)
  except ValueError as e:
    raise ConfigError(f"config.{where}: {e}") from None
  return dict(options)


def _max_new_tokens(where: str, entry: Mapping[str, Any]) -> int | None:
  """A task's own `max_new_tokens` (None: it generates up to eval.max_new_tokens)."""
  value = entry.get("max_new_tokens")
  return None if value is None else _number(f"{where}.max_new_tokens", value, kind=int,
                                            minimum=1)


def _eval_section(section: Mapping[str, Any], tasks: Mapping[str, Any],
                  order: Sequence[str]) -> dict[str, Any]:
  """config.eval as hashed: with `task_max_new_tokens` {task: n} of the trained tasks that set
  their own `max_new_tokens` (absent when none does, so that existing runs keep their hashes).

  The budgets are hashed here rather than with the tasks, so that changing one re-scores the
  models instead of retraining them (the data stage hashes the tasks section).
  """
  out = dict(section)
  budgets = {t: int(tasks[t]["max_new_tokens"]) for t in order
             if tasks[t].get("max_new_tokens") is not None}
  if budgets:
    out["task_max_new_tokens"] = budgets
  return out


def _tasks_section(tasks: Mapping[str, Any]) -> dict[str, Any]:
  """config.tasks as hashed: without the generation budgets (`_eval_section` has them)."""
  return {t: {k: v for k, v in entry.items() if k != "max_new_tokens"}
          for t, entry in tasks.items()}


def _zero_shot_files(where: str, name: str, files: Any, data: Mapping[str, Any]) -> dict:
  """A zero-shot task's {split: file}, checked against the data source.

  The built-in benchmark's own tasks need no file (their generated splits are read); any other
  zero-shot task needs a test file: absolute for the shapes source, which has no data.root, and
  for a llava_json source relative to data.root (or `data.files.test` with {task} = its name).
  """
  if not isinstance(files, Mapping):
    raise ConfigError(f"config.{where}.files must map splits to files, got {files!r}")
  extra = sorted(set(files) - set(ZERO_SHOT_SPLITS))
  if extra:
    raise ConfigError(f"config.{where}.files has split(s) {extra}; a zero-shot task is never "
                      f"trained, so it takes only {list(ZERO_SHOT_SPLITS)}")
  for split, path in files.items():
    if not isinstance(path, str) or not path:
      raise ConfigError(f"config.{where}.files.{split} must be a file name, got {path!r}")
  if data.get("source") == "shapes":
    from visatb_jax.data import shapes  # pylint: disable=g-import-not-at-top
    if "test" not in files and name not in shapes.TASKS:
      raise ConfigError(f"config.{where}: {name!r} is no task of the shapes benchmark (it has "
                        f"{list(shapes.TASKS)}); name one of them or give files={{'test': "
                        "'/path/to/file.json'}")
    for split, path in files.items():
      if not os.path.isabs(os.path.expanduser(path)):
        raise ConfigError(f"config.{where}.files.{split}={path!r}: the shapes source has no "
                          "data.root, so the file needs an absolute path")
  elif "test" not in files and "test" not in (data.get("files") or {}):
    raise ConfigError(f"config.{where} has no test file: set files={{'test': ...}} in its entry "
                      "(or config.data.files.test)")
  return dict(files)


def _zero_shot(section: Any, plan: TaskPlan, data: Mapping[str, Any]) -> dict[str, dict]:
  """`config.zero_shot` with defaults filled: {task: {metric, higher_is_better, files,
  prompt_suffix, metric_options}} (docs/method.md §12)."""
  if not section:
    return {}
  if not isinstance(section, Mapping):
    raise ConfigError(f"config.zero_shot must map task names to task entries, got {section!r}")
  out = {}
  for name, entry in section.items():
    where = f"zero_shot.{name}"
    if name in plan.names:
      raise ConfigError(f"config.{where}: {name!r} is in config.task_order, so it is trained; a "
                        "zero-shot task is evaluated but never trained on")
    if not isinstance(entry, Mapping):
      raise ConfigError(f"config.{where} must be a task entry such as presets.task(metric, "
                        f"files=...), got {entry!r}")
    unknown = sorted(set(entry) - set(ZERO_SHOT_FIELDS))
    if unknown:
      raise ConfigError(f"config.{where} has unknown field(s) {unknown}; fields: "
                        f"{sorted(set(ZERO_SHOT_FIELDS) - {'group', 'fixed_weight'})}")
    for key in ("group", "fixed_weight"):
      if entry.get(key) not in (None, ""):
        raise ConfigError(f"config.{where}.{key}={entry[key]!r}: a zero-shot task is never "
                          "trained, so it takes no part in balancing")
    metric = entry.get("metric")
    if metric not in metrics.SCORERS:
      raise ConfigError(f"config.{where}.metric={metric!r}; known: {sorted(metrics.SCORERS)}")
    higher = _get(entry, "higher_is_better", True)
    if not isinstance(higher, bool):
      raise ConfigError(f"config.{where}.higher_is_better must be true or false, got {higher!r}")
    suffix = _get(entry, "prompt_suffix", "")
    if not isinstance(suffix, str):
      raise ConfigError(f"config.{where}.prompt_suffix must be a string, got {suffix!r}")
    out[str(name)] = {
        "metric": metric, "higher_is_better": higher,
        "files": _zero_shot_files(where, name, _get(entry, "files", {}), data),
        "prompt_suffix": suffix,
        "metric_options": _metric_options(f"{where}.metric_options", metric,
                                          entry.get("metric_options"))}
    budget = _max_new_tokens(where, entry)
    if budget is not None:  # only when set: existing runs keep their hashes
      out[str(name)]["max_new_tokens"] = budget
  return out


class ZeroShotSkippedWarning(UserWarning):
  """A config declares a zero-shot suite under an empty `zero_shot_root`: it is not scored."""


def _rooted_zero_shot(raw: Mapping[str, Any]) -> tuple[Any, str | None]:
  """(config.zero_shot with its relative files under config.zero_shot_root, or None; why it was
  skipped, or None).

  A config without the field keeps its files relative to data.root. One with the field (the
  paper configs, docs/method.md §12) declares its suite under it: an empty root skips the suite
  with one warning, rather than failing a run that has no zero-shot files.
  """
  section = raw.get("zero_shot")
  if "zero_shot_root" not in raw or not section or not isinstance(section, Mapping):
    return section, None
  root = raw["zero_shot_root"]
  if root is not None and not isinstance(root, str):
    raise ConfigError(f"config.zero_shot_root must be a directory, got {root!r}")
  if not root:
    why = (f"config.zero_shot_root is empty, so the zero-shot suite ({', '.join(section)}) is "
           "skipped and the report has no ΔI_zero; set it to the directory of their files")
    warnings.warn_explicit(why, ZeroShotSkippedWarning, "config.zero_shot_root", 1,
                           registry=_SHOWN)
    return None, why
  root = os.path.expanduser(root)
  out = {}
  for name, entry in section.items():
    files = entry.get("files") if isinstance(entry, Mapping) else None
    if isinstance(files, Mapping):
      files = {k: (os.path.join(root, os.path.expanduser(v))
                   if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v))
                   else v) for k, v in files.items()}
      entry = {**entry, "files": files}
    out[name] = entry
  return out, None


def _balance(section: Mapping[str, Any]) -> BalanceConfig:
  form = _choice("balance.form", _get(section, "form", "real"), FORMS)
  try:
    alpha = balancing.check_alpha(tuple(_get(section, "alpha", balancing.DEFAULT_ALPHA)))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.balance.alpha: {e}") from None
  temperature = _get(section, "temperature", 0.5)
  if isinstance(temperature, str) and temperature != "auto":
    try:  # from the command line a number may arrive as text
      temperature = float(temperature)
    except ValueError:
      pass
  try:
    temperature = balancing.check_temperature(temperature)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.balance.temperature: {e}") from None
  return BalanceConfig(
      form=form, temperature=temperature, alpha=tuple(alpha),
      on_degenerate=_choice("balance.on_degenerate", _get(section, "on_degenerate", "error"),
                            ON_DEGENERATE),
      on_noisy_gain=_choice("balance.on_noisy_gain", _get(section, "on_noisy_gain", "warn"),
                            ON_NOISY_GAIN),
      resamples=_number("balance.resamples", _get(section, "resamples", 1000), kind=int,
                        minimum=1),
      level=_number("balance.level", _get(section, "level", 0.9), minimum=0.0, exclusive=True,
                    maximum=0.999),
      # "none": the paper's λ (docs/method.md §5); "evidence": each component's input shrunk
      # toward the units' mean by its bootstrap z-score first (§14, beyond the paper).
      shrinkage=_choice("balance.shrinkage", _get(section, "shrinkage", "evidence"),
                        SHRINKAGE))


def _check_method_options(name: str, options: Mapping[str, Any], num_tasks: int) -> None:
  spec = methods_lib.get(name)
  where = f"config.weighting_options.{name}"
  if spec.kind == "dynamic":
    try:
      weighting_lib.get_strategy(name, fixed_mask=(False,) * num_tasks,
                                 fixed_values=(1.0,) * num_tasks, **options)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where}: {e}") from None
  elif spec.kind == "gradient":
    fn = gradmtl.METHODS[name]
    reserved = {"rng", "prev_alpha"}
    params = {p for p in inspect.signature(fn).parameters if p != "G"} - reserved
    unknown = sorted(set(options) - params)
    if unknown:
      raise ConfigError(f"{where}: unknown option(s) {unknown}; {name} takes {sorted(params)}")
  elif options:
    raise ConfigError(f"{where}: {name} takes no options, got {sorted(options)}")


def _methods(config: Mapping[str, Any], num_tasks: int) -> tuple[tuple[str, ...], dict]:
  main = _get(config, "weighting", "visatb")
  known = sorted(methods_lib.REGISTRY)
  if main not in methods_lib.REGISTRY or methods_lib.get(main).per_task:
    raise ConfigError(
        f"config.weighting={main!r} is not a method of one final model; choose one of "
        f"{[m for m in known if not methods_lib.get(m).per_task]} (STL, one model per task, is a "
        "baseline: name it in config.baselines)")
  baselines = list(_get(config, "baselines", ()))
  unknown = [m for m in baselines if m not in methods_lib.REGISTRY]
  if unknown:
    raise ConfigError(f"unknown baseline(s) {unknown} in config.baselines; known: {known}")
  options = plain(_get(config, "weighting_options", {}))
  for name, opts in options.items():
    if name not in methods_lib.REGISTRY:
      raise ConfigError(f"config.weighting_options.{name}: no such method; known: {known}")
    _check_method_options(name, opts or {}, num_tasks)
  methods = tuple(dict.fromkeys([main] + baselines))
  return methods, {m: dict(options.get(m) or {}) for m in methods}


def _check_train(section: Mapping[str, Any]) -> float:
  epochs = _number("train.epochs", _get(section, "epochs", 1.0), minimum=0.0, exclusive=True)
  fields = {k: v for k, v in section.items() if k != "epochs"}
  for key in ("batch_size", "accum_steps"):
    if key in fields and fields[key] is not None:
      _number(f"train.{key}", fields[key], kind=int, minimum=1)
  try:
    # batch_size counts samples: the rows they pack into (TrainConfig's) need not divide evenly.
    TrainConfig.of({**fields, "steps": 1, "batch_size": None})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("train.") else f"config.train: {e}") from None
  if "batch_size" not in fields:
    raise ConfigError("config.train.batch_size is required (samples per optimizer step, as the "
                      "paper counts them)")
  return epochs


def _check_data(section: Mapping[str, Any], plan: TaskPlan) -> None:
  source = _choice("data.source", section.get("source"), DATA_SOURCES)
  _choice("data.loader", _get(section, "loader", "memory"), LOADERS)
  _choice("data.template", _get(section, "template", template_lib.DEFAULT_TEMPLATE),
          sorted(template_lib.TEMPLATES))
  for key in ("max_len", "seq_len", "max_images"):
    _number(f"data.{key}", section.get(key), kind=int, minimum=1)
  if int(section["max_len"]) > int(section["seq_len"]):
    raise ConfigError(f"config.data.max_len={section['max_len']} is longer than a packed row "
                      f"(config.data.seq_len={section['seq_len']})")
  if source == "shapes":
    from visatb_jax.data import shapes  # pylint: disable=g-import-not-at-top
    unknown = sorted(set(plan.names) - set(shapes.TASKS))
    if unknown:
      raise ConfigError(f"unknown task(s) {unknown} for the shapes benchmark (it has "
                        f"{list(shapes.TASKS)})")
    _choice("data.shapes.count_scope", (section.get("shapes") or {}).get("count_scope") or "any",
            shapes.COUNT_SCOPES)
    _choice("data.shapes.vqa_scope", (section.get("shapes") or {}).get("vqa_scope") or "any",
            shapes.VQA_SCOPES)
  elif not section.get("root"):
    raise ConfigError("config.data.root is empty: set it to the directory of the task files "
                      "(--config.data.root=/data/...)")


def _check_prep(section: Mapping[str, Any]) -> None:
  r_large = _number("prep.r_large", section.get("r_large"), minimum=0.0, exclusive=True,
                    maximum=1.0)
  r_mini = _number("prep.r_mini", section.get("r_mini"), minimum=0.0, exclusive=True,
                   maximum=1.0)
  if r_mini > r_large:
    raise ConfigError(f"config.prep.r_mini={r_mini} is larger than config.prep.r_large={r_large} "
                      "(the mini subset is drawn from the large one)")
  _number("prep.parallel", _get(section, "parallel", 1), kind=int, minimum=1)
  _number("prep.replicates", _get(section, "replicates", 1), kind=int, minimum=1)


# The template whose image blocks Qwen2-VL reads (data/template.py).
QWEN2VL_TEMPLATE = "qwen2vl"

# Files a Hugging Face tokenizer directory has (any one of them) for AutoTokenizer to load it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _one_line(error: BaseException) -> str:
  """An error's message on one line (some libraries' messages span several)."""
  return " ".join(str(error).split())


def _check_checkpoint(path: str, tokenizer_here: bool) -> None:
  """`model.path`: an existing LLaVA or Qwen2-VL checkpoint directory (config.json, weight files,
  and the tokenizer when the data reads it from there); nothing is read beyond config.json."""
  from visatb_jax.model import factory, hf_io  # pylint: disable=g-import-not-at-top
  what = "checkpoint and tokenizer directory" if tokenizer_here else "checkpoint directory"
  if not os.path.exists(path):
    raise ConfigError(f"config.model.path: {what} {path} does not exist")
  if not os.path.isdir(path):
    raise ConfigError(f"config.model.path: {path} is not a directory (expected the {what} of a "
                      "Hugging Face LLaVA checkpoint)")
  try:
    if factory.checkpoint_model_type(path) == factory.QWEN2_VL:
      from visatb_jax.model import qwen2vl_io  # pylint: disable=g-import-not-at-top
      qwen2vl_io.check_checkpoint(path)
    else:
      hf_io.check_checkpoint(path)
  except hf_io.UnsupportedModelError as e:
    raise ConfigError(f"config.model.path: {_one_line(e)}; for a separate vision tower, language "
                      "model and projector set model.vision_path, model.text_path and "
                      "model.projector_path instead") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.model.path: {_one_line(e)}") from None
  if tokenizer_here and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise ConfigError(f"config.model.path: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}), "
                      "which a llava_json source reads from it: set config.data.tokenizer to a "
                      "tokenizer directory")


class InstructionTunedStartWarning(UserWarning):
  """`model.path` is an instruction-tuned model, where the paper starts from pretrained parts."""


# LLaVA-1.5's released models, by directory name: llava-1.5-7b-hf, llava-v1.5-13b, ...
_LLAVA15_NAME = re.compile(r"llava-?v?1[.\-_]5")
# config.json `model_type` of a full LLaVA checkpoint: llava-hf's, and the original release's.
_LLAVA_MODEL_TYPES = ("llava", "llava_llama", "llava_next")


def instruction_tuned_start(path: str) -> str | None:
  """Why `model.path` is an instruction-tuned model, in words; None when nothing says so.

  A LLaVA (config.json `model_type` llava / llava_llama, in a directory whose name says llava),
  or a directory named as a LLaVA-1.5 release (llava-1.5-7b-hf, llava-v1.5-13b), has been
  instruction-tuned on LLaVA-1.5's 665k mixture; a Qwen2-VL named -Instruct has been
  instruction-tuned too. A stage-1 directory (its name says "pretrain") is not.
  """
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  name = os.path.basename(os.path.normpath(path)).lower()
  if "pretrain" in name:
    return None
  model_type = factory.checkpoint_model_type(path) if os.path.isdir(path) else None
  if model_type == factory.QWEN2_VL:
    return "an instruction-tuned Qwen2-VL (-Instruct)" if "instruct" in name else None
  if "llava" in name and model_type in _LLAVA_MODEL_TYPES:
    return f"an instruction-tuned LLaVA (model_type {model_type})"
  if _LLAVA15_NAME.search(name):
    return "an instruction-tuned LLaVA-1.5 release, by its name"
  return None


# Warnings already shown (see `_warn_instruction_tuned`): a run builds its config more than once.
_SHOWN: dict = {}


def _warn_instruction_tuned(path: str) -> None:
  """One line on why an instruction-tuned start changes the paper's comparison."""
  what = instruction_tuned_start(path)
  if what is None:
    return
  if "Qwen2-VL" in what:
    why = ("Qwen2-VL-Instruct was already instruction-tuned, where the paper fine-tunes the "
           "pretrained base (Qwen2-VL-2B), so every method starts past part of what it is "
           "compared on")
  else:
    why = ("its instruction data already held VQAv2, GQA, OCRVQA, RefCOCO and ShareGPT, so STL, "
           "EW and VisATB all start past the tasks they are compared on; the paper starts from "
           "CLIP ViT-L/14-336, Vicuna-v1.5 and the stage-1 projector (model.vision_path, "
           "model.text_path, model.projector_path)")
  # Attributed to the field rather than to a line of this file, so that Python shows it as one
  # line ("config.model.path:1: InstructionTunedStartWarning: ..."), not two.
  warnings.warn_explicit(f"{path} is {what}: {why}", InstructionTunedStartWarning,
                         "config.model.path", 1, registry=_SHOWN)


def _check_parts(parts: Mapping[str, str], data: Mapping[str, Any]) -> None:
  """The three part paths of a composed model: each readable (config.json, weight files, torch
  for a .bin), and a tokenizer with <image> named, since the language model's has none."""
  from visatb_jax.model import hf_io  # pylint: disable=g-import-not-at-top
  checks = {"vision_path": hf_io.check_vision_part, "text_path": hf_io.check_text_part,
            "projector_path": hf_io.check_projector_part}
  for field, check in checks.items():
    try:
      check(parts[field])
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.model.{field}: {_one_line(e)}") from None
  if data.get("source") == "llava_json" and not data.get("tokenizer"):
    raise ConfigError("config.data.tokenizer is empty: a model composed from parts needs a "
                      "tokenizer directory with <image> (the language model's tokenizer plus "
                      "<image>, as llava-hf's; README, \"Starting from the official parts\")")


def _check_family_template(section: Mapping[str, Any], data: Mapping[str, Any]) -> None:
  """Qwen2-VL reads images only inside <|vision_start|> ... <|vision_end|> blocks of
  <|image_pad|> tokens, which the `qwen2vl` template writes; LLaVA knows none of them."""
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  try:
    family = factory.family(section)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  name = _get(data, "template", template_lib.DEFAULT_TEMPLATE)
  if (family == factory.QWEN2_VL) != (name == QWEN2VL_TEMPLATE):
    what = "a Qwen2-VL model" if family == factory.QWEN2_VL else "a LLaVA model"
    want = (f"'{QWEN2VL_TEMPLATE}'" if family == factory.QWEN2_VL else
            f"one of {sorted(set(template_lib.TEMPLATES) - {QWEN2VL_TEMPLATE})}")
    raise ConfigError(f"config.data.template={name!r} does not fit {what} (config.model): "
                      f"use {want}")
  for key in ("min_pixels", "max_pixels"):
    if data.get(key) is not None:
      _number(f"data.{key}", data[key], kind=int, minimum=1)
  if (data.get("min_pixels") or 0) > (data.get("max_pixels") or float("inf")):
    raise ConfigError(f"config.data.min_pixels={data['min_pixels']} is above "
                      f"config.data.max_pixels={data['max_pixels']}")


def _check_model(section: Mapping[str, Any], data: Mapping[str, Any]) -> None:
  """Where the initial model comes from: `model.path`, or all three part paths, or neither
  (random init); the files are checked now, not after the data stage."""
  if not any(section.get(k) for k in ("path", "vision_path", "text_path", "projector_path")):
    _check_family_template(section, data)
    return  # A random init: nothing more to check.
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  try:
    parts = factory.model_parts(section)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if parts is not None:
    _check_parts(parts, data)
  elif section.get("path"):
    tokenizer_here = data.get("source") == "llava_json" and not data.get("tokenizer")
    path = os.path.expanduser(str(section["path"]))
    _check_checkpoint(path, tokenizer_here)
    _warn_instruction_tuned(path)
  _check_family_template(section, data)


def _model_section(section: Mapping[str, Any]) -> dict[str, Any]:
  """The model section as hashed: empty part paths left out, so that declaring them in a config
  changes no existing run's stage hashes."""
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  return {k: v for k, v in section.items() if v or k not in factory.PART_FIELDS}


PRETRAIN_TRAINS = ("projector", "projector+lm")


def _pretrain(section: Mapping[str, Any] | None, data: Mapping[str, Any]) -> dict | None:
  """The pretrain stage's settings with defaults, or None when it is not configured.

  `tasks`: {task: samples} of a generated split of the built-in benchmark (its own images, none
  shared with the task splits); or `files`: LLaVA JSON files for a `llava_json` source.
  `trains`: "projector" (LLaVA's stage-1 alignment) or "projector+lm" (also the language model,
  standing in for a pretrained LM). `epochs`, `lr`, `batch_size` (samples per step, as
  train.batch_size; default: train.batch_size).
  `enabled=False` turns the stage off (`--config.pretrain.enabled=false`).
  """
  if not section or not section.get("enabled", True):
    return None
  section = {k: v for k, v in section.items() if k != "enabled"}
  out = {"tasks": dict(section.get("tasks") or {}), "files": list(section.get("files") or []),
         "trains": section.get("trains") or "projector+lm",
         "epochs": section.get("epochs", 1.0), "lr": section.get("lr"),
         "batch_size": section.get("batch_size")}
  unknown = sorted(set(section) - set(out))
  if unknown:
    raise ConfigError(f"config.pretrain has unknown field(s) {unknown}; fields: {sorted(out)}")
  _choice("pretrain.trains", out["trains"], PRETRAIN_TRAINS)
  _number("pretrain.epochs", out["epochs"], minimum=0.0, exclusive=True)
  if out["lr"] is None:
    raise ConfigError("config.pretrain.lr is required (the pretraining learning rate)")
  _number("pretrain.lr", out["lr"], minimum=0.0, exclusive=True)
  if out["batch_size"] is not None:
    _number("pretrain.batch_size", out["batch_size"], kind=int, minimum=1)
  if data.get("source") == "shapes":
    from visatb_jax.data import shapes  # pylint: disable=g-import-not-at-top
    if not out["tasks"] or out["files"]:
      raise ConfigError("config.pretrain: the shapes source pretrains on generated samples: set "
                        "pretrain.tasks = {task: samples}, not pretrain.files")
    for task, count in out["tasks"].items():
      if task not in shapes.TASKS:
        raise ConfigError(f"config.pretrain.tasks: unknown task {task!r} for the shapes benchmark "
                          f"(it has {list(shapes.TASKS)})")
      _number(f"pretrain.tasks.{task}", count, kind=int, minimum=1)
  elif not out["files"] or out["tasks"]:
    raise ConfigError("config.pretrain: a llava_json source pretrains on files: set "
                      "pretrain.files = [path, ...], not pretrain.tasks")
  return out


def _check_mesh(mesh: Mapping[str, Any] | None, num_devices: int | None) -> None:
  if not mesh:
    return
  unknown = sorted(set(mesh) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {unknown}; axes: {list(MESH_AXES)}")
  for axis, size in mesh.items():
    if size != -1:
      _number(f"mesh.{axis}", size, kind=int, minimum=1)
  if num_devices is not None:
    from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
    try:
      sharding.mesh_shape(mesh, num_devices)
    except ValueError as e:
      raise ConfigError(f"config.mesh: {e}") from None


def _check_gradient_memory(raw: Mapping[str, Any], methods: Sequence[str],
                           num_devices: int | None) -> None:
  """A gradient method whose per-task gradients and model state cannot fit one device of the
  mesh is refused here, before any stage (train/gradmtl_step.py, `check_memory`)."""
  gradient = [m for m in methods if methods_lib.get(m).kind == "gradient"]
  if not gradient or num_devices is None:
    return
  from visatb_jax.train import gradmtl_step  # pylint: disable=g-import-not-at-top
  try:
    counts = gradmtl_step.parameter_counts(raw["model"], raw["train"])
  except (OSError, ValueError, KeyError, TypeError):
    return  # a model that cannot be sized is reported by the model's own checks and stages
  for method in gradient:
    where = "config.weighting" if method == _get(raw, "weighting", "visatb") else "config.baselines"
    try:
      gradmtl_step.check_memory([method], num_tasks=len(raw["task_order"]),
                                num_devices=num_devices, mesh_config=raw.get("mesh"),
                                counts=counts)
    except ValueError as e:
      raise ConfigError(f"{where}: {e}") from None


def build(config: Any, *, num_devices: int | None = None) -> RunConfig:
  """The checked RunConfig of a config file's ConfigDict (or a plain dict of the same shape).

  `num_devices`: check that the mesh divides them (None: not checked).

  Raises:
    ConfigError: one line naming the field and what is wrong with it.
  """
  raw = plain(config)
  for key in ("tasks", "task_order", "data", "model", "train", "prep", "eval"):
    if key not in raw:
      raise ConfigError(f"config.{key} is missing")
  methods, options = _methods(raw, len(raw["task_order"]))
  needs_balance = any(methods_lib.get(m).needs_balance for m in methods)
  plan = _task_plan(raw["tasks"], raw["task_order"], needs_balance)
  balance = _balance(raw.get("balance") or {})
  epochs = _check_train(raw["train"])
  _check_data(raw["data"], plan)
  _check_model(raw["model"], raw["data"])
  _check_prep(raw["prep"])
  for key in ("batch_size", "max_new_tokens"):
    _number(f"eval.{key}", raw["eval"].get(key), kind=int, minimum=1)
  _check_mesh(raw.get("mesh"), num_devices)
  _check_gradient_memory(raw, methods, num_devices)
  pretrain = _pretrain(raw.get("pretrain"), raw["data"])
  zero_shot_section, zero_shot_skipped = _rooted_zero_shot(raw)
  if zero_shot_skipped:  # still checked, so that a mistake in the suite shows before its root
    _zero_shot(raw["zero_shot"], plan, raw["data"])
  zero_shot = _zero_shot(zero_shot_section, plan, raw["data"])
  sections = {
      "name": str(raw.get("name") or "run"),
      "seed": _number("seed", _get(raw, "seed", 0), kind=int),
      "tasks": {"tasks": _tasks_section(raw["tasks"]), "task_order": list(raw["task_order"])},
      "data": raw["data"], "model": _model_section(raw["model"]), "mesh": raw.get("mesh"),
      "train": raw["train"], "prep": raw["prep"], "pretrain": pretrain,
      "eval": _eval_section(raw["eval"], raw["tasks"], raw["task_order"]),
      "balance": dataclasses.asdict(balance),
      "methods": {"methods": list(methods), "options": options},
      "zero_shot": zero_shot,
  }
  if zero_shot_skipped:  # read by the report alone (config.json); no stage hashes it
    sections["zero_shot_skipped"] = zero_shot_skipped
  return RunConfig(name=sections["name"], seed=sections["seed"], tasks=plan, balance=balance,
                   methods=methods, method_options=options, train_epochs=epochs,
                   sections=sections,
                   zero_shot={n: ZeroShotTask.from_entry(n, e) for n, e in zero_shot.items()})
