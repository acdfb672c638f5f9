"""`python -m visatb_jax.launch`: see visatb_jax/cli/launch.py."""

from visatb_jax.cli.launch import run_cli

if __name__ == "__main__":
  run_cli()
