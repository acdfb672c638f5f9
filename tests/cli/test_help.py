"""`--help` of every command: its own options, one line each, in 100 columns (as a user runs it).

Each command runs in a subprocess, as `python -m ...`: absl's own help looks for the flags of
`__main__`, which is where a `python -m` listing used to come out empty. No jax compile: --help
returns before any config is loaded.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
from absl import flags

from visatb_jax import cli
from visatb_jax.cli import balance, evaluate, launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache  # each command's --help once per session: evaluate's imports take seconds
def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"visatb_jax.{module}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=240)


def _options(text: str) -> list[str]:
  """The lines of the help's `options:` block, up to the next blank line."""
  lines = text.splitlines()
  start = lines.index("options:") + 1
  end = lines.index("", start) if "" in lines[start:] else len(lines)
  return lines[start:end]


def _listed(options: list[str], spelled: str) -> list[str]:
  """The option lines that name `spelled` (`--workdir`, `--[no]overwrite`, `SCORES.json`)."""
  return [line for line in options
          if any(word.split("=")[0] == spelled for word in line.replace(",", " ").split()[:2])]


def _launch_flags() -> set[str]:
  return {f.name for f in flags.FLAGS.get_flags_for_module(launch)}


def _expected(module: str) -> list[str]:
  """Every option the command defines, spelled as its help spells it."""
  if module == "balance":
    parser = balance._parser()
    return [a.option_strings[-1] if a.option_strings else a.metavar for a in parser.listed]
  names = _launch_flags() if module == "launch" else set(evaluate._flags([])[0])
  spelled = []
  for name in sorted(names):
    if name == "dry_run":
      spelled.append("--dry-run")  # the spelling users expect (launch.rewrite_config_arg)
    elif name == "overwrite":
      spelled.append("--[no]overwrite")
    else:
      spelled.append(f"--{name}")
  return spelled + ["--help"]


@pytest.mark.parametrize("module", ["balance", "evaluate", "launch"])
def test_help_lists_every_option_on_one_line(module):
  res = _run(module, "--help")
  assert res.returncode == 0, res.stderr
  assert res.stderr == ""
  lines = res.stdout.splitlines()
  assert max(len(line) for line in lines) <= cli.HELP_WIDTH, max(lines, key=len)
  options = _options(res.stdout)
  for spelled in _expected(module):
    hits = _listed(options, spelled)
    assert len(hits) == 1, (spelled, options)
    # The option's own line says what it does: a name alone is no help.
    name_end = hits[0].index(spelled) + len(spelled)
    assert len(hits[0][name_end:].split()) >= 3, hits[0]
  # Nothing but options in the block: one line per option, none wrapped onto the next.
  assert all(line.startswith("  -") or line.startswith("  SCORES.json") for line in options)


def test_every_flag_has_a_value_name_in_the_listing():
  """A flag added without its VALUE name would be missing from --help (absl_option_rows)."""
  assert set(launch._METAVARS) == _launch_flags()
  assert set(evaluate._METAVARS) == set(evaluate._flags([])[0])


@pytest.mark.parametrize("module", ["balance", "evaluate", "launch"])
def test_helpfull_is_mentioned_exactly_where_it_adds_something(module):
  short = _run(module, "--help")
  full = _run(module, "--helpfull")
  adds = full.returncode == 0 and full.stdout != short.stdout
  assert ("--helpfull" in short.stdout) == adds, module
  if module == "launch":  # absl's own flags, which launch parses (app.run)
    assert adds and "--verbosity" in full.stdout and full.stdout.startswith(short.stdout.strip())
  elif module == "evaluate":  # takes no absl flags: the same listing, not an error
    assert full.returncode == 0 and full.stdout == short.stdout
  else:  # argparse: not an option, a one-line usage error
    assert full.returncode == 2 and full.stderr.startswith("error: ")


def test_option_lines_align_and_keep_long_names_on_their_line():
  text = cli.option_lines([("--a", "first"), ("--bb=N", "second"),
                           ("--" + "x" * 40, "third")])
  lines = text.splitlines()
  assert lines[0].index("first") == lines[1].index("second") == 2 + len("--bb=N") + 2
  assert lines[2] == "  --" + "x" * 40 + "  third"


def test_absl_option_rows_spell_booleans_enums_and_defaults():
  fv = flags.FlagValues()
  flags.DEFINE_bool("go", False, "start", flag_values=fv)
  flags.DEFINE_enum("split", "test", ("val", "test"), "which split", flag_values=fv)
  flags.DEFINE_list("stages", ["all"], "stages to run", flag_values=fv)
  flags.DEFINE_string("out", None, "output (default beside the model)", flag_values=fv)
  rows = cli.absl_option_rows(fv, {"go": "", "split": "", "stages": "A,B", "out": "FILE"})
  assert rows == [("--[no]go", "start"), ("--split={val,test}", "which split (default test)"),
                  ("--stages=A,B", "stages to run (default all)"),
                  ("--out=FILE", "output (default beside the model)")]

