"""Every bad input to `python -m visatb_jax.launch` is one line `error: ...` and an exit code.

Each case runs the command on a copy of a run directory whose data stage is done (the micro
config of tests/conftest.py), and checks the exit code, that stderr is exactly one line naming
what is wrong, and that the files already in the run directory are unchanged.
"""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from one_line import assert_unchanged as _assert_unchanged
from one_line import error_line as _error_line
from one_line import snapshot as _snapshot
from visatb_jax.pipeline import run_dir as run_dir_lib
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
  # During training the step reached is saved first ("... stopped at step N by ... saved it").
  assert "same command" in line and "completed stages (data)" in line, line
  _assert_kept_is_on_disk(line, workdir)
  _assert_unchanged(before, workdir, except_for={"manifest.json", "data_stats.json"})
  assert not [p for p in _snapshot(workdir) if fileio.is_temporary_name(os.path.basename(p))]


def _assert_kept_is_on_disk(line, workdir):
  """Every stage, model and checkpoint the interruption line says it kept is there."""
  assert "last training checkpoint" not in line, line
  stages = fileio.read_json(workdir / "manifest.json")["stages"]
  for group in re.findall(r"completed stages \(([^)]*)\)", line):
    for name in group.split(", "):
      assert stages[name]["status"] == "done", (name, line)
  for group in re.findall(r"trained models \(([^)]*)\)", line):
    for rel in group.split(", "):
      assert fileio.read_json(workdir / rel / "run.json")["done"], (rel, line)
  for step, rel in re.findall(r"the checkpoint of step (\d+) of ([^,;]+)", line):
    assert int(step) in run_dir_lib.finished_steps(workdir / rel / "checkpoints"), (rel, step, line)


def _wait_for_training(workdir, proc, timeout=180):
  """Waits until a preparation model has logged its first step: training is under way."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if [p for p in (workdir / "prep").glob("*/metrics.jsonl") if p.stat().st_size]:
      return
    time.sleep(0.05)
  raise AssertionError(f"no training step was logged; exit code {proc.poll()}")


# Enough steps that a stop lands inside a training run, not after its last step; no regular
# checkpoint before the end, so that only the stop saves one (and the runs stay short).
_LONG_PREP = ("--stages", "prep", "--config.train.epochs=30",
              "--config.train.checkpoint_every=1000")


def _signal_training(workdir, micro, *signals, gap=0.02, timeout=120):
  """Starts a long preparation run, waits until it trains, sends `signals` `gap` seconds apart;
  returns (exit code, stdout, stderr)."""
  proc = subprocess.Popen(_command(micro, workdir, *_LONG_PREP), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_training(workdir, proc)
    for k, sig in enumerate(signals):
      if k:
        time.sleep(gap)
      proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, stdout, stderr


@pytest.mark.slow  # two runs of the preparation stage
def test_ctrl_c_saves_the_step_reached_and_the_rerun_resumes_from_it(run_dir, micro):
  workdir, _ = run_dir
  code, stdout, stderr = _signal_training(workdir, micro, signal.SIGINT)
  assert code == 130, stderr[-3000:]
  line = _error_line(stderr)
  found = re.search(r"error: interrupted: training of (\S+) stopped at step (\d+) by Ctrl-C and "
                    r"saved it; kept in .*the checkpoint of step \2 of \1", line)
  assert found, line
  assert "Ctrl-C again stops at once" in stdout
  _assert_kept_is_on_disk(line, workdir)
  model, step = found.groups()

  line, code, stderr = _run_until_line(_command(micro, workdir, *_LONG_PREP), "resumed from step")
  assert f"resumed from step {step} (" in line and os.path.join(model, "checkpoints") in line, (
      line, stderr[-3000:])
  assert code == 143, stderr[-3000:]  # the rerun was under way, then stopped for this test


def _run_until_line(command, text, timeout=180):
  """Runs `command` until it prints a line with `text`, then stops it with SIGTERM; returns
  (that line, exit code, stderr)."""
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  timer = threading.Timer(timeout, proc.kill)
  timer.start()
  try:
    for line in proc.stdout:
      if text in line:
        proc.send_signal(signal.SIGTERM)
        break
    else:
      line = ""
    proc.stdout.read()
    stderr = proc.communicate(timeout=120)[1]
  finally:
    timer.cancel()
    if proc.poll() is None:
      proc.kill()
  return line, proc.returncode, stderr


@pytest.mark.slow  # a launch subprocess, ~36 s under load
def test_a_second_ctrl_c_stops_at_once(run_dir, micro):
  workdir, _ = run_dir
  code, _, stderr = _signal_training(workdir, micro, signal.SIGINT, signal.SIGINT, timeout=60)
  assert code == 130, stderr[-3000:]
  line = _error_line(stderr)
  assert line.startswith("error: interrupted") and "same command" in line, line
  _assert_kept_is_on_disk(line, workdir)


def test_stop_message_lists_only_this_configs_outputs(run_dir, micro):
  """The stages another config finished (an interrupted --overwrite run) are not "kept"."""
  from visatb_jax.cli import launch  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  config = launch.load_config(micro)
  line = launch._stopped_message(config, str(workdir), "interrupted")
  assert "completed stages (data)" in line and "same command again to resume" in line, line
  config.data.max_len = 100  # another data stage: its hash differs
  line = launch._stopped_message(config, str(workdir), "interrupted")
  assert line == (f"interrupted; nothing in {workdir} is complete yet; run the same command "
                  "again to start"), line


def test_a_stop_swallowed_by_a_library_is_sent_again(tmp_path):
  """A stop exception that code catches and drops (`except BaseException: pass`, C code asking
  `hasattr`) is raised again a second later, until the run stops."""
  script = tmp_path / "swallowed.py"
  script.write_text(
      "import os, signal, sys, time\n"
      "from visatb_jax.cli import launch\n"
      "launch._handle_stop_signals()\n"
      "signum = signal.SIGINT\n"
      "try:\n"
      "  os.kill(os.getpid(), signum)\n"
      "  time.sleep(5)\n"
      "except BaseException:\n"
      "  pass  # dropped, as a library might\n"
      "t0 = time.monotonic()\n"
      "try:\n"
      "  time.sleep(10)  # the signal sent again interrupts it\n"
      "  print('NOT STOPPED')\n"
      "except KeyboardInterrupt:\n"
      "  print(f'STOPPED {time.monotonic() - t0:.1f}')\n")
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.startswith("STOPPED"), proc.stdout + proc.stderr
  assert float(proc.stdout.split()[1]) < 3.0, proc.stdout


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


# --------------------------------------------------------------------- 8: a damaged checkpoint


@pytest.mark.slow  # two runs of the preparation stage
def test_unreadable_checkpoint_is_one_line_naming_what_to_remove(run_dir, micro):
  """Every step of a model's checkpoints truncated (a copy cut short): one line naming the
  directory and what to remove, instead of orbax's 166-line OUT_OF_RANGE; removing it works."""
  workdir, _ = run_dir
  code, _, stderr = _signal_training(workdir, micro, signal.SIGTERM)
  assert code == 143, stderr[-3000:]
  model = re.search(r"training of (\S+) stopped", _error_line(stderr)).group(1)
  checkpoints = workdir / model / "checkpoints"
  arrays = list(checkpoints.glob("*/state/d/*"))
  assert arrays
  for path in arrays:
    os.truncate(path, os.path.getsize(path) // 2)

  proc = _launch(micro, workdir, *_LONG_PREP)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _error_line(proc.stderr)
  assert line.startswith(f"error: no checkpoint in {checkpoints} can be read (step "), line
  assert line.endswith(f"remove {checkpoints} to train this model from the start"), line

  shutil.rmtree(checkpoints)  # as the line says: that model trains from the start again
  # The models before it are done: the first progress line is its own, past the restore.
  line, code, stderr = _run_until_line(_command(micro, workdir, *_LONG_PREP), "train step ")
  assert line and code == 143 and "can be read" not in stderr, (line, stderr[-3000:])
