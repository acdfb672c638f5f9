"""The command lines: launch, evaluate, balance, report, dryrun (`python -m visatb_jax.launch`
etc.)."""
