"""The command lines: launch, evaluate, balance, report, dryrun (`python -m visatb_jax.launch`
etc.)."""

import os

# transformers says "PyTorch was not found. Models won't be available..." when it is imported
# without torch, which this JAX package never needs; that is its only advisory warning
# (`logger.warning_advice`), and TRANSFORMERS_NO_ADVISORY_WARNINGS silences exactly those. Set
# here, in the package of every command, before anything imports transformers, and only when the
# user has not set it: a command may set the process's environment, the library does not.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# `--help` of every command: its own options, one line each (name, then a short help), so that a
# user sees what the command takes in one screen. absl's own listing wraps each flag over two or
# more lines and, for `python -m`, finds no flag of the main module at all.
HELP_REQUESTS = ("-h", "-?", "--help", "--helpshort")
HELP_WIDTH = 100  # every line of a listing fits this many columns (tests/cli/test_help.py)
_HELP_COLUMN = 26  # where the help text starts; a longer name pushes only its own line


def option_lines(rows) -> str:
  """`(name, help)` rows as aligned lines: `  --name=VALUE   help`."""
  column = max((len(name) for name, _ in rows if len(name) <= _HELP_COLUMN), default=0)
  return "\n".join(f"  {name.ljust(column)}  {text}".rstrip() for name, text in rows)


def absl_option_rows(flag_values, metavars):
  """`(name, help)` of the absl flags named in `metavars` ({flag: VALUE name}), in that order.

  A boolean is `--[no]name`, an enum `--name={a,b}`; a default the help does not state is added.
  """
  rows = []
  for name, metavar in metavars.items():
    flag = flag_values[name]
    choices = getattr(flag.parser, "enum_values", None)
    if flag.boolean:
      spelled = f"--[no]{name}"
    else:
      spelled = f"--{name}={{{','.join(choices)}}}" if choices else f"--{name}={metavar}"
    default = ",".join(flag.default) if isinstance(flag.default, list) else flag.default
    text = flag.help
    if choices and text.startswith("<"):  # absl prefixes an enum's help with `<a|b>: `
      text = text.partition(">: ")[2] or text
    if default not in (None, False, "", 0) and "default" not in text:
      text += f" (default {default})"
    rows.append((spelled, text))
  return rows
