"""Command line: run the whole VisATB pipeline, or some of its stages.

  python -m visatb_jax.launch --config configs/demo.py [--config.train.epochs=2]
      [--workdir runs/demo] [--stages prep,validate] [--overwrite]
  python -m visatb_jax.launch --config academic.py --dry-run [--dry_run_devices=8]

`--config NAME.py` is looked up as given, then in the project's `configs/` folder. A run
directory whose finished stages another config made is refused (exit 2, nothing touched) unless
`--overwrite` is given.

Every problem the user must act on ends the command with one line `error: ...` on stderr:
exit code 2 for a bad flag, config field or input, an image that does not decode, an I/O error
(naming the path) or a diverged run; 130 for Ctrl-C and 143 for SIGTERM (a preempted VM, a
scheduler's time limit; training saves its step first), both resumed by the same command.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

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


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")
_STAGES = flags.DEFINE_list("stages", ["all"], "Stages to run, comma separated, or 'all'.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the outputs of stages that another config finished in the run "
    "directory (without it such a run stops before touching anything).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model abstractly (no weights), compile the train step for the "
    "config's mesh and print per-device parameter, optimizer and activation memory.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "With --dry-run: simulate this many CPU devices (e.g. the chips of the "
    "target slice) instead of using the local ones.")
_TARGET = flags.DEFINE_list(
    "target", [], "With --dry-run: the chips whose roofline estimate to print (v5p, h100, h200; "
    "default all).")


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


def _completed_stages(workdir: str) -> list[str]:
  """Stages the run directory's manifest records as done (none when it cannot be read)."""
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  try:
    stages = fileio.read_json(os.path.join(workdir, "manifest.json"))["stages"]
    return [name for name, entry in stages.items() if entry.get("status") == "done"]
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return []


def _interrupted_message(workdir: str, what: str) -> str:
  """What was kept and how to resume, after the run stopped between two checkpoints."""
  done = _completed_stages(workdir)
  kept = f"completed stages ({', '.join(done)})" if done else "completed stages"
  return (f"{what}; {kept} and the last training checkpoint of each model in {workdir} "
          "are kept; run the same command again to resume")


class _Terminated(BaseException):
  """SIGTERM outside training (training itself saves a checkpoint first: `loop.Preempted`)."""


_STOPPING = threading.Event()  # set once main handles a stop: later signals change nothing


def _stopping() -> None:
  """From here on, a second Ctrl-C or SIGTERM cannot interrupt the message and the exit."""
  _STOPPING.set()
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _raise_terminated(signum, frame) -> None:
  del signum, frame
  if not _STOPPING.is_set():
    raise _Terminated()


_RESEND_DELAY_S = 0.05


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
    sys.__unraisablehook__(unraisable)
  elif not _STOPPING.is_set():
    resend = threading.Timer(_RESEND_DELAY_S, os.kill, args=(os.getpid(), signum))
    resend.daemon = True
    resend.start()


def _handle_stop_signals() -> None:
  """Ctrl-C and SIGTERM end the run with one line (atomic writes clean up on the way).

  SIGTERM only in single-process runs: in a multi-process run JAX's preemption notifier owns it,
  so that every host stops training at the same step; a handler installed outside Python is left
  alone too. Training replaces this handler by its own while it runs (`loop.Preempted`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  sys.unraisablehook = _redeliver_dropped_signals
  if jax.process_count() == 1 and signal.getsignal(signal.SIGTERM) is not None:
    signal.signal(signal.SIGTERM, _raise_terminated)


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
  from visatb_jax.runtime import fileio  # pylint: disable=g-import-not-at-top
  from visatb_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    if fileio.is_primary():
      # Left by atomic writes of a killed run; nothing writes into the run directory yet.
      fileio.remove_stale_temporaries(workdir)
    pipeline.run(config, workdir, stages=stages, overwrite=overwrite)
  except loop.Preempted as e:
    _error(f"preempted: {e}")
    return EXIT_PREEMPTED
  except (pipeline.PipelineError, loop.TrainingDiverged, images.ImageError) as e:
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
    _error(_interrupted_message(workdir, "interrupted"))
    _exit_at_once(EXIT_INTERRUPTED)
  except _Terminated:
    _stopping()
    _error(_interrupted_message(workdir, "terminated by SIGTERM"))
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
