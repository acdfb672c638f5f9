"""Resume drill: SIGKILL a small pipeline in every stage, resume it, get the uninterrupted results.

One run directory is killed nine times, once in each stage and twice in the report
(`KILL_POINTS`), by the same command run again and again; a last run finishes it. Then outputs
of four stages are deleted (`DELETED`) and the same command makes them again. Its outputs (every
JSON and image file, the arrays of every model's checkpoint, the metrics logs) must then equal
those of an uninterrupted run of the same config, bit for bit: the pipeline is deterministic on
CPU.

Each kill point is an event inside the killed process (the nth rename of a finished temporary file
onto a path, a checkpoint save of a step, ...), hooked by this file run as a script, which then
sends SIGKILL to its whole process group. So every kill lands at the same moment of the run on
every machine, however loaded, and the drill is reproducible. This file is also the `--config` of
those runs (`get_config`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from visatb_jax.pipeline.stages import STAGE_NAMES
from visatb_jax.runtime import fileio

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)

# Which kill point a run of this file as a script arms: an index into KILL_POINTS.
_KILL_POINT_ENV = "VISATB_DRILL_KILL_POINT"
_MARK = "drill: SIGKILL at"


def get_config():
  """The drill's pipeline: conftest's micro config, smaller, with a pretrain stage.

  This file is the `--config` of the drill's runs, so the reference and the killed runs read
  the very same config.
  """
  if TESTS not in sys.path:  # loaded as a config file by a run, not imported by pytest
    sys.path.insert(0, TESTS)
  from conftest import micro_config  # pylint: disable=g-import-not-at-top
  config = micro_config()
  # Two balanced tasks and the fixed chat task: three preparation runs instead of five.
  config.task_order = ("caption", "count", "chat")
  # VisATB's model alone: a second final model would add about a third to the drill's time,
  # and the resumption of a weighting strategy's or gradient method's state is tested on its own
  # (tests/train/test_train.py).
  config.baselines = ()
  # The pretrain stage on the same three tasks: the same λ shape, so every training run of the
  # pipeline uses one compiled train step (compiling is most of a first run's time).
  config.pretrain.enabled = True
  config.pretrain.tasks = {"caption": 8, "count": 8, "chat": 8}
  config.pretrain.epochs = 1.0
  config.pretrain.lr = 3e-3
  return config


@dataclasses.dataclass(frozen=True)
class KillPoint:
  """SIGKILL at the `nth` event of kind `event` during stage `stage` whose subject matches the
  glob `subject`.

  Events, hooked in the killed process itself:
    replace:  an atomic write is about to rename its finished temporary file onto the subject,
              a path in the run directory (the temporary file is left behind).
    save:     `Checkpointer.save` of step N of the training run in directory R has returned, so
              its asynchronous write is under way ("R:N").
    log:      the metrics line of step N of R is written and every checkpoint save R started is
              complete: the kill falls between two checkpoints ("R:N").
    generate: a greedy-generation call while scoring the model of R ("untrained": the initial
              model).

  `present` and `absent`: globs in the run directory that the kill must have left, or must not
  have reached; they show that it landed where intended.
  """
  stage: str
  event: str
  subject: str
  nth: int
  present: tuple[str, ...]
  absent: tuple[str, ...]

  def __str__(self) -> str:
    return f"{self.stage}: {self.event} #{self.nth} of {self.subject}"


# Steps of the drill config's runs (checkpoint_every=2, 8 samples a step): pretrain 3; prep mini
# 3, caption+mini 4, count+mini 5; final visatb 9.
KILL_POINTS = (
    KillPoint("data", "replace", "data/shapes/images/train/*.png", 10,
              present=("data/shapes/images/train/.tmp-atomic-*.png",),
              absent=("data/shapes/manifest.json",)),  # the benchmark writes it last
    # Right after a save began: its step's directory may be anything from absent to complete.
    KillPoint("pretrain", "save", "pretrain:2", 1,
              present=("data/pretrain/pretrain.json",), absent=("pretrain/checkpoints/3",)),
    # Between two checkpoints: step 3 trained and logged, step 2 the last saved.
    KillPoint("prep", "log", "prep/count+mini:3", 1,
              present=("prep/caption+mini/checkpoints/4", "prep/count+mini/checkpoints/2"),
              absent=("prep/count+mini/checkpoints/4",)),
    # In the middle of a model's scores: its second task of three.
    KillPoint("validate", "generate", "prep/caption+mini", 2,
              present=("prep/mini/scores_val.json",),
              absent=("prep/caption+mini/scores_val.json", "scores/validation.json")),
    KillPoint("lambda", "replace", "lambda.json", 1,
              present=(".tmp-atomic-*.lambda.json",), absent=("lambda.json",)),
    # Orbax completes a save before it begins the next, so step 2 is there.
    KillPoint("final", "save", "final/visatb:4", 1,
              present=("final/visatb/checkpoints/2",), absent=("final/visatb/checkpoints/6",)),
    # The trained model's scores are cached; the untrained one's are half made.
    KillPoint("test", "generate", "untrained", 2,
              present=("final/visatb/scores_test.json",),
              absent=("untrained/scores_test.json", "scores/test.json")),
    KillPoint("report", "replace", "report/*.png", 2,
              present=("report/comparison.json", "report/lambda.png", "report/.tmp-atomic-*.png"),
              absent=("report/report.md",)),
    # Every report file written, the manifest not yet saying so: the report is made again.
    KillPoint("report", "replace", "manifest.json", 1,
              present=("report/report.md", ".tmp-atomic-*.manifest.json"), absent=()),
)

# Outputs removed from the finished run (a file, a directory, a model's last checkpoint): the
# same command makes them again, naming each, with the uninterrupted run's contents.
DELETED = {"lambda.json": "its output lambda.json is missing",
           "final/visatb/checkpoints/9": "its output final/visatb/checkpoints changed",
           "scores/test.json": "its output scores/test.json is missing",
           "report": "its output report/report.md is missing"}


# ------------------------------------------------------------------- the killed process's hooks


def _arm(point: KillPoint, workdir: str) -> None:
  """Wraps the functions behind `point`'s event so that this process group dies at it."""
  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import generate
  from visatb_jax.pipeline import models, run_dir
  from visatb_jax.runtime import checkpoint, metrics_log
  # pylint: enable=g-import-not-at-top
  root = os.path.abspath(workdir)
  lock = threading.Lock()  # images are written by a pool of threads
  now = {"stage": None, "model": None, "seen": 0}
  checkpointers = {}  # training run directory -> its Checkpointer

  def rel(path) -> str:
    return os.path.relpath(os.path.abspath(os.fspath(path)), root)

  def reached(event: str, subject: str) -> bool:
    with lock:
      if (now["stage"], event) != (point.stage, point.event):
        return False
      if not fnmatch.fnmatchcase(subject, point.subject):
        return False
      now["seen"] += 1
      return now["seen"] == point.nth

  def kill(subject: str) -> None:
    print(f"{_MARK} {point} ({subject})", file=sys.stderr, flush=True)
    # The whole process group, as a scheduler stops a job: nothing of the run outlives it.
    os.killpg(os.getpgrp(), signal.SIGKILL)

  def patch(owner, name, make) -> None:
    setattr(owner, name, make(getattr(owner, name)))

  def mark(real):
    def hooked(self, stage, status, *args, **kwargs):
      real(self, stage, status, *args, **kwargs)
      if status == "running":
        now["stage"] = stage
    return hooked

  def replace(real):
    def hooked(src, dst, *args, **kwargs):
      if fileio.is_temporary_name(os.path.basename(os.fspath(src))):
        subject = rel(dst)
        if reached("replace", subject):
          kill(subject)
      return real(src, dst, *args, **kwargs)
    return hooked

  def init(real):
    def hooked(self, *args, **kwargs):
      real(self, *args, **kwargs)
      checkpointers[os.path.dirname(self.directory)] = self
    return hooked

  def save(real):
    def hooked(self, step, *args, **kwargs):
      real(self, step, *args, **kwargs)
      subject = f"{rel(os.path.dirname(self.directory))}:{step}"
      if reached("save", subject):
        kill(subject)
    return hooked

  def write(real):
    def hooked(self, record):
      real(self, record)
      run = os.path.dirname(os.path.abspath(self.path))
      subject = f"{rel(run)}:{record['step']}"
      if reached("log", subject):
        checkpointers[run].wait_until_finished()
        kill(subject)
    return hooked

  def score(real):
    def hooked(self, rel_dir, *args, **kwargs):
      now["model"] = rel_dir or "untrained"
      return real(self, rel_dir, *args, **kwargs)
    return hooked

  def greedy(real):
    def hooked(*args, **kwargs):
      if reached("generate", now["model"]):
        kill(now["model"])
      return real(*args, **kwargs)
    return hooked

  patch(run_dir.Manifest, "mark", mark)
  patch(os, "replace", replace)  # fileio's atomic writes call os.replace
  patch(checkpoint.Checkpointer, "__init__", init)
  patch(checkpoint.Checkpointer, "save", save)
  patch(metrics_log.MetricsLog, "write", write)
  patch(models.Models, "score", score)
  patch(generate, "greedy_generate", greedy)


# --------------------------------------------------------------------------------- the runs


def _start(workdir: str, log: str, *, kill_point: int | None = None,
           cache: str | None = None) -> subprocess.Popen:
  """Starts the drill config's pipeline into `workdir`, armed with KILL_POINTS[kill_point], with
  stdout and stderr in `log`; `cache`: its own compilation cache (default: conftest's)."""
  # One CPU device (conftest simulates 8): the drill is about resuming the pipeline, while
  # sharding, and resuming on another mesh, are tested in tests/runtime; 8 devices would add
  # a fifth to its time (compiling and running the sharded programs).
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     os.environ.get("XLA_FLAGS", ""))
  env = {**os.environ,
         "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count=1".strip(),
         # Every program is cached, however short its compilation, so that a restarted run
         # compiles nothing again.
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  env.pop(_KILL_POINT_ENV, None)
  if kill_point is not None:
    env[_KILL_POINT_ENV] = str(kill_point)
  command = [sys.executable, os.path.abspath(__file__), "--config", os.path.abspath(__file__),
             "--workdir", workdir]
  with open(log, "w", encoding="utf-8") as out:
    # A session of its own: the kill takes its process group, and nothing else.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> int:
  """The exit code of `proc`; its process group is killed if it is not done by `timeout`."""
  try:
    return proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _tail(log: str) -> str:
  with open(log, encoding="utf-8") as f:
    return f.read()[-4000:]


def _stage_status(workdir: str) -> dict[str, str]:
  stages = fileio.read_json(os.path.join(workdir, "manifest.json"))["stages"]
  return {name: entry["status"] for name, entry in stages.items()}


def _check_landing(workdir: str, point: KillPoint, log: str) -> None:
  """The kill fell in its stage, after the files it must follow and before those it precedes."""
  with open(log, encoding="utf-8") as f:
    assert f"{_MARK} {point} (" in f.read(), f"{point} never fired:\n{_tail(log)}"
  status = _stage_status(workdir)
  before = STAGE_NAMES[:STAGE_NAMES.index(point.stage)]
  assert status == {**{s: "done" for s in before}, point.stage: "running"}, (point, status)
  for pattern in point.present:
    assert glob.glob(os.path.join(workdir, pattern)), f"{point}: nothing matches {pattern}"
  for pattern in point.absent:
    assert not glob.glob(os.path.join(workdir, pattern)), f"{point}: {pattern} exists"


class _Reference:
  """An uninterrupted run of the drill config, started at once and waited for on demand."""

  def __init__(self, directory: pathlib.Path):
    self.workdir, self._log = str(directory / "run"), str(directory / "run.log")
    # A compilation cache of its own: it runs beside the drill (one core each, as both are
    # mostly one Python thread), and JAX writes cache entries in place, so a reader beside a
    # writer could read half of one.
    self._proc = _start(self.workdir, self._log, cache=str(directory / "xla_cache"))
    self._code = None

  def result(self) -> str:
    """Its run directory, once it has finished."""
    if self._code is None:
      self._code = _finish(self._proc)
    assert self._code == 0, _tail(self._log)
    return self.workdir

  def stop(self) -> None:
    if self._proc.poll() is None:
      os.killpg(self._proc.pid, signal.SIGKILL)
      self._proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: `.result()` is its run directory."""
  run = _Reference(tmp_path_factory.mktemp("drill_reference"))
  yield run
  run.stop()  # still running when a failed drill ends the module


@pytest.fixture(scope="module")
def drilled(reference, tmp_path_factory) -> str:
  """The run directory killed at every KILL_POINTS in turn, then finished by the same command
  (the reference runs meanwhile)."""
  del reference  # requested so that it starts first
  tmp = tmp_path_factory.mktemp("drill_killed")
  workdir = str(tmp / "run")
  for index, point in enumerate(KILL_POINTS):
    log = str(tmp / f"kill_{index}_{point.stage}.log")
    code = _finish(_start(workdir, log, kill_point=index))
    assert code == -signal.SIGKILL, f"{point}: exit code {code}\n{_tail(log)}"
    _check_landing(workdir, point, log)
  log = str(tmp / "resume.log")
  assert _finish(_start(workdir, log)) == 0, _tail(log)
  for rel in DELETED:
    path = os.path.join(workdir, rel)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  log = str(tmp / "deleted.log")
  assert _finish(_start(workdir, log)) == 0, _tail(log)
  with open(log, encoding="utf-8") as f:
    logged = f.read()
  for rel, why in DELETED.items():
    assert why in logged, (rel, _tail(log))
  return workdir


# ------------------------------------------------------------------------------- comparisons


def _without_timings(tree):
  """`tree` minus wall-clock figures (step times), which no two runs share."""
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items() if not k.startswith("step_time")}
  return tree


# Files compared on their own terms below, or holding what no two runs share.
_UNCOMPARABLE_FILES = {
    "manifest.json",  # times of each stage: test_the_run_is_finished_and_clean reads its statuses
    "report/report.md",  # step times in the comparison table
}
_UNCOMPARABLE_NAMES = {"metrics.jsonl"}  # elapsed_s, tokens_per_s: compared without them
_UNCOMPARABLE_DIRS = {
    "checkpoints",  # orbax's metadata has timestamps: the arrays are compared instead
    "tb",  # TensorBoard events carry wall times
    "xla_cache",
}


def _outputs(workdir: str) -> dict[str, object]:
  """{path: content} of every output file: JSON as values (run-directory paths in them made
  relative), other files as digests."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d not in _UNCOMPARABLE_DIRS]
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel in _UNCOMPARABLE_FILES or name in _UNCOMPARABLE_NAMES:
        continue
      with open(path, "rb") as f:
        data = f.read()
      if name.endswith(".json"):
        # The benchmark's manifests name the run directory.
        text = data.decode("utf-8").replace(os.path.abspath(workdir), "<run>")
        out[rel] = _without_timings(json.loads(text))
      else:
        out[rel] = hashlib.sha256(data).hexdigest()
  return out


def _training_runs(workdir: str) -> list[str]:
  """Directories of the training runs (relative): those with a checkpoints/ directory."""
  return sorted(os.path.relpath(os.path.dirname(d), workdir)
                for d in glob.glob(os.path.join(workdir, "**", "checkpoints"), recursive=True))


def _steps(checkpoints: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def _array_digests(item_dir: str) -> dict[str, str]:
  """{leaf path: digest of dtype, shape and bytes} of one checkpoint item, read as numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(item_dir).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ckpt.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=args))
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    leaf = np.asarray(leaf)
    digest = hashlib.sha256(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out


def _metrics(workdir: str, run: str) -> list[dict]:
  path = os.path.join(workdir, run, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in records]


# ------------------------------------------------------------------------------------ tests


def test_outputs_equal_the_uninterrupted_run(reference, drilled):
  """λ and its intervals, the score tables, per-sample scores and predictions, the data, the
  tokenizer, every run.json and the report's plots: the same files, with the same contents."""
  want, got = _outputs(reference.result()), _outputs(drilled)
  assert sorted(got) == sorted(want)
  for name in ("lambda.json", "scores/validation.json", "scores/test.json",
               "scores/validation_samples.json", "scores/test_samples.json",
               "report/loss_curves.png"):
    assert name in want, name  # what the drill is about is compared, not assumed
  differ = [name for name in want if got[name] != want[name]]
  assert not differ, differ
  assert got == want


def test_trained_models_equal_the_uninterrupted_run(reference, drilled):
  """The latest checkpoint of every training run holds the same arrays: parameters, optimizer
  moments and step."""
  want_dir = reference.result()
  runs = _training_runs(want_dir)
  assert runs == ["final/visatb", "prep/caption+mini", "prep/count+mini", "prep/mini",
                  "pretrain"]
  assert _training_runs(drilled) == runs
  for run in runs:
    steps = _steps(os.path.join(want_dir, run, "checkpoints"))
    assert _steps(os.path.join(drilled, run, "checkpoints")) == steps, run
    latest = os.path.join(run, "checkpoints", str(steps[-1]))
    items = [i for i in sorted(os.listdir(os.path.join(want_dir, latest)))
             if os.path.isdir(os.path.join(want_dir, latest, i))]
    assert "state" in items, (run, items)
    for item in items:
      want, got = (_array_digests(os.path.join(d, latest, item)) for d in (want_dir, drilled))
      assert sorted(got) == sorted(want), (latest, item)
      differ = [leaf for leaf in want if got[leaf] != want[leaf]]
      assert not differ, (latest, item, differ[:5])


def test_metrics_logs_hold_every_step_once_with_the_same_values(reference, drilled):
  """Steps logged by a killed run after its last checkpoint are dropped and trained again: one
  line per step, as if never killed (losses, λ, gradient norms, learning rates)."""
  want_dir = reference.result()
  for run in _training_runs(want_dir):
    want, got = _metrics(want_dir, run), _metrics(drilled, run)
    assert [r["step"] for r in got] == list(range(1, len(want) + 1)), run
    assert got == want, run


def test_the_run_is_finished_and_clean(drilled):
  """Every stage is done, and the kills left nothing behind: no temporary file of an atomic write
  and no unfinished checkpoint directory."""
  assert _stage_status(drilled) == {s: "done" for s in STAGE_NAMES}
  leftovers = []
  for root, dirs, files in os.walk(drilled):
    leftovers += [os.path.join(root, n) for n in files + dirs if fileio.is_temporary_name(n)]
    if os.path.basename(root) == "checkpoints":
      leftovers += [os.path.join(root, d) for d in dirs if not d.isdigit()]
  assert not leftovers, leftovers


if __name__ == "__main__":
  # A run of the drill: the launch command line, armed with the kill point the test names.
  if os.environ.get(_KILL_POINT_ENV):
    _arm(KILL_POINTS[int(os.environ[_KILL_POINT_ENV])],
         sys.argv[sys.argv.index("--workdir") + 1])
  from visatb_jax.cli import launch  # pylint: disable=g-import-not-at-top
  launch.run_cli()
