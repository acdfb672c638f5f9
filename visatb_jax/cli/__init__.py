"""The command lines: launch, evaluate, balance, report, dryrun (`python -m visatb_jax.launch`
etc.)."""

import os

# transformers says "PyTorch was not found. Models won't be available..." when it is imported
# without torch, which this JAX package never needs; that is its only advisory warning
# (`logger.warning_advice`), and TRANSFORMERS_NO_ADVISORY_WARNINGS silences exactly those. Set
# here, in the package of every command, before anything imports transformers, and only when the
# user has not set it: a command may set the process's environment, the library does not.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
