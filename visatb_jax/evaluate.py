"""`python -m visatb_jax.evaluate`: see visatb_jax/cli/evaluate.py."""

from visatb_jax.runtime import host_memory

if __name__ == "__main__":
  host_memory.reexec_with_huge_pages()  # first: it restarts the process (runtime/host_memory.py)
  from visatb_jax.cli.evaluate import run_cli  # pylint: disable=g-import-not-at-top
  run_cli()
