"""visatb_jax: multi-task visual instruction tuning with adaptive task balancing (VisATB)."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy so that `import visatb_jax` stays cheap for the CLI and does not import jax eagerly.
  if name in ("compute_lambda", "balance_report", "lambda_from_components"):
    from visatb_jax.core import balancing
    return getattr(balancing, name)
  if name == "bootstrap_report":
    from visatb_jax.core import bootstrap
    return bootstrap.bootstrap_report
  raise AttributeError(f"module 'visatb_jax' has no attribute {name!r}")
