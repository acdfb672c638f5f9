"""Running the pipeline: which stages, in which order, skipped when done, refused when stale.

A stage is skipped when `manifest.json` says it finished under its current hash. Inside a stage,
every trained model and every score file carries that hash too, and training resumes from its
last checkpoint, so a run killed at any moment resumes where it stopped with the same results.
A stage whose inputs were made under another config, or from user files that changed since
(`data.input_fingerprints`), is never fed them: a full run re-runs the stale stages (and says
why), and a stage selected with `--stages` stops with the command that refreshes its inputs.
A run directory whose finished stages another config made is never overwritten silently: the run
stops before writing anything unless `overwrite` is set.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import data as data_lib
from visatb_jax.pipeline import stages as stages_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.run_dir import Manifest, config_hash
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio

# What each stage writes, named in the messages about stale inputs.
_OUTPUTS = {"data": "data/", "pretrain": "pretrain/", "prep": "prep/",
            "validate": "scores/validation.json",
            "lambda": "lambda.json", "final": "final/", "test": "scores/test.json",
            "report": "report/"}


def stage_hashes(run_config: config_lib.RunConfig,
                 inputs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
  """Chained per-stage hashes: each covers its stage's sections, the fingerprint of the user
  files it reads (`inputs`: stage -> fingerprint, see `data.input_fingerprints`) and the stage
  before it."""
  hashes, prev = {}, ""
  for stage in stages_lib.STAGES:
    covered = {"prev": prev, **{s: run_config.section(s) for s in stage.sections}}
    if (inputs or {}).get(stage.name):  # absent when none: a `shapes` run keeps its hashes
      covered["input files"] = inputs[stage.name]
    prev = config_hash(covered)
    hashes[stage.name] = prev
  return hashes


@dataclasses.dataclass(frozen=True)
class _Hashes:
  """What each stage's manifest entry is compared with."""

  stage: dict[str, str]  # config and input files: the stage is done under this hash
  config: dict[str, str]  # the config alone: tells a config change from changed input files
  inputs: dict[str, dict[str, Any]]  # fingerprint of the files each stage's hash covers


def _hashes(run_config: config_lib.RunConfig) -> _Hashes:
  own = data_lib.input_fingerprints(run_config)
  covered, seen = {}, {}
  for stage in stages_lib.STAGES:  # the chain: a stage's hash covers earlier stages' files
    seen = {**seen, **own.get(stage.name, {})}
    covered[stage.name] = seen
  return _Hashes(stage_hashes(run_config, own), stage_hashes(run_config), covered)


def _record(name: str, h: _Hashes) -> dict[str, Any]:
  """Manifest fields beyond the stage hash: enough to say later why the stage is stale."""
  out: dict[str, Any] = {"config_hash": h.config[name]}
  if h.inputs[name]:
    out["inputs"] = h.inputs[name]
  return out


def _config_changed(entry: Mapping[str, Any], name: str, h: _Hashes) -> bool:
  # An entry written before input files were fingerprinted holds the config's hash alone.
  return entry.get("config_hash", entry.get("hash")) != h.config[name]


def _why_stale(entry: Mapping[str, Any], name: str, h: _Hashes) -> str:
  """Why a stage done under another hash runs again, e.g. "input file X changed since it ran"."""
  if _config_changed(entry, name, h):
    return "its config changed since it ran"
  if "inputs" not in entry:
    return "its input files were not fingerprinted when it ran"
  changes = data_lib.input_changes(entry["inputs"], h.inputs[name])
  if not changes:
    return "its inputs changed since it ran"
  more = f"; {len(changes) - 1} other input file(s) too" if len(changes) > 1 else ""
  return f"{changes[0]} since it ran{more}"


def _done_under_another_config(man: Manifest, name: str, h: _Hashes) -> bool:
  entry = man.data["stages"].get(name)
  return bool(entry) and entry.get("status") == "done" and _config_changed(entry, name, h)


def allowed_sections() -> dict[str, tuple[str, ...]]:
  """The sections each stage may read: its own and every earlier stage's (hashes are chained)."""
  out, seen = {}, []
  for stage in stages_lib.STAGES:
    seen += list(stage.sections)
    out[stage.name] = tuple(seen)
  return out


def _use_compilation_cache(directory: str) -> None:
  """XLA's persistent cache: a resumed or repeated run does not compile its steps again."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _needed(stage: stages_lib.Stage, run_config: config_lib.RunConfig) -> bool:
  if stage.balance_only and not run_config.needs_balance:
    return False
  return not (stage.pretrain_only and not run_config.pretrain)


def _check_inputs(stage: stages_lib.Stage, run_config: config_lib.RunConfig, man: Manifest,
                  h: _Hashes, selected: Sequence[str] | None, workdir: str,
                  coming: Collection[str] = ()) -> None:
  """Stops a stage whose inputs are missing, or stale: made under another config or from user
  files that changed since. `coming`: stages this run redoes before it."""
  names = stages_lib.STAGE_NAMES
  for name in stage.inputs:
    producer = stages_lib.STAGES[names.index(name)]
    if not _needed(producer, run_config) or name in coming:
      continue
    if man.is_done(name, h.stage[name]):
      continue
    entry = man.data["stages"].get(name)
    done = bool(entry) and entry.get("status") == "done"
    redo = [s for s in names if names.index(name) <= names.index(s) <= names.index(stage.name)]
    if done and not _config_changed(entry, name, h):
      state = f"is stale: {_why_stale(entry, name, h)}"
      # Changed files are read upstream of `name`: the refresh starts at the first stale stage.
      first = next(s.name for s in stages_lib.STAGES
                   if _needed(s, run_config) and not man.is_done(s.name, h.stage[s.name]))
      redo = [s.name for s in stages_lib.STAGES if _needed(s, run_config)
              and names.index(first) <= names.index(s.name) <= names.index(stage.name)]
    else:
      state = ("was made under another config" if done
               else "does not exist yet" if not entry else f"is {entry.get('status')}")
    hint = f"--stages {','.join(redo)}" if selected else "the full pipeline"
    raise PipelineError(
        f"stage {stage.name} needs {os.path.join(workdir, _OUTPUTS[name])} from stage {name}, "
        f"which {state}; run {hint} (or drop --stages to run every stale stage)")


def _config_record(run_config: config_lib.RunConfig) -> dict[str, Any]:
  """config.json: the run config's sections, which the report reads (e.g. metric directions)."""
  sections = dict(run_config.sections)
  tasks = sections.pop("tasks")
  return {**sections, "tasks": tasks["tasks"], "task_order": tasks["task_order"]}


def _preflight(run_config: config_lib.RunConfig, man: Manifest, h: _Hashes,
               selected: Sequence[str] | None, workdir: str, overwrite: bool) -> None:
  """Before anything is written: the stale-input errors of `--stages`, then the refusal to
  replace the outputs of stages another config finished."""
  to_run = [s for s in stages_lib.STAGES if (not selected or s.name in selected)
            and _needed(s, run_config) and not man.is_done(s.name, h.stage[s.name])]
  for i, stage in enumerate(to_run):
    _check_inputs(stage, run_config, man, h, selected, workdir,
                  coming={s.name for s in to_run[:i]})
  # Changed input files are not a config change: those stages are redone without asking.
  replaced = [s.name for s in to_run if _done_under_another_config(man, s.name, h)]
  if replaced and not overwrite:
    raise PipelineError(
        f"run directory {workdir} was made by another config: this one would replace the "
        f"outputs of stage(s) {', '.join(replaced)}; run with --overwrite to replace them, or "
        "choose a new --workdir")


def run(config: Any, workdir: str, *, stages: Sequence[str] | None = None,
        num_devices: int | None = None, overwrite: bool = False) -> None:
  """Runs the requested stages (default: all) in order, skipping those already done.

  `config`: a config file's ConfigDict (checked here, before any stage) or a RunConfig.
  `overwrite`: redo stages that another config finished in `workdir` (else PipelineError, and
  nothing in `workdir` is touched).
  """
  unknown = sorted(set(stages or ()) - set(stages_lib.STAGE_NAMES))
  if unknown:
    raise PipelineError(f"unknown stage(s) {unknown}; stages are {list(stages_lib.STAGE_NAMES)}")
  if not isinstance(config, config_lib.RunConfig):
    if num_devices is None:
      import jax  # pylint: disable=g-import-not-at-top
      num_devices = jax.device_count()
    config = config_lib.build(config, num_devices=num_devices)
  ws = Workspace(config, workdir)
  h = _hashes(config)
  ws.stage_hashes = dict(h.stage)
  man = Manifest(workdir, config_hash(config.sections))
  _preflight(config, man, h, stages, workdir, overwrite)
  _use_compilation_cache(os.path.join(workdir, "xla_cache"))
  allowed = allowed_sections()
  fileio.atomic_write_json(ws.dir.path("config.json"), _config_record(config))
  stages_lib.log(f"run directory {os.path.abspath(workdir)}")
  for stage in stages_lib.STAGES:
    if stages and stage.name not in stages:
      continue
    if not _needed(stage, config):
      why = ("no config.pretrain" if stage.pretrain_only else
             f"weighting={config.main_method!r}, no 'visatb' in baselines")
      stages_lib.log(f"stage {stage.name}: not needed ({why})")
      continue
    # Every process reads the manifest between the same two barriers, so all take the same path.
    fileio.sync(f"stage {stage.name}")
    stage_hash = h.stage[stage.name]
    if man.is_done(stage.name, stage_hash):
      stages_lib.log(f"stage {stage.name}: done, skipped")
      continue
    _check_inputs(stage, config, man, h, stages, workdir)
    entry = man.data["stages"].get(stage.name)
    why = (f" ({_why_stale(entry, stage.name, h)})" if entry and entry.get("status") == "done"
           else "")
    stages_lib.log(f"stage {stage.name}: start{why}")
    man.mark(stage.name, "running", stage_hash, **_record(stage.name, h))
    ws.enter_stage(stage.name, allowed[stage.name])
    t0 = time.time()
    stage.run(ws, stage_hash)
    seconds = time.time() - t0
    man.mark(stage.name, "done", stage_hash, seconds=round(seconds, 2), **_record(stage.name, h))
    stages_lib.log(f"stage {stage.name}: done in {seconds:.1f}s")
  fileio.sync("pipeline done")
