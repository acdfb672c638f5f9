"""The package's top level: what `dir`, `__all__` and attribute access show a user."""

import subprocess
import sys

import pytest

import visatb_jax
from visatb_jax.core import balancing, bootstrap


def test_dir_and_all_list_the_public_functions():
  public = {"compute_lambda", "balance_report", "lambda_from_components", "bootstrap_report"}
  assert public <= set(dir(visatb_jax))
  assert set(visatb_jax.__all__) == public


@pytest.mark.parametrize("name, module", [("compute_lambda", balancing),
                                          ("balance_report", balancing),
                                          ("lambda_from_components", balancing),
                                          ("bootstrap_report", bootstrap)])
def test_each_public_name_is_its_module_function(name, module):
  assert getattr(visatb_jax, name) is getattr(module, name)


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    visatb_jax.nope  # pylint: disable=pointless-statement


def test_import_does_not_import_jax():
  code = "import sys, visatb_jax; dir(visatb_jax); print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
