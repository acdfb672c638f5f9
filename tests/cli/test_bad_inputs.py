"""Every bad input to `python -m visatb_jax.launch` is one line `error: ...` and an exit code.

Each case runs the command on a copy of a run directory whose data stage is done (the micro
config of tests/conftest.py), and checks the exit code, that stderr is exactly one line naming
what is wrong, and that the files already in the run directory are unchanged.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from one_line import assert_unchanged as _assert_unchanged
from one_line import error_line as _error_line
from one_line import snapshot as _snapshot
from visatb_jax.runtime import fileio

TESTS = os.path.join(REPO, "tests")


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> str:
  """A config file of conftest's micro config (some of its overrides, e.g. `pretrain: None`,
  have no command-line spelling)."""
  path = tmp_path_factory.mktemp("config") / "micro.py"
  path.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\n"
                  "from conftest import micro_config as get_config  # noqa: F401\n")
  return str(path)


def _command(config, workdir, *extra):
  return [sys.executable, "-m", "visatb_jax.launch", "--config", config, "--workdir",
          str(workdir), *extra]


def _launch(config, workdir, *extra, timeout=240, **kwargs):
  return subprocess.run(_command(config, workdir, *extra), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def data_done(tmp_path_factory, micro):
  """A run directory whose data stage is done."""
  workdir = tmp_path_factory.mktemp("data_done") / "run"
  proc = _launch(micro, workdir, "--stages", "data")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def run_dir(data_done, tmp_path):
  """A fresh copy of `data_done` and its snapshot."""
  workdir = tmp_path / "run"
  shutil.copytree(data_done, workdir)
  return workdir, _snapshot(workdir)


# ----------------------------------------------------------------------- 1, 2: config overrides


def test_unknown_field_is_one_line_with_absl_suggestion(run_dir, micro):
  workdir, before = run_dir
  proc = _launch(micro, workdir, "--config.train.lrr=1")
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert "train.lrr" in line and 'Did you mean "lr"' in line, line
  _assert_unchanged(before, workdir)


def test_field_the_config_does_not_declare_is_named(run_dir, micro):
  workdir, before = run_dir
  proc = _launch(micro, workdir, "--config.data.root=/somewhere")
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert "data.root" in line and "'root'" in line, line
  _assert_unchanged(before, workdir)


# ------------------------------------------------------------------------- 3: Ctrl-C, SIGTERM


def _wait_for_stage(workdir, stage, proc, timeout=180):
  manifest = os.path.join(workdir, "manifest.json")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    try:
      with open(manifest, encoding="utf-8") as f:
        if stage in json.load(f)["stages"]:
          return
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.1)
  raise AssertionError(f"stage {stage} did not start; exit code {proc.poll()}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_is_one_line_saying_what_is_kept_and_how_to_resume(run_dir, micro, sig,
                                                                        code):
  workdir, before = run_dir
  proc = subprocess.Popen(_command(micro, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_stage(workdir, "prep", proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=120)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == code, stderr[-3000:]
  line = _error_line(stderr)
  # SIGTERM during a training run saves its step first ("preempted: ... step N ...").
  assert "same command" in line and ("(data)" in line or "preempted: " in line), line
  _assert_unchanged(before, workdir, except_for={"manifest.json", "data_stats.json"})
  assert not [p for p in _snapshot(workdir) if fileio.is_temporary_name(os.path.basename(p))]


def test_signal_dropped_by_a_callback_is_delivered_again(tmp_path):
  """A stop signal whose exception lands in a `__del__` (printed and dropped by Python) still
  stops the run."""
  script = tmp_path / "dropped.py"
  script.write_text(
      "import signal, sys, time\n"
      "from visatb_jax.cli import launch\n"
      "launch._handle_stop_signals()\n"
      "class Dropper:\n"
      "  def __del__(self):\n"
      "    signal.raise_signal(signal.SIGTERM)\n"
      "    sum(range(1000))  # the handler runs here; its exception is dropped\n"
      "try:\n"
      "  Dropper()\n"
      "  time.sleep(5)  # the signal sent again interrupts it\n"
      "  print('NOT STOPPED')\n"
      "except launch._Terminated:\n"
      "  print('STOPPED')\n")
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.strip() == "STOPPED", proc.stdout + proc.stderr
  assert "Exception ignored" not in proc.stderr


# ------------------------------------------------------------------------------ 4: I/O errors


def test_run_directory_under_a_file_names_the_path(tmp_path, micro):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _launch(micro, blocker / "run")
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert str(blocker / "run") in line and os.strerror(errno.ENOTDIR) in line, line
  assert blocker.read_text() == "not a directory"


def _limit_file_size():
  # A write past 64 bytes fails (EFBIG) as a write to a full disk does (ENOSPC).
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


def test_failed_write_names_the_target_and_the_reason(run_dir, micro):
  workdir, before = run_dir
  proc = _launch(micro, workdir, preexec_fn=_limit_file_size)
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert str(workdir / "config.json") in line and os.strerror(errno.EFBIG) in line, line
  _assert_unchanged(before, workdir)
  assert set(_snapshot(workdir)) == set(before)  # no temporary file left behind


def test_atomic_write_error_carries_the_target_path(tmp_path, monkeypatch):
  target = tmp_path / "out" / "x.json"

  def disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", disk_full)
  with pytest.raises(OSError) as info:
    fileio.atomic_write_json(target, {"a": 1})
  assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
  assert os.listdir(target.parent) == []
  monkeypatch.undo()
  (tmp_path / "a_file").write_text("")
  with pytest.raises(OSError) as info:
    fileio.atomic_write_text(tmp_path / "a_file" / "y.txt", "y")
  assert info.value.filename == str(tmp_path / "a_file" / "y.txt")
  assert info.value.strerror.startswith(f"cannot create directory {tmp_path / 'a_file'}: ")


# ------------------------------------------------------------------- 5: leftover temporaries


def test_temporaries_of_killed_writes_are_removed_and_nothing_else(run_dir, micro):
  workdir, before = run_dir
  images = workdir / "data" / "shapes" / "images" / "train"
  stale = [images / ".tmp-atomic-k3j2h1a9.000001.png",  # this version's temporary name
           images / ".tmp-k3j2h1a9000002.png",  # the name before it
           workdir / ".tmp-ab_4cd9zmanifest.json"]
  kept = [workdir / ".tmp-tokenizer-abcd1234" / "tokenizer.json",  # a scratch directory's file
          images / "notes.tmp-atomic-k3j2h1a9.txt", images / ".tmp-short.png",
          workdir / ".tmp-atomic-notrandom"]
  for path in stale + kept:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
  os.symlink(kept[0], images / ".tmp-atomic-s1mlink1.x.png")
  proc = _launch(micro, workdir, "--stages", "data")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == ""
  assert not [p for p in stale if p.exists()]
  assert all(p.read_bytes() == b"partial" for p in kept)
  assert os.path.islink(images / ".tmp-atomic-s1mlink1.x.png")  # links are never followed
  _assert_unchanged(before, workdir, except_for={"manifest.json"})


def test_remove_stale_temporaries_in_a_missing_directory(tmp_path):
  assert fileio.remove_stale_temporaries(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- 6: a bad image


def test_corrupt_image_is_one_line_naming_the_file(run_dir, micro):
  workdir, before = run_dir
  train = json.loads((workdir / "data" / "shapes" / "train.json").read_text())
  # A vqa sample: every one is trained on (some captions are too long for the micro config).
  image = workdir / "data" / "shapes" / next(s["image"] for s in train
                                             if s.get("image") and s["task"] == "vqa")
  image.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
  before[str(image.relative_to(workdir))] = _snapshot(image.parent)[image.name]
  proc = _launch(micro, workdir)
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert str(image) in line and "cannot" in line, line
  _assert_unchanged(before, workdir, except_for={"manifest.json"})


# --------------------------------------------------------- 7: another config's run directory


def test_another_configs_run_directory_is_refused(run_dir, micro):
  """A config whose data stage differs from the one that finished there: refused, untouched;
  `--overwrite` then replaces it."""
  workdir, before = run_dir
  data_hash = fileio.read_json(workdir / "manifest.json")["stages"]["data"]["hash"]
  proc = _launch(micro, workdir, "--config.data.max_len=100")
  assert proc.returncode == 2
  line = _error_line(proc.stderr)
  assert (f"error: run directory {workdir} was made by another config: this one would replace "
          "the outputs of stage(s) data; run with --overwrite" in line), line
  _assert_unchanged(before, workdir)
  assert set(_snapshot(workdir)) == set(before)

  proc = _launch(micro, workdir, "--config.data.max_len=100", "--stages", "data", "--overwrite")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stage data: start (its config changed since it ran)" in proc.stdout
  assert fileio.read_json(workdir / "manifest.json")["stages"]["data"]["hash"] != data_hash
