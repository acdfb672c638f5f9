"""Running the pipeline: which stages, in which order, skipped when done, refused when stale.

A stage is skipped when `manifest.json` says it finished under its current hash. Inside a stage,
every trained model and every score file carries that hash too, and training resumes from its
last checkpoint, so a run killed at any moment resumes where it stopped with the same results.
A stage whose inputs were made under another config is never fed them: a full run re-runs the
stale stages (and says why), and a stage selected with `--stages` stops with the command that
refreshes its inputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from visatb_jax.pipeline import config as config_lib
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


def stage_hashes(run_config: config_lib.RunConfig) -> dict[str, str]:
  """Chained per-stage hashes: each covers its stage's sections and the stage before it."""
  hashes, prev = {}, ""
  for stage in stages_lib.STAGES:
    prev = config_hash({"prev": prev, **{s: run_config.section(s) for s in stage.sections}})
    hashes[stage.name] = prev
  return hashes


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
                  hashes: dict[str, str], selected: Sequence[str] | None, workdir: str) -> None:
  """Stops a stage whose inputs are missing or were made under another config."""
  for name in stage.inputs:
    producer = next(s for s in stages_lib.STAGES if s.name == name)
    if not _needed(producer, run_config):
      continue
    if man.is_done(name, hashes[name]):
      continue
    entry = man.data["stages"].get(name)
    state = ("was made under another config" if entry and entry.get("status") == "done"
             else "does not exist yet" if not entry else f"is {entry.get('status')}")
    redo = [s for s in stages_lib.STAGE_NAMES
            if stages_lib.STAGE_NAMES.index(name) <= stages_lib.STAGE_NAMES.index(s)
            <= stages_lib.STAGE_NAMES.index(stage.name)]
    hint = f"--stages {','.join(redo)}" if selected else "the full pipeline"
    raise PipelineError(
        f"stage {stage.name} needs {os.path.join(workdir, _OUTPUTS[name])} from stage {name}, "
        f"which {state}; run {hint} (or drop --stages to run every stale stage)")


def _config_record(run_config: config_lib.RunConfig) -> dict[str, Any]:
  """config.json: the run config's sections, which the report reads (e.g. metric directions)."""
  sections = dict(run_config.sections)
  tasks = sections.pop("tasks")
  return {**sections, "tasks": tasks["tasks"], "task_order": tasks["task_order"]}


def run(config: Any, workdir: str, *, stages: Sequence[str] | None = None,
        num_devices: int | None = None) -> None:
  """Runs the requested stages (default: all) in order, skipping those already done.

  `config`: a config file's ConfigDict (checked here, before any stage) or a RunConfig.
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
  _use_compilation_cache(os.path.join(workdir, "xla_cache"))
  hashes = stage_hashes(config)
  man = Manifest(workdir, config_hash(config.sections))
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
    if man.is_done(stage.name, hashes[stage.name]):
      stages_lib.log(f"stage {stage.name}: done, skipped")
      continue
    _check_inputs(stage, config, man, hashes, stages, workdir)
    entry = man.data["stages"].get(stage.name)
    why = (" (its config changed since it ran)" if entry and entry.get("status") == "done"
           else "")
    stages_lib.log(f"stage {stage.name}: start{why}")
    man.mark(stage.name, "running", hashes[stage.name])
    ws.enter_stage(stage.name, allowed[stage.name])
    t0 = time.time()
    stage.run(ws, hashes[stage.name])
    seconds = time.time() - t0
    man.mark(stage.name, "done", hashes[stage.name], seconds=round(seconds, 2))
    stages_lib.log(f"stage {stage.name}: done in {seconds:.1f}s")
  fileio.sync("pipeline done")
