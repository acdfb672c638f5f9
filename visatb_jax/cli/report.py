"""Command line: rebuild a run's report (report.md, comparison.json, plots) from its directory.

  python -m visatb_jax.report WORKDIR [--title TITLE]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from visatb_jax.pipeline import report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m visatb_jax.report", description="Regenerate a run's report.md and plots.")
  parser.add_argument("workdir", help="run directory written by the pipeline")
  parser.add_argument("--title", default="VisATB run", help="report title")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    print(f"error: run directory {args.workdir!r} does not exist", file=sys.stderr)
    return 2
  try:
    path = report.write_report(args.workdir, title=args.title)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


def run_cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run_cli()
