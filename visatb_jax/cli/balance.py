"""Command line: VisATB task weights from a scores file.

    python -m visatb_jax.balance SCORES.json [--form real|precise|base] [--temperature 0.5|auto]
        [--alpha 0.25,0.25,0.5] [--fixed sharegpt=1.0 ...] [--groups GROUPS.json]
        [--tasks a,b,c] [--on-degenerate error|warn] [--json]

SCORES.json is the scores pytree `{model_name: {task: score}}` (see `visatb_jax.balancing`);
GROUPS.json maps task -> group. Prints a table (one row per task: C_out, C_in, D, λ_out, λ_in, λ_D,
λ, and the T used) or, with `--json`, the `balance_report` dict. Any malformed input is reported as
one line `error: FILE: problem` on stderr with exit status 2. A task that did not improve with its
own data (or a non-positive difficulty denominator) is such an error by default; with
`--on-degenerate warn` it is masked instead (see `visatb_jax.balancing`) and reported as one line
`warning: FILE: problem` per task on stderr, the output then following with exit status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2


class InputError(Exception):
  """A problem with the user's input, printed as one line."""


class _Parser(argparse.ArgumentParser):
  """argparse that reports a usage error as a single line (and exit status 2)."""

  def error(self, message: str) -> NoReturn:
    raise InputError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m visatb_jax.balance",
              description="VisATB task weights (lambda) from a validation-scores file.")
  p.add_argument("scores", metavar="SCORES.json", help="{model_name: {task: score}}")
  p.add_argument("--form", default="real", choices=("real", "precise", "base"),
                 help="real (default), precise or base")
  p.add_argument("--temperature", default="0.5", help="T > 0 or 'auto' (default 0.5)")
  p.add_argument("--alpha", default="0.25,0.25,0.5",
                 help="alpha_out,alpha_in,alpha_D, summing to 1 (default 0.25,0.25,0.5)")
  p.add_argument("--fixed", nargs="+", action="extend", default=[], metavar="TASK=WEIGHT",
                 help="tasks kept out of the balancing with a fixed weight, e.g. sharegpt=1.0")
  p.add_argument("--groups", metavar="GROUPS.json", help="{task: group}: balance per group")
  p.add_argument("--tasks", help="comma-separated task order (default: the tasks of model "
                 "'mini', or of the first model); fixed tasks are appended when absent")
  p.add_argument("--on-degenerate", default="error", choices=("error", "warn"),
                 help="a task that did not improve with its own data (or a difficulty "
                 "denominator <= 0): error (default) stops; warn sets its contributions "
                 "C[i->task] (or its D) to 0 and prints a warning")
  p.add_argument("--json", action="store_true", help="print the balance report as JSON")
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
               fixed: Mapping[str, float]) -> list[str]:
  if args.tasks is not None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
      raise InputError("--tasks: expected a comma-separated list of tasks")
  else:
    tasks = _default_tasks(scores)
  return tasks + [t for t in fixed if t not in tasks]


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


# ----------------------------------------------------------------------------------------------


def _run(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)
  temperature = _parse_temperature(args.temperature)
  alpha = _parse_alpha(args.alpha)
  fixed = _parse_fixed(args.fixed)
  groups = _load_groups(args.groups) if args.groups is not None else None
  scores = _load_scores(args.scores)
  tasks = _task_list(args, scores, fixed)
  # Imported here so that argument and file errors are reported without loading jax.
  from visatb_jax.core import balancing
  for option, check, value in (("--temperature", balancing.check_temperature, temperature),
                               ("--alpha", balancing.check_alpha, alpha)):
    try:
      check(value)
    except ValueError as e:
      raise InputError(f"{option}: {e}") from None
  try:
    balancing.balanced_units(tasks, fixed, groups)
  except ValueError as e:
    raise InputError(f"{args.groups or args.scores}: {e}") from None
  try:
    # The degenerate-data warnings are printed below, one line each, from the report.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", balancing.DegenerateScoresWarning)
      report = balancing.balance_report(scores, tasks=tasks, form=args.form,
                                        temperature=temperature, alpha=alpha,
                                        fixed=fixed or None, groups=groups,
                                        on_degenerate=args.on_degenerate)
  except ValueError as e:
    raise InputError(f"{args.scores}: {e}") from None
  for message in report["warnings"]:
    print(f"warning: {args.scores}: {_one_line(message)}", file=sys.stderr)
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(format_report(report))
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
  sys.exit(main())


if __name__ == "__main__":
  run_cli()
