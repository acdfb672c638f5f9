"""Command line: VisATB task weights from a scores file, or from per-sample scores with intervals.

    python -m visatb_jax.balance SCORES.json [--form real|precise|base] [--temperature 0.5|auto]
        [--alpha 0.25,0.25,0.5] [--fixed sharegpt=1.0 ...] [--groups GROUPS.json]
        [--tasks a,b,c] [--on-degenerate error|warn] [--drop UNIT ...] [--json]
    python -m visatb_jax.balance --samples PER_SAMPLE.json [PER_SAMPLE.json ...] [the same options]
        [--resamples 1000] [--seed 0] [--level 0.9] [--shrinkage none|evidence] [--wide]
    python -m visatb_jax.balance --run WORKDIR [--json] [--wide]

`--run WORKDIR` recomputes a pipeline run's lambda.json from its scores/validation_samples.json
with the settings its config.json records (tasks, fixed weights, groups, balance.*, the seed), by
the lambda stage's own code: the same numbers, to the last digit. Other options are refused with
it, since they would make it disagree with the run.

SCORES.json is the scores pytree `{model_name: {task: score}}` (see `visatb_jax.core.balancing`);
GROUPS.json maps task -> group. Prints a table (one row per task: C_out, C_in, D, λ_out, λ_in, λ_D,
λ, and the T used) or, with `--json`, the `balance_report` dict.

PER_SAMPLE.json, as the pipeline writes it, holds each validation sample's own score,
`{model_name: {task: {sample_id: score}}}`; every model must be scored on the same sample ids of a
task (they are paired by id, in sorted order). The values are then those of the per-sample means,
with a paired-bootstrap percentile interval `[lo, hi]` (`--resamples`, `--seed`, `--level`; see
`visatb_jax.core.bootstrap`). The table fits 100 columns: λ with its interval, then the plain
own-data "gain", C_out, C_in and D; `--wide` prints every component (also λ_out, λ_in, λ_D), each
as `value [lo, hi]` (~200 columns). `--json` prints the `bootstrap_report` dict. A unit whose
gain interval contains 0 is listed as a `warning:` line on stderr: its column of C is noise, and
`--drop UNIT` leaves it out of C_out/C_in.

Preparation replicates (docs/method.md §13): several PER_SAMPLE.json files are the replicates of
the same preparation models, one file per replicate (`bootstrap.stack_replicates`: they must
agree on models, tasks and sample ids); a single file may also hold them as lists,
`{sample_id: [score per replicate]}`. The bootstrap is then two-level (replicates, then samples)
and the table prints each λ's training share: the part of its bootstrap variance that is between
replicates (near 1: more replicates would narrow it; near 0: more validation samples would).
`--shrinkage evidence` shrinks each λ component toward its mean over the units by its bootstrap
z-score before the softmax (docs/method.md §14); the default `none` is the paper's λ.
With `--temperature auto`, a λ left on a bound of [0.5, 2] is reported as a `warning:` line (in
the table output; with `--json` under "warnings" and "at_bound").

Any malformed input is reported as one line `error: FILE: problem` (or `error: --option: problem`)
on stderr with exit status 2; so is a `--fixed` task that no model scores, unless `--tasks` lists
it. A task that did not improve with its own data (or a non-positive difficulty denominator) is
such an error by default; with `--on-degenerate warn` it is masked instead (see
`visatb_jax.core.balancing`) and reported as one line `warning: FILE: problem` per task on
stderr, the output then following with exit status 0. When stdout is closed early (`| head`), the
command stops quietly with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from visatb_jax.core.options import FORMS, ON_DEGENERATE, SHRINKAGE

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 1  # as Python itself on EPIPE
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.9


class InputError(Exception):
  """A problem with the user's input, printed as one line."""


_USAGE = """\
usage: python -m visatb_jax.balance SCORES.json [options]
       python -m visatb_jax.balance --samples PER_SAMPLE.json ... [options]
       python -m visatb_jax.balance --run WORKDIR [--json] [--wide]"""

_NOTES = """\
notes:
  --run recomputes a run's lambda.json from its scores/validation_samples.json with the
  settings of its config.json, by the lambda stage's own code: the same numbers to the last
  digit; other options are refused with it, since they would make it disagree with the run.
  Several PER_SAMPLE.json files are the replicates of the same preparation models (one per
  training seed); a score may also be a list, one per replicate. The table then gives each
  lambda's training share ("train": the part of its variance between replicates).
  --shrinkage evidence shrinks each component (C_out, C_in, D) toward its mean over the tasks by
  its bootstrap z-score, so that a weight is no further from 1 than the evidence
  (docs/method.md §14). Details: the docstring of visatb_jax/cli/balance.py."""


class _Parser(argparse.ArgumentParser):
  """argparse that reports a usage error as a single line (and exit status 2), and lists its
  options one line each in --help, as launch and evaluate do."""

  listed: Sequence[argparse.Action] = ()  # set by _parser()

  def error(self, message: str) -> NoReturn:
    raise InputError(message)

  def format_help(self) -> str:
    from visatb_jax import cli  # pylint: disable=g-import-not-at-top
    rows = [(_invocation(a), a.help) for a in self.listed]
    return (f"{_USAGE}\n\n{self.description}\n\noptions:\n{cli.option_lines(rows)}\n\n"
            f"{_NOTES}\n")


def _invocation(action: argparse.Action) -> str:
  """`--samples PER_SAMPLE.json ...`, `--form {real,precise,base}`, `SCORES.json`, `--json`."""
  if action.nargs == 0:
    return ", ".join(action.option_strings)
  if action.choices:
    value = "{" + ",".join(action.choices) + "}"
  else:
    value = action.metavar or action.dest.upper()
  if action.nargs in ("+", "*"):
    value += " ..."
  return " ".join([*action.option_strings, value])


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m visatb_jax.balance", add_help=False,
              description="VisATB task weights (lambda) from the validation scores of the "
              "preparation models:\nC, D and lambda per task, as a table (or --json).")
  add = p.add_argument
  # Each help is one short line (tests/cli/test_help.py); the longer story is in _NOTES.
  p.listed = [
      add("scores", metavar="SCORES.json", nargs="?",
          help="{model: {task: score}} (or give --samples or --run instead)"),
      add("-h", "--help", action="help", help="show this help and exit"),
      add("--run", metavar="WORKDIR",
          help="a run directory: its lambda.json again, from its own files"),
      add("--samples", metavar="PER_SAMPLE.json", nargs="+",
          help="{model: {task: {id: score}}}, one file per replicate: intervals"),
      add("--form", default="real", choices=FORMS,
          help="the form of lambda, docs/method.md (default real)"),
      add("--temperature", default="0.5", metavar="T", help="T > 0 or auto (default 0.5)"),
      add("--alpha", default="0.25,0.25,0.5", metavar="A_OUT,A_IN,A_D",
          help="summing to 1 (default 0.25,0.25,0.5)"),
      add("--fixed", nargs="+", action="extend", default=[], metavar="TASK=WEIGHT",
          help="tasks kept out of the balancing at a fixed weight, e.g. sharegpt=1.0"),
      add("--groups", metavar="GROUPS.json", help="{task: group}: balance per group"),
      add("--tasks", metavar="A,B,C",
          help="task order (default: those of model 'mini'); fixed tasks are appended"),
      add("--on-degenerate", default="error", choices=ON_DEGENERATE,
          help="a task's own data gave no gain: error (default), or warn and mask"),
      add("--drop", nargs="+", action="extend", default=[], metavar="UNIT",
          help="tasks (or groups) whose column of C is left out of C_out and C_in"),
      add("--resamples", type=int, metavar="R",
          help=f"bootstrap resamples, with --samples (default {DEFAULT_RESAMPLES})"),
      add("--seed", type=int, metavar="N", help="bootstrap seed, with --samples (default 0)"),
      add("--level", type=float, metavar="L",
          help=f"interval coverage in (0, 1), with --samples (default {DEFAULT_LEVEL})"),
      add("--shrinkage", choices=SHRINKAGE,
          help="with --samples: none (default: the paper's lambda) or evidence"),
      add("--json", action="store_true", help="print the report as JSON"),
      add("--wide", action="store_true",
          help="with intervals: every component and its interval (~200 columns)"),
  ]
  return p


# ----------------------------------------------------------------------------------------------
# Parsing the arguments and files.


def _load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise InputError(f"{path}: is a directory") from None
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except OSError as e:
    raise InputError(f"{path}: {e.strerror or e}") from None


def _load_scores(path: str) -> dict[str, Any]:
  scores = _load_json(path)
  if not isinstance(scores, dict) or not scores:
    raise InputError(f"{path}: expected a non-empty object {{model: {{task: score}}}}")
  for model, row in scores.items():
    if not isinstance(row, dict):
      raise InputError(f"{path}: model {model!r} must map task -> score, got "
                       f"{type(row).__name__}")
  return scores


def _read_per_sample(path: str) -> dict[str, Any]:
  """One `{model: {task: {sample_id: score | [score per replicate]}}}` file, checked."""
  data = _load_json(path)
  if not isinstance(data, dict) or not data:
    raise InputError(f"{path}: expected a non-empty object {{model: {{task: {{sample_id: "
                     "score}}}}")
  for model, row in data.items():
    if not isinstance(row, dict):
      raise InputError(f"{path}: model {model!r} must map task -> {{sample_id: score}}, got "
                       f"{type(row).__name__}")
    for task, per in row.items():
      if not isinstance(per, dict) or not per:
        raise InputError(f"{path}: model {model!r}, task {task!r}: expected a non-empty object "
                         "{sample_id: score}")
      for sample_id, value in per.items():
        if isinstance(value, list):
          for v in value:
            _check_sample(v, model, task, sample_id, path)
        else:
          _check_sample(value, model, task, sample_id, path)
  return data


def _load_per_sample(paths: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
  """The files (one per replicate) as `{model: {task: [n] or [R, n] by sorted sample id]}}`.

  Raises:
    InputError: malformed file, a score that is not a finite number, files that disagree on
      models, tasks or sample ids, models disagreeing on a task's sample ids, or replicate lists
      of different lengths.
  """
  files = [_read_per_sample(path) for path in paths]
  from visatb_jax.core import bootstrap  # pylint: disable=g-import-not-at-top  (jax)
  where = _samples_label(paths)
  try:
    data = files[0] if len(files) == 1 else bootstrap.stack_replicates(files, names=paths)
    aligned = bootstrap.align_by_id(data)
  except ValueError as e:
    raise InputError(f"{where}: {e}") from None

  def floats(values: list[Any]) -> list[Any]:
    return [floats(v) if isinstance(v, list) else float(v) for v in values]
  return {m: {t: floats(vs) for t, vs in row.items()} for m, row in aligned.items()}


def _samples_label(paths: Sequence[str]) -> str:
  """How error lines name the per-sample input: the file, or the files, comma-separated."""
  return ", ".join(paths)


def _check_sample(value: Any, model: str, task: str, sample_id: str, path: str) -> None:
  where = f"{path}: model {model!r}, task {task!r}, sample {sample_id!r}"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise InputError(f"{where}: score is not a number: {value!r}")
  if not math.isfinite(value):
    raise InputError(f"{where}: score is not finite: {value!r}")


def _load_groups(path: str) -> dict[str, str]:
  groups = _load_json(path)
  if not isinstance(groups, dict):
    raise InputError(f"{path}: expected an object {{task: group}}")
  for task, group in groups.items():
    if not isinstance(group, str):
      raise InputError(f"{path}: group of task {task!r} must be a string, got {group!r}")
  return groups


def _parse_temperature(text: str) -> float | str:
  if text == "auto":
    return text
  try:
    return float(text)
  except ValueError:
    raise InputError(f"--temperature: expected a number or 'auto', got {text!r}") from None


def _parse_alpha(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(a) for a in text.split(","))
  except ValueError:
    raise InputError(f"--alpha: expected three comma-separated numbers, got {text!r}") from None


def _parse_fixed(items: Sequence[str]) -> dict[str, float]:
  fixed = {}
  for item in items:
    task, sep, weight = item.partition("=")
    try:
      if not sep or not task:
        raise ValueError
      fixed[task] = float(weight)
    except ValueError:
      raise InputError(f"--fixed: expected TASK=WEIGHT, got {item!r}") from None
    if not (math.isfinite(fixed[task]) and fixed[task] >= 0):
      raise InputError(f"--fixed: the weight of {task!r} must be finite and >= 0, got {weight!r}")
  return fixed


def _default_tasks(scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The tasks of model 'mini' (or of the first model), in file order."""
  row = scores.get("mini", next(iter(scores.values())))
  return list(row)


def _task_list(args: argparse.Namespace, scores: Mapping[str, Any],
               fixed: Mapping[str, float], path: str) -> list[str]:
  """The task order; fixed tasks are appended, and must be scored or listed in --tasks."""
  if args.tasks is not None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
      raise InputError("--tasks: expected a comma-separated list of tasks")
  else:
    tasks = _default_tasks(scores)
  scored = {t for row in scores.values() for t in row}
  # A fixed task needs no scores, but one that nothing names is most likely a typo.
  unknown = [t for t in fixed if t not in scored and t not in tasks]
  if unknown:
    raise InputError(f"--fixed: {', '.join(repr(t) for t in unknown)}: no model in {path} scores "
                     f"{'this task' if len(unknown) == 1 else 'these tasks'}; list it in --tasks "
                     "to weight a task without scores")
  return tasks + [t for t in fixed if t not in tasks]


def _bootstrap_options(args: argparse.Namespace) -> dict[str, Any]:
  """--resamples/--seed/--level/--shrinkage, checked; they only make sense with --samples."""
  given = [f"--{k}" for k in ("resamples", "seed", "level", "shrinkage")
           if getattr(args, k) is not None]
  if args.samples is None:
    if given:
      raise InputError(f"{given[0]}: only with --samples PER_SAMPLE.json")
    return {}
  resamples = DEFAULT_RESAMPLES if args.resamples is None else args.resamples
  seed = 0 if args.seed is None else args.seed
  level = DEFAULT_LEVEL if args.level is None else args.level
  if resamples < 1:
    raise InputError(f"--resamples: expected an integer >= 1, got {resamples}")
  if seed < 0:
    raise InputError(f"--seed: expected an integer >= 0, got {seed}")
  if not 0 < level < 1:
    raise InputError(f"--level: expected a number in (0, 1), e.g. 0.9, got {level:g}")
  if args.shrinkage == "evidence" and resamples < 2:
    raise InputError(f"--shrinkage: evidence needs --resamples >= 2, got {resamples}")
  return {"resamples": resamples, "seed": seed, "level": level,
          "shrinkage": args.shrinkage or "none"}


# ----------------------------------------------------------------------------------------------
# Output.


def _fmt(v: float | None) -> str:
  return "-" if v is None else f"{v:.4f}"


def _symbols(stream: Any) -> tuple[str, str]:
  """('λ', '→'), or ASCII stand-ins where the output stream cannot encode them."""
  try:
    "λ→".encode(getattr(stream, "encoding", None) or "ascii")
    return "λ", "→"
  except (UnicodeEncodeError, LookupError):
    return "lam", "->"


def _table(rows: Sequence[Sequence[str]]) -> str:
  """Rows as aligned columns: first column left-aligned, the rest right-aligned."""
  widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
  lines = []
  for r in rows:
    cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
    lines.append("  ".join(cells).rstrip())
  return "\n".join(lines)


def format_report(report: Mapping[str, Any], stream: Any = None) -> str:
  """The human-readable form of a balance report: settings, per-task table, C matrix."""
  lam, arrow = _symbols(stream or sys.stdout)
  groups = report["groups"] or {}
  fixed = report["fixed"]
  settings = (f"form={report['form']}  T={report['temperature']:.6g}  "
              f"alpha=({', '.join(f'{a:g}' for a in report['alpha'])})")
  header = ["task"] + (["group"] if groups else []) + [
      "C_out", "C_in", "D", f"{lam}_out", f"{lam}_in", f"{lam}_D", lam]
  rows = [header]
  for task in report["tasks"]:
    unit = groups.get(task) or task
    if task in fixed:
      values = [None] * 6 + [fixed[task]]
    else:
      values = [report[k][unit] for k in ("c_out", "c_in", "d", "lambda_out", "lambda_in",
                                           "lambda_d")] + [report["lambda"][task]]
    label = task + (" (fixed)" if task in fixed else "")
    rows.append([label] + ([groups.get(task) or "-"] if groups else []) + [_fmt(v) for v in values])
  units = report["balanced"]
  c_rows = [[f"C[i{arrow}j]"] + list(units)]
  c_rows += [[f"{u} {arrow}"] + [f"{v:.4f}" for v in row] for u, row in zip(units, report["C"])]
  c_title = "contributions (row = contributor i, column = receiver j):"
  return "\n\n".join([settings, _table(rows), c_title + "\n" + _table(c_rows)])


def _fmt_iv(value: float, interval: Sequence[float]) -> str:
  lo, hi = interval
  return f"{value:.4f} [{lo:.4f}, {hi:.4f}]"


_UNIT_COLUMNS = ("gain", "c_out", "c_in", "d", "lambda_out", "lambda_in", "lambda_d")


def _bootstrap_settings(report: Mapping[str, Any]) -> str:
  """`form=real  T=0.5  alpha=(0.25, 0.25, 0.5)`, with the drop and shrinkage when set."""
  iv = report["intervals"]
  boot = report["bootstrap"]
  t = f"{report['temperature']:.6g}"
  if iv["temperature"][0] != iv["temperature"][1]:
    t = _fmt_iv(report["temperature"], iv["temperature"])
  rule = boot.get("shrinkage", "none")
  return (f"form={report['form']}  T={t}  "
          f"alpha=({', '.join(f'{a:g}' for a in report['alpha'])})"
          + (f"  drop={','.join(boot['drop'])}" if boot["drop"] else "")
          + (f"  shrinkage={rule}" if rule != "none" else ""))


def format_bootstrap_report(report: Mapping[str, Any], stream: Any = None,
                            wide: bool = False) -> str:
  """The human-readable form of a bootstrap report.

  By default a table that fits 100 columns on up to about eight tasks: λ with its interval, its
  training share, and the plain values of the inputs that tell why (own-data gain, C_out, C_in,
  D); C without intervals. `wide` gives every component as `value [lo, hi]` (~200 columns).
  """
  lam, arrow = _symbols(stream or sys.stdout)
  groups = report["groups"] or {}
  fixed, iv = report["fixed"], report["intervals"]
  about, replicated = _bootstrap_about(report, lam)
  # With replicates, the share of each λ's variance that is between them (training).
  shares = report["variance"]["training_share"]["lambda"] if replicated else None

  def share(task: str) -> list[str]:
    if not shares:
      return []
    return ["-" if shares[task] is None else f"{100 * shares[task]:.0f}%"]

  def cells(task: str) -> list[str]:
    unit = groups.get(task) or task
    lam_cell = _fmt_iv(report["lambda"][task], iv["lambda"][task])
    if wide:
      inputs = (["-"] * len(_UNIT_COLUMNS) if task in fixed else
                [_fmt_iv(report[k][unit], iv[k][unit]) for k in _UNIT_COLUMNS])
      return inputs + [lam_cell] + share(task)
    if task in fixed:  # a fixed weight has no interval and no inputs
      return [_fmt(fixed[task])] + (["-"] if shares else []) + ["-"] * len(_NARROW_INPUTS)
    return [lam_cell] + share(task) + [_fmt(report[k][unit]) for k in _NARROW_INPUTS]

  if wide:
    header = ["gain", "C_out", "C_in", "D", f"{lam}_out", f"{lam}_in", f"{lam}_D", lam] + (
        ["train"] if shares else [])
  else:
    header = [f"{lam} [lo, hi]"] + (["train"] if shares else []) + ["gain", "C_out", "C_in", "D"]
  rows = [["task"] + (["group"] if groups else []) + header]
  for task in report["tasks"]:
    label = task + (" (fixed)" if task in fixed else "")
    rows.append([label] + ([groups.get(task) or "-"] if groups else []) + cells(task))
  units = report["balanced"]
  c_cell = _fmt_iv if wide else (lambda value, _: _fmt(value))
  c_rows = [[f"C[i{arrow}j]"] + list(units)]
  c_rows += [[f"{u} {arrow}"] + [c_cell(v, i) for v, i in zip(row, row_iv)]
             for u, row, row_iv in zip(units, report["C"], iv["C"])]
  c_title = "contributions (row = contributor i, column = receiver j):"
  blocks = [_bootstrap_settings(report) + "\n" + about, _table(rows),
            c_title + "\n" + _table(c_rows)]
  if report["bootstrap"].get("shrinkage", "none") == "evidence":
    blocks.append(_format_shrinkage(report["shrinkage"], units))
  if not wide:
    blocks.append(f"--wide: also {lam}_out, {lam}_in, {lam}_D, and every value with its interval")
  return "\n\n".join(blocks)


# The inputs the default table shows, plain, beside λ and its interval.
_NARROW_INPUTS = ("gain", "c_out", "c_in", "d")


def _bootstrap_about(report: Mapping[str, Any], lam: str) -> tuple[str, bool]:
  """The bootstrap's description in lines of at most 100 columns, and whether replicates were."""
  boot = report["bootstrap"]
  counts = sorted(set(boot["samples"].values()))
  samples = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  replicates = boot.get("replicates", 1)
  kind = (f"two-level paired bootstrap ({replicates} replicates, then samples)"
          if replicates > 1 else "paired bootstrap")
  # Short lines, so that none passes 100 columns whatever the counts and seed.
  lines = [f"{kind}: {boot['resamples']} resamples, seed {boot['seed']}",
           f"{boot['level']:g} percentile intervals [lo, hi] over {samples} samples per task"]
  if replicates > 1:
    lines.append(f"train = share of {lam}'s variance between replicates")
  return "\n".join(lines), replicates > 1


def _format_shrinkage(shrinkage: Mapping[str, Any], units: Sequence[str]) -> str:
  """Per unit and component: the shrinkage factor and the z-score it comes from."""
  def cell(comp: str, unit: str) -> str:
    factor = shrinkage["factor"][comp][unit]
    if shrinkage["sd"][comp][unit] is None:  # no evidence: the unit's gain is not clearly > 0
      return f"{factor:.2f} (gain not > 0)"
    z = shrinkage["z"][comp][unit]
    return f"{factor:.2f} (z={'inf' if z is None else f'{z:.2g}'})"

  rows = [["unit", "C_out", "C_in", "D"]]
  rows += [[u] + [cell(c, u) for c in ("c_out", "c_in", "d")] for u in units]
  title = ("evidence shrinkage toward the mean over units: factor max(0, 1 - 1/z^2) "
           "(1 = kept, 0 = the mean;\n'gain not > 0': a unit whose own-data gain interval is not "
           "above 0 gets the mean C_in and D):")
  return title + "\n" + _table(rows)


def _at_bound_message(report: Mapping[str, Any], balancing: Any) -> str | None:
  """The report's `TemperatureAtBoundWarning` text, or None when no unit is at a bound."""
  units = report.get("at_bound") or []
  if not units:
    return None
  groups = report["groups"] or {}
  lam = report["lambda"]
  weights = [next(lam[t] for t in report["tasks"] if (groups.get(t) or t) == u) for u in units]
  return balancing.at_bound_message(units, weights, report["temperature"],
                                    "group" if groups else "task")


def _noisy_warning(report: Mapping[str, Any], unit: str) -> str:
  """One line: a unit's own-data gain interval contains 0."""
  form = report["form"]
  own, ref = (unit, "base") if form == "base" else (f"{unit}+mini", "mini")
  kind = "group" if report["groups"] else "task"
  gain = _fmt_iv(report["gain"][unit], report["intervals"]["gain"][unit])
  return (f"{kind} {unit!r}: own-data gain V_{unit}({own}) - V_{unit}({ref}) = {gain} contains 0 "
          f"(level {report['bootstrap']['level']:g}): its column of C is noise; --drop {unit} "
          "leaves it out of C_out and C_in")


# ----------------------------------------------------------------------------------------------


def _from_run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
  """The lambda stage's report, recomputed from a run directory's files and config.json."""
  other = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in (
      "--run", "--json", "--wide")]
  if other or args.scores is not None:
    raise InputError(f"--run takes its settings from WORKDIR/config.json; drop "
                     f"{', '.join(other) or args.scores}")
  config_path = os.path.join(args.run, "config.json")
  samples_path = os.path.join(args.run, "scores", "validation_samples.json")
  config = _load_json(config_path)
  from visatb_jax.core import bootstrap  # pylint: disable=g-import-not-at-top  (jax)
  from visatb_jax.pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import stages  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline.errors import PipelineError  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline.tasks import TaskPlan  # pylint: disable=g-import-not-at-top
  try:
    plan = TaskPlan.from_config(config["tasks"], config["task_order"])
    fields = dict(config["balance"])
    fields["alpha"] = tuple(fields["alpha"])
    bal = config_lib.BalanceConfig(**fields)
    seed = int(config["seed"])
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"{config_path}: not a run config of this version ({e!r})") from None
  try:
    per_sample = bootstrap.align_by_id(_read_per_sample(samples_path))
  except ValueError as e:
    raise InputError(f"{samples_path}: {e}") from None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the report lists them; printed below, once
      return stages.balance_from_samples(per_sample, plan, bal, seed)
  except PipelineError as e:
    raise InputError(f"{samples_path}: {e}") from None


def _run(argv: Sequence[str] | None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  if args.run is not None:
    report = _from_run(args, argv)
    for message in report["warnings"]:
      print(f"warning: {args.run}: {_one_line(message)}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json
          else format_bootstrap_report(report, wide=args.wide))
    return 0
  if (args.scores is None) == (args.samples is None):
    raise InputError("expected SCORES.json or --samples PER_SAMPLE.json" if args.scores is None
                     else "give either SCORES.json or --samples PER_SAMPLE.json, not both")
  temperature = _parse_temperature(args.temperature)
  alpha = _parse_alpha(args.alpha)
  fixed = _parse_fixed(args.fixed)
  bootstrap_options = _bootstrap_options(args)
  groups = _load_groups(args.groups) if args.groups is not None else None
  path = args.scores if args.samples is None else _samples_label(args.samples)
  scores = _load_scores(path) if args.samples is None else _load_per_sample(args.samples)
  tasks = _task_list(args, scores, fixed, path)
  # Imported here so that argument and file errors are reported without loading jax.
  from visatb_jax.core import balancing
  for option, check, value in (("--temperature", balancing.check_temperature, temperature),
                               ("--alpha", balancing.check_alpha, alpha)):
    try:
      check(value)
    except ValueError as e:
      raise InputError(f"{option}: {e}") from None
  try:
    units = balancing.balanced_units(tasks, fixed, groups)
  except ValueError as e:
    raise InputError(f"{args.groups or path}: {e}") from None
  unknown = [u for u in dict.fromkeys(args.drop) if u not in units]
  if unknown:
    kind = "groups" if groups is not None else "tasks"
    raise InputError(f"--drop: {', '.join(repr(u) for u in unknown)} not among the balanced "
                     f"{kind} {units}")
  options = dict(tasks=tasks, form=args.form, temperature=temperature, alpha=alpha,
                 fixed=fixed or None, groups=groups, on_degenerate=args.on_degenerate,
                 drop=args.drop)
  try:
    # The degenerate-data warnings are printed below, one line each, from the report.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", balancing.DegenerateScoresWarning)
      warnings.simplefilter("ignore", balancing.TemperatureAtBoundWarning)
      if args.samples is None:
        report = balancing.balance_report(scores, **options)
      else:
        from visatb_jax.core import bootstrap
        report = bootstrap.bootstrap_report(scores, **options, **bootstrap_options)
  except ValueError as e:
    raise InputError(f"{path}: {e}") from None
  # The automatic T's bound message is data about the setting, listed in the JSON ("warnings",
  # "at_bound"); it is echoed on stderr with the table only.
  bound = _at_bound_message(report, balancing)
  for message in report["warnings"]:
    if message != bound or not args.json:
      print(f"warning: {path}: {_one_line(message)}", file=sys.stderr)
  if args.samples is not None:
    for unit in report["noisy"]:
      if unit not in args.drop:
        print(f"warning: {path}: {_noisy_warning(report, unit)}", file=sys.stderr)
  if args.json:
    print(json.dumps(report, indent=2))
  elif args.samples is None:
    print(format_report(report))
  else:
    print(format_bootstrap_report(report, wide=args.wide))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (0, or 2 after a one-line error on stderr)."""
  try:
    return _run(argv)
  except InputError as e:
    print(f"error: {_one_line(str(e))}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(text: str) -> str:
  return " ".join(text.split())


def run_cli() -> None:
  """The `python -m visatb_jax.balance` entry point: exits with main()'s status.

  A reader that stops early (`| head`) closes stdout: the command then exits quietly with
  status 1 instead of printing a BrokenPipeError traceback.
  """
  try:
    status = main()
    sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
  except BrokenPipeError:
    # Python would flush stdout again at exit and fail again: point it at /dev/null first.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    status = EXIT_BROKEN_PIPE
  sys.exit(status)


if __name__ == "__main__":
  run_cli()
