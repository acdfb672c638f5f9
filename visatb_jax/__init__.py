"""visatb_jax: multi-task visual instruction tuning with adaptive task balancing (VisATB).

The public functions, importable from here:

  compute_lambda          validation scores -> task weights λ (docs/method.md §3–5)
  balance_report          λ with every intermediate value (C, D, components, T)
  lambda_from_components  λ from precomputed C_out, C_in and D
  bootstrap_report        λ with two-level bootstrap intervals (docs/method.md §11, §13–14)

The whole pipeline runs from the command line: `python -m visatb_jax.launch --config FILE`.
"""

__version__ = "0.1.0"

# name -> module that defines it. Lazy, so that `import visatb_jax` stays cheap for the CLI and
# does not import jax eagerly.
_PUBLIC = {
    "compute_lambda": "visatb_jax.core.balancing",
    "balance_report": "visatb_jax.core.balancing",
    "lambda_from_components": "visatb_jax.core.balancing",
    "bootstrap_report": "visatb_jax.core.bootstrap",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'visatb_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))
