"""Command line: run the whole VisATB pipeline, or some of its stages.

  python -m visatb_jax.launch --config configs/demo.py [--config.train.epochs=2]
      [--workdir runs/demo] [--stages prep,validate]
  python -m visatb_jax.launch --config academic.py --dry-run [--dry_run_devices=8]

`--config NAME.py` is looked up as given, then in the project's `configs/` folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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


def _rewrite_config_arg(argv: Sequence[str]) -> list[str]:
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
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model abstractly (no weights), compile the train step for the "
    "config's mesh and print per-device parameter, optimizer and activation memory.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "With --dry-run: simulate this many CPU devices (e.g. the chips of the "
    "target slice) instead of using the local ones.")


def _dry_run(config) -> int:
  from visatb_jax.cli import dryrun
  try:
    result = dryrun.dry_run(config)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(dryrun.format_report(result))
  return 0


def main(argv: Sequence[str]) -> int:
  del argv
  # orbax logs every checkpoint operation at INFO; progress comes from the pipeline itself.
  logging.set_verbosity(logging.WARNING)
  if _DRY_RUN.value and _DRY_RUN_DEVICES.value:
    # Before jax is first imported: the simulated devices are fixed at backend start-up.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={_DRY_RUN_DEVICES.value}").strip()
  from visatb_jax.runtime import sharding
  sharding.initialize_distributed()  # before anything touches a device; no-op on one host
  from visatb_jax import pipeline  # Deferred: jax initialises only after flags are parsed.

  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/demo.py")
  if _DRY_RUN.value:
    return _dry_run(config)
  workdir = _WORKDIR.value or os.path.join("runs", config.get("name", "run"))
  stages = None if _STAGES.value == ["all"] else _STAGES.value
  from visatb_jax import train
  try:
    pipeline.run(config, workdir, stages=stages)
  except (pipeline.PipelineError, train.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def run_cli() -> None:
  try:
    sys.argv = _rewrite_config_arg(sys.argv)
  except app.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run_cli()
