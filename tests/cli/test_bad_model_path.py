"""A bad `model.path` is one line `error: ...` naming the path, exit code 2, before any stage.

Each case runs `python -m visatb_jax.launch` with the micro config of tests/conftest.py pointed at a
broken checkpoint directory, on a copy of a run directory whose data stage is done, and checks the
exit code, that stderr is exactly one line naming the path and what is wrong, and that the files
already in the run directory are unchanged (issue #17), with the checks of tests/cli/one_line.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from one_line import error_line as _error_line
from one_line import snapshot as _snapshot

TESTS = os.path.join(REPO, "tests")
EXIT_ERROR = 2


def _write_config(directory, model_path: str | None, **data) -> str:
  """A config file: conftest's micro config with `model.path` and `data` fields set."""
  lines = [f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import micro_config\n\n",
           "def get_config():\n  c = micro_config()\n"]
  if model_path is not None:
    lines.append(f"  c.model.path = {model_path!r}\n")
  lines += [f"  c.data.{key} = {value!r}\n" for key, value in data.items()]
  lines.append("  return c\n")
  path = os.path.join(directory, "bad_model.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(lines))
  return path


def _launch(config, workdir, *extra, timeout=240):
  return subprocess.run([sys.executable, "-m", "visatb_jax.launch", "--config", config,
                         "--workdir", str(workdir), *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_done(tmp_path_factory):
  """A run directory whose data stage is done (micro config, random init)."""
  root = tmp_path_factory.mktemp("data_done")
  workdir = root / "run"
  proc = _launch(_write_config(root, None), workdir, "--stages", "data")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def run_dir(data_done, tmp_path):
  """A fresh copy of `data_done` and its snapshot."""
  workdir = tmp_path / "run"
  shutil.copytree(data_done, workdir)
  return workdir, _snapshot(workdir)


def _llava_config_json() -> dict:
  """A valid LLaVA config.json (of a tiny model; no weights needed for these checks)."""
  from visatb_jax.model import hf_io
  from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
  return hf_io.config_to_hf(LlavaConfig(vision=VisionConfig(), text=TextConfig(),
                                        image_token_id=4))


def _checkpoint(tmp_path, config=None, weights=True, tokenizer=False):
  """A checkpoint directory: config.json (a dict, raw bytes, or None: no file), an (empty)
  model.safetensors, a tokenizer file; only names are checked before loading."""
  path = tmp_path / "ckpt"
  path.mkdir()
  if isinstance(config, bytes):
    (path / "config.json").write_bytes(config)
  elif config is not None:
    (path / "config.json").write_text(json.dumps(config))
  if weights:
    (path / "model.safetensors").write_bytes(b"")
  if tokenizer:
    (path / "tokenizer.json").write_text("{}")
  return path


def _assert_one_line_error(run_dir, tmp_path, model_path, *expected, **data) -> str:
  workdir, before = run_dir
  proc = _launch(_write_config(tmp_path, str(model_path), **data), workdir)
  assert proc.returncode == EXIT_ERROR, proc.stderr[-3000:]
  line = _error_line(proc.stderr)
  assert "config.model.path" in line and str(model_path) in line, line
  for text in expected:
    assert text in line, line
  assert _snapshot(workdir) == before
  return line


def test_missing_directory(run_dir, tmp_path):
  _assert_one_line_error(run_dir, tmp_path, tmp_path / "nowhere", "does not exist")


def test_empty_directory(run_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _assert_one_line_error(run_dir, tmp_path, empty, "no config.json", "save_pretrained")


def test_empty_directory_as_tokenizer_of_a_llava_json_source(run_dir, tmp_path):
  """The case of the issue: without data.tokenizer the tokenizer comes from model.path too, and
  loading it failed with 55 lines about sentencepiece."""
  empty = tmp_path / "empty"
  empty.mkdir()
  _assert_one_line_error(run_dir, tmp_path, empty, "no config.json", source="llava_json",
                         root=str(tmp_path))


def test_corrupt_config_json(run_dir, tmp_path):
  path = _checkpoint(tmp_path, config=b'{"architectures": ["LlavaForConditionalGeneration"], "te')
  _assert_one_line_error(run_dir, tmp_path, path, str(path / "config.json"), "not valid JSON")


def test_config_json_of_an_unsupported_architecture(run_dir, tmp_path):
  path = _checkpoint(tmp_path, config={"architectures": ["LlamaForCausalLM"],
                                       "model_type": "llama", "vocab_size": 32000})
  _assert_one_line_error(run_dir, tmp_path, path, "unsupported model", "'llama'",
                         "model.vision_path")


def test_missing_weight_files(run_dir, tmp_path):
  path = _checkpoint(tmp_path, config=_llava_config_json(), weights=False)
  _assert_one_line_error(run_dir, tmp_path, path, "no model.safetensors")


def test_missing_tokenizer_of_a_llava_json_source(run_dir, tmp_path):
  path = _checkpoint(tmp_path, config=_llava_config_json())
  _assert_one_line_error(run_dir, tmp_path, path, "has no tokenizer", "config.data.tokenizer",
                         source="llava_json", root=str(tmp_path))
