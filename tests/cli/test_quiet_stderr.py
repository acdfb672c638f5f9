"""The command lines say nothing on stderr that the project does not mean to say.

transformers, imported without torch (a fresh install of this JAX package), logs "PyTorch was not
found. Models won't be available..." as an advisory warning; the entry points silence it (and only
it) before transformers is imported, unless the user has set TRANSFORMERS_NO_ADVISORY_WARNINGS.
Each test runs a fresh interpreter in which torch cannot be imported (a sitecustomize sets
`sys.modules["torch"] = None`), as on an install without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADVISORY = "PyTorch was not found"
VARIABLE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
  """The environment of a Python without torch, with the variable unset."""
  site = tmp_path_factory.mktemp("no_torch")
  (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
  env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, "TRANSFORMERS_VERBOSITY")}
  env["PYTHONPATH"] = os.pathsep.join([str(site), REPO] + (
      [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
  return env


def _run(args, env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_transformers_gives_the_advisory_without_torch(no_torch_env):
  # The control: without the entry points' setting, the advisory is there to be silenced.
  res = _run(["-c", "import transformers"], no_torch_env)
  assert res.returncode == 0, res.stderr
  assert ADVISORY in res.stderr


@pytest.mark.parametrize("command", ["launch", "evaluate", "balance"])
def test_an_entry_point_silences_the_advisory(command, no_torch_env):
  res = _run(["-c", f"import visatb_jax.cli.{command}, transformers"], no_torch_env)
  assert res.returncode == 0, res.stderr
  assert ADVISORY not in res.stderr


def test_evaluate_help_prints_nothing_on_stderr(no_torch_env):
  # evaluate imports transformers as it starts, so even --help met the advisory.
  res = _run(["-m", "visatb_jax.evaluate", "--help"], no_torch_env)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip()
  assert res.stderr == ""


def test_a_user_setting_is_kept(no_torch_env):
  env = dict(no_torch_env, **{VARIABLE: ""})  # set, to "no": transformers gives its advice
  res = _run(["-c", "import os, visatb_jax.cli.launch, transformers; "
              f"print(repr(os.environ['{VARIABLE}']))"], env)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "''"
  assert ADVISORY in res.stderr


def test_importing_the_library_sets_nothing(no_torch_env):
  # Only the entry points set the variable; the library leaves the process's environment alone.
  res = _run(["-c", "import os, visatb_jax.pipeline.evaluation, visatb_jax.train.loop; "
              f"print('{VARIABLE}' in os.environ)"], no_torch_env)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "False"
