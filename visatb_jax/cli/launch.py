"""Command line: run the whole VisATB pipeline, or some of its stages.

  python -m visatb_jax.launch --config configs/demo.py [--config.train.epochs=2]
      [--workdir runs/demo] [--stages prep,validate] [--overwrite]
  python -m visatb_jax.launch --config academic.py --dry-run [--dry_run_devices=8]

`--config NAME.py` is looked up as given, then in the project's `configs/` folder. A run
directory whose finished stages another config made is refused (exit 2, nothing touched) unless
`--overwrite` is given.

Every problem the user must act on ends the command with one line `error: ...` on stderr:
exit code 2 for a bad flag, config field or input, an image that does not decode, an I/O error
(naming the path), an unreadable checkpoint or a diverged run; 130 for Ctrl-C and 143 for SIGTERM
(a preempted VM, a scheduler's time limit), both resumed by the same command. Training stops at
its next step boundary and saves that step first; a second Ctrl-C stops at once. The line lists
what of this config is on disk: completed stages, trained models, training checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from visatb_jax import cli

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIGS_DIR = os.path.join(_REPO_DIR, "configs")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers treat as "preempted, requeue"


def resolve_config_path(path: str) -> str:
  """`demo.py` → `configs/demo.py` when the path as given does not exist."""
  base, _, overrides = path.partition(":")
  if os.path.exists(base):
    return path
  for candidate in (os.path.join("configs", base), os.path.join(_CONFIGS_DIR, base)):
    if os.path.exists(candidate):
      return candidate + (":" + overrides if overrides else "")
  raise app.UsageError(f"config file {base!r} not found (also looked in {_CONFIGS_DIR})")


def load_config(path: str):
  """The ConfigDict of a config file's `get_config()` (`demo.py` resolves as on the CLI)."""
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def rewrite_config_arg(argv: Sequence[str]) -> list[str]:
  """Resolves the --config value before absl parses it (config_flags loads it while parsing)."""
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" and i + 1 < len(argv):
      out += [arg, resolve_config_path(argv[i + 1])]
      i += 2
      continue
    if arg.startswith("--config="):
      arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
    if arg == "--dry-run":  # the spelling users expect; absl flag names use underscores
      arg = "--dry_run"
    out.append(arg)
    i += 1
  return out


# Each help is one short line: `--help` lists the flags one line each (_help_text).
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file: a path, or a name in configs/ (demo.py, academic.py, ...)",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)")
_STAGES = flags.DEFINE_list("stages", ["all"], "stages to run, comma separated, or all")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "replace stages that another config finished in the run directory")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "compile the train step abstractly, print per-device memory; no weights")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "with --dry-run: simulate this many CPU devices (the target's chips)")
_TARGET = flags.DEFINE_list(
    "target", [], "with --dry-run: the chips to estimate (v5p, h100, h200; default all)")
# The listing's VALUE names; every flag defined above is listed (tests/cli/test_help.py).
_METAVARS = {"config": "FILE", "workdir": "DIR", "stages": "A,B", "overwrite": "",
             "dry_run": "", "dry_run_devices": "N", "target": "CHIP,..."}


def _help_text(full: bool) -> str:
  """The command's usage and its own flags, one line each; `full` adds absl's own flags."""
  rows = cli.absl_option_rows(flags.FLAGS, _METAVARS)
  rows.insert(1, ("--config.FIELD=VALUE", "set any field of the config, e.g. "
                                          "--config.train.epochs=2"))
  rows = [("--dry-run" if name == "--[no]dry_run" else name, text) for name, text in rows]
  rows += [("-h, --help", "show this help and exit"),
           ("--helpfull", "also list absl's own flags (logging, debugging), which launch takes")]
  text = f"{__doc__.strip()}\n\noptions:\n{cli.option_lines(rows)}"
  if not full:
    return text
  ours = set(_METAVARS)
  others = [module for module, defined in sorted(flags.FLAGS.flags_by_module_dict().items())
            if not ours & {f.name for f in defined}]
  return text + "\n\nabsl's flags:\n" + "\n".join(
      flags.FLAGS.module_help(module) for module in others)


def _error(message: str) -> None:
  """Prints `message` as the one line `error: ...` on stderr."""
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f"error: {text}", file=sys.stderr, flush=True)


def _override_of(field: str, argv: Sequence[str]) -> str | None:
  """The dotted path of the first `--config.a.b=...` override whose path contains `field`."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if field in path.split("."):
        return path
  return None


def _unknown_field_message(error: Exception, argv: Sequence[str]) -> str:
  """One line for an override of a field the config does not declare, with absl's suggestion.

  ml_collections raises AttributeError(KeyError("'field'\\nDid you mean ...?")) (or a KeyError):
  the field's name is the first line of the innermost message, a suggestion the rest.
  """
  text = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  first, _, hint = str(text).partition("\n")
  field = first.strip().strip("'\"")
  path = _override_of(field, argv)
  if path is None:
    return f"bad config override: {text}"
  parent = path.split(".")[:path.split(".").index(field)]
  owner = ".".join(["config", *parent])
  hint = f"; {hint.strip()}" if hint.strip() else ""
  return f"--config.{path}: {owner} has no field {field!r}{hint}"


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, where a bad flag or config override exits 2 with one line."""
  # Help before parsing: parsing loads the config file, and absl's own --help lists nothing of
  # this module's flags under `python -m` (it looks for flags of __main__) and exits 1.
  asked = set(argv[1:])
  if asked & {*cli.HELP_REQUESTS, "--helpfull"}:
    print(_help_text(full="--helpfull" in asked))
    sys.exit(0)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    _error(e)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an undeclared field
    _error(_unknown_field_message(e, argv))
  except KeyboardInterrupt:  # the config file is loaded while parsing (it may import jax)
    _error("interrupted while loading the config; nothing was run")
    sys.exit(EXIT_INTERRUPTED)
  sys.exit(EXIT_ERROR)


def _dry_run(config) -> int:
  from visatb_jax.cli import dryrun
  try:
    targets = dryrun.check_targets(_TARGET.value)  # before minutes of compiling
    result = dryrun.dry_run(config)
  except (OSError, ValueError) as e:
    _error(e)
    return EXIT_ERROR
  print(dryrun.format_report(result, targets=targets))
  return 0


def _describe_os_error(error: OSError) -> str:
  """`path: what failed` from an OSError (both paths of a failed rename)."""
  if error.filename is None:
    return f"I/O error: {error}"
  path = os.fspath(error.filename)
  if error.filename2 is not None:
    path += f" -> {os.fspath(error.filename2)}"
  return f"I/O error on {path}: {error.strerror or error}"


def _stages_done_for(config, workdir: str) -> list[str]:
  """Stages the manifest records as done under this config, their recorded outputs still there
  as written (none when that cannot be told)."""
  import jax  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import config as config_lib  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import run_dir, runner  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  try:
    stages = fileio.read_json(os.path.join(workdir, "manifest.json"))["stages"]
    # The config alone (input files are not hashed again here: that can take minutes).
    hashes = runner.stage_hashes(config_lib.build(config, num_devices=jax.device_count()))
    return [name for name, entry in stages.items()
            if entry.get("status") == "done"
            and entry.get("config_hash", entry.get("hash")) == hashes.get(name)
            and not run_dir.output_problems(workdir, entry.get("outputs") or {})]
  except Exception:  # pylint: disable=broad-except
    # A message is being made for a run already stopping; claim nothing rather than fail.
    return []


def _models_kept(workdir: str, done_stages: Sequence[str]) -> tuple[list[str], list[str]]:
  """(trained models, "the checkpoint of step N of <model>"...) that this process trained in
  `workdir` and that are on disk, outside the `done_stages`' directories."""
  from visatb_jax.pipeline import run_dir  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  from visatb_jax.train import loop  # pylint: disable=g-import-not-at-top
  trained, checkpoints = [], []
  root = os.path.abspath(workdir)
  for directory in loop.checkpoint_directories():
    model = os.path.dirname(directory)
    rel = os.path.relpath(model, root)
    if rel.startswith(os.pardir) or rel.split(os.sep)[0] in done_stages:
      continue
    try:
      finished = bool(fileio.read_json(os.path.join(model, "run.json")).get("done"))
    except (OSError, ValueError, AttributeError):
      finished = False
    steps = run_dir.finished_steps(directory)
    if finished:
      trained.append(rel)
    elif steps:
      checkpoints.append(f"the checkpoint of step {steps[-1]} of {rel}")
  return trained, checkpoints


def _stopped_message(config, workdir: str, what: str) -> str:
  """`what` happened; what of this config is on disk in `workdir`; how to resume."""
  done = _stages_done_for(config, workdir) if config is not None else []
  trained, checkpoints = _models_kept(workdir, done)
  kept = ([f"completed stages ({', '.join(done)})"] if done else [])
  kept += [f"trained models ({', '.join(trained)})"] if trained else []
  kept += checkpoints
  if not kept:
    return f"{what}; nothing in {workdir} is complete yet; run the same command again to start"
  return (f"{what}; kept in {workdir}: {', '.join(kept)}; run the same command again to "
          "resume")


class _Terminated(BaseException):
  """SIGTERM outside training (training itself saves a checkpoint first: `loop.Preempted`)."""


_STOPPING = threading.Event()  # set once main handles a stop: later signals change nothing


def _stopping() -> None:
  """From here on, a second Ctrl-C or SIGTERM cannot interrupt the message and the exit."""
  _STOPPING.set()
  signal.signal(signal.SIGINT, signal.SIG_IGN)


_RESEND_DELAY_S = 0.05  # a dropped stop exception: sent again once the dropping code returned
_RESEND_UNTIL_STOPPED_S = 1.0  # any stop exception: sent again while the run has not stopped


def _resend(signum: int, delay_s: float) -> None:
  """Sends `signum` to this process after `delay_s`, unless main is stopping by then."""

  def send():
    if not _STOPPING.is_set():
      os.kill(os.getpid(), signum)

  timer = threading.Timer(delay_s, send)
  timer.daemon = True
  timer.start()


def _raise_stop(signum, frame) -> None:
  """Ctrl-C and SIGTERM outside training: KeyboardInterrupt or _Terminated, sent again until
  main handles one.

  Python runs this between any two bytecodes, also inside code that discards exceptions it did
  not expect: C code asking `hasattr` of an object whose `__getattr__` is Python (the exception
  is cleared), a library's `except BaseException` around a wait. Such a stop would be lost, and
  the run would finish normally; sent again every second, it ends the run at the next bytecode
  that lets it through.
  """
  del frame
  if _STOPPING.is_set():
    return
  _resend(signum, _RESEND_UNTIL_STOPPED_S)
  raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()


def _late_read_callback(unraisable) -> bool:
  """Whether `unraisable` is a read finishing after orbax gave up on its restore.

  When one array of a damaged checkpoint fails, orbax closes its event loop while tensorstore
  still reads the others; each of those reads then reports to the closed loop ("Event loop is
  closed", a traceback apiece on stderr) after the run's own one-line error. Nothing waits for
  them any more, so they are dropped.
  """
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return any(f.name == "call_soon_threadsafe" and f.filename.endswith(
      os.path.join("asyncio", "base_events.py")) for f in frames)


def _redeliver_dropped_signals(unraisable) -> None:
  """`sys.unraisablehook`: a stop signal whose exception was dropped is delivered again.

  Python runs a signal handler between any two bytecodes, also inside a garbage-collection or
  `__del__` callback, where a raised exception is printed ("Exception ignored in ...") and
  dropped: the run would go on. The signal is sent again shortly, from another thread, so that its
  handler runs once this hook has returned (here, its exception would be dropped too).
  """
  stop = {KeyboardInterrupt: signal.SIGINT, _Terminated: signal.SIGTERM}
  signum = next((s for e, s in stop.items() if isinstance(unraisable.exc_value, e)), None)
  if signum is None:
    if not _late_read_callback(unraisable):
      sys.__unraisablehook__(unraisable)
  elif not _STOPPING.is_set():
    _resend(signum, _RESEND_DELAY_S)


def _handle_stop_signals() -> None:
  """Ctrl-C and SIGTERM end the run with one line (atomic writes clean up on the way).

  SIGTERM only in single-process runs: in a multi-process run JAX's preemption notifier owns it,
  so that every host stops training at the same step; a handler installed outside Python is left
  alone too. Training replaces these handlers by its own while it runs: they only set a flag, and
  the run stops at the next step boundary with that step saved (`loop.Preempted`,
  `loop.Interrupted`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  sys.unraisablehook = _redeliver_dropped_signals
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _raise_stop)
  if jax.process_count() == 1 and signal.getsignal(signal.SIGTERM) is not None:
    signal.signal(signal.SIGTERM, _raise_stop)


def _exit_at_once(code: int) -> NoReturn:
  """Ends the process with `code` without the interpreter's shutdown.

  A stop signal may land while XLA compiles or runs in its own threads, or while side-by-side
  preparation runs (prep.parallel > 1) train in Python threads; finalising the interpreter under
  them crashed (a segmentation fault instead of the exit code) or waited for the runs to end.
  What the run wrote is complete by now: atomic writes cleaned up while the exception unwound,
  and training waited for its started checkpoint saves.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _run_pipeline(config, workdir: str, stages: list[str] | None, overwrite: bool = False) -> int:
  """Runs the pipeline; every error the user must act on is one line and an exit code."""
  from visatb_jax import pipeline  # pylint: disable=g-import-not-at-top
  from visatb_jax.data import images  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  from visatb_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    if fileio.is_primary():
      # Left by atomic writes of a killed run; nothing writes into the run directory yet.
      fileio.remove_stale_temporaries(workdir)
    pipeline.run(config, workdir, stages=stages, overwrite=overwrite)
  except loop.Preempted as e:  # training saved the step it reached, then stopped
    _stopping()
    model = os.path.relpath(os.path.dirname(e.directory), os.path.abspath(workdir))
    interrupted = isinstance(e, loop.Interrupted)
    _error(_stopped_message(
        config, workdir, f"{'interrupted' if interrupted else 'preempted'}: training of {model} "
        f"stopped at step {e.step} by {e.signal_name} and saved it"))
    return EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED
  except (pipeline.PipelineError, loop.TrainingDiverged, images.ImageError,
          checkpoint.CheckpointError) as e:
    _error(e)
    return EXIT_ERROR
  except OSError as e:
    _error(_describe_os_error(e))
    return EXIT_ERROR
  return 0


def main(argv: Sequence[str]) -> int:
  del argv
  config = _CONFIG.value
  if config is None:
    _error("--config is required, e.g. --config configs/demo.py")
    return EXIT_ERROR
  workdir = _WORKDIR.value or os.path.join("runs", config.get("name", "run"))
  try:
    # orbax logs every checkpoint operation at INFO; progress comes from the pipeline itself.
    logging.set_verbosity(logging.WARNING)
    if _DRY_RUN.value and _DRY_RUN_DEVICES.value:
      # Before jax is first imported: the simulated devices are fixed at backend start-up.
      os.environ["JAX_PLATFORMS"] = "cpu"
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                 f"device_count={_DRY_RUN_DEVICES.value}").strip()
    from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()  # before anything touches a device; no-op on one host
    if _DRY_RUN.value:
      return _dry_run(config)
    stages = None if _STAGES.value == ["all"] else _STAGES.value
    _handle_stop_signals()
    return _run_pipeline(config, workdir, stages, _OVERWRITE.value)
  except KeyboardInterrupt:
    _stopping()
    _error(_stopped_message(config, workdir, "interrupted"))
    _exit_at_once(EXIT_INTERRUPTED)
  except _Terminated:
    _stopping()
    _error(_stopped_message(config, workdir, "terminated by SIGTERM"))
    _exit_at_once(EXIT_PREEMPTED)


def run_cli() -> None:
  try:
    sys.argv = rewrite_config_arg(sys.argv)
  except app.UsageError as e:
    _error(e)
    sys.exit(EXIT_ERROR)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_cli()
