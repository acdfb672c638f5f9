"""`python -m visatb_jax.evaluate`: see visatb_jax/cli/evaluate.py."""

from visatb_jax.cli.evaluate import run_cli

if __name__ == "__main__":
  run_cli()
