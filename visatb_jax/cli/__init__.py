"""The command lines: launch, balance, report, dryrun (`python -m visatb_jax.launch` etc.)."""
