"""`python -m visatb_jax.balance`: see visatb_jax/cli/balance.py."""

from visatb_jax.cli.balance import run_cli

if __name__ == "__main__":
  run_cli()
