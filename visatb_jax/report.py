"""`python -m visatb_jax.report`: see visatb_jax/cli/report.py."""

from visatb_jax.cli.report import run_cli

if __name__ == "__main__":
  run_cli()
