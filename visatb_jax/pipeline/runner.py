"""Running the pipeline: which stages, in which order, skipped when done, refused when stale.

A stage is skipped when `manifest.json` says it finished under its current hash, the outputs it
recorded are still there as it wrote them (run_dir.output_digest), and the stages whose outputs it
reads are done and hold the outputs it was made from. So a deleted or changed output re-runs the
stage that wrote it, and a stage whose inputs were made again with other contents (the report
after new test scores) runs again; the log names the file or the stage. Inside a stage,
every trained model and every score file carries that hash too, and training resumes from its
last checkpoint, so a run killed at any moment resumes where it stopped with the same results.
A stage whose inputs were made under another config, or from user files that changed since
(`data.input_fingerprints`), is never fed them: a full run re-runs the stale stages (and says
why), and a stage selected with `--stages` stops with the command that refreshes its inputs.
A run directory whose finished stages another config made is never overwritten silently: the run
stops before writing anything unless `overwrite` is set. A damaged manifest is rebuilt from the
models' run.json files, with a warning: the stages whose models are all there under the current
config count as done, and the others run again (their scores come from the models' caches).
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
from visatb_jax.pipeline import run_dir as run_dir_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.run_dir import Manifest, config_hash
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio, host_memory

# What each stage writes, named in the messages about stale inputs.
_OUTPUTS = {"data": "data/", "pretrain": "pretrain/", "prep": "prep/",
            "validate": "scores/validation.json",
            "lambda": "lambda.json", "final": "final/", "test": "scores/test.json",
            "report": "report/"}


# Bumped when the same config starts to mean other work, so that a run directory made before
# never passes for done. 2: train.batch_size and pretrain.batch_size count samples, not rows;
# decoder layers stored stacked (an older checkpoint cannot be restored into them).
HASH_FORMAT = 2


def stage_hashes(run_config: config_lib.RunConfig,
                 inputs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
  """Chained per-stage hashes: each covers its stage's sections, the fingerprint of the user
  files it reads (`inputs`: stage -> fingerprint, see `data.input_fingerprints`) and the stage
  before it."""
  hashes, prev = {}, f"format {HASH_FORMAT}"
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


def _stage(name: str) -> stages_lib.Stage:
  return stages_lib.STAGES[stages_lib.STAGE_NAMES.index(name)]


@dataclasses.dataclass(frozen=True)
class _Verdict:
  """Whether a stage counts as done, and if not, why (empty: it never finished)."""
  done: bool
  why: str = ""
  broken: tuple[str, ...] = ()  # its recorded outputs that are missing or changed


def _problems_phrase(problems: Sequence[tuple[str, str]]) -> str:
  rel, what = problems[0]
  more = f"; {len(problems) - 1} other output(s) too" if len(problems) > 1 else ""
  return f"its output {rel} {what}{more}"


class _Status:
  """Which stages of the run directory count as done for this config, and why the others do
  not: finished under the current hash, with the outputs they recorded as they wrote them, and
  made from the current outputs of the done stages they read."""

  def __init__(self, run_config: config_lib.RunConfig, man: Manifest, h: _Hashes, workdir: str):
    self._config, self._man, self._h, self._workdir = run_config, man, h, workdir
    self._problems: dict[str, list[tuple[str, str]]] = {}  # per stage; digests cost file reads

  def forget(self, name: str) -> None:
    """Drops what was checked of `name`'s outputs (its entry changed)."""
    self._problems.pop(name, None)

  def outputs_digest(self, name: str) -> str | None:
    """One digest of what stage `name` recorded as its outputs (None: nothing recorded)."""
    entry = self._man.data["stages"].get(name) or {}
    return config_hash(entry["outputs"]) if "outputs" in entry else None

  def made_from(self, stage: stages_lib.Stage) -> dict[str, str | None]:
    """What a stage finishing now records of its inputs: each needed input stage's digest."""
    return {name: self.outputs_digest(name) for name in stage.inputs
            if _needed(_stage(name), self._config)}

  def verdict(self, name: str) -> _Verdict:
    entry = self._man.data["stages"].get(name)
    if not entry or entry.get("status") != "done":
      return _Verdict(False)
    if entry.get("hash") != self._h.stage[name]:
      return _Verdict(False, _why_stale(entry, name, self._h))
    # Entries written before outputs were recorded are trusted as they were then.
    if "outputs" in entry:
      if name not in self._problems:
        self._problems[name] = run_dir_lib.output_problems(self._workdir, entry["outputs"])
      problems = self._problems[name]
      if problems:
        return _Verdict(False, _problems_phrase(problems), tuple(p for p, _ in problems))
    made_from = entry.get("made_from")
    for source in _stage(name).inputs:
      if not _needed(_stage(source), self._config):
        continue
      upstream = self.verdict(source)
      if not upstream.done:
        return _Verdict(False, f"its input stage {source} is not done"
                        + (f" ({upstream.why})" if upstream.why else ""))
      if made_from is not None and made_from.get(source) != self.outputs_digest(source):
        return _Verdict(False, f"stage {source} made new outputs since it ran")
      if made_from is None and _ran_before(entry, self._man.data["stages"][source]):
        # An entry from before outputs were recorded: only the order of the runs tells.
        return _Verdict(False, f"stage {source} ran after it")
    return _Verdict(True)


def _ran_before(entry: Mapping[str, Any], source: Mapping[str, Any]) -> bool:
  """True when `entry` was done before its input stage's `source` was (timestamps to the second,
  which sort as text)."""
  when, then = entry.get("updated"), source.get("updated")
  return isinstance(when, str) and isinstance(then, str) and when < then


def _check_inputs(stage: stages_lib.Stage, run_config: config_lib.RunConfig, man: Manifest,
                  h: _Hashes, status: _Status, selected: Sequence[str] | None, workdir: str,
                  coming: Collection[str] = ()) -> None:
  """Stops a stage whose inputs are missing, or stale: made under another config, from user
  files that changed since, or with outputs removed or changed since. `coming`: stages this run
  redoes before it."""
  names = stages_lib.STAGE_NAMES
  for name in stage.inputs:
    producer = _stage(name)
    if not _needed(producer, run_config) or name in coming:
      continue
    verdict = status.verdict(name)
    if verdict.done:
      continue
    entry = man.data["stages"].get(name)
    done = bool(entry) and entry.get("status") == "done"
    redo = [s for s in names if names.index(name) <= names.index(s) <= names.index(stage.name)]
    if done and not _config_changed(entry, name, h):
      state = f"is stale: {verdict.why}"
      # Changed files are read upstream of `name`: the refresh starts at the first stale stage.
      first = next(s.name for s in stages_lib.STAGES
                   if _needed(s, run_config) and not status.verdict(s.name).done)
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


def _preflight(run_config: config_lib.RunConfig, man: Manifest, h: _Hashes, status: _Status,
               selected: Sequence[str] | None, workdir: str, overwrite: bool) -> None:
  """Before anything is written: the stale-input errors of `--stages`, then the refusal to
  replace the outputs of stages another config finished."""
  to_run = [s for s in stages_lib.STAGES if (not selected or s.name in selected)
            and _needed(s, run_config) and not status.verdict(s.name).done]
  for i, stage in enumerate(to_run):
    _check_inputs(stage, run_config, man, h, status, selected, workdir,
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
  status = _Status(config, man, h, workdir)
  allowed = allowed_sections()
  damaged = man.damaged
  if damaged:
    rebuilt = _rebuild(ws, man, h, allowed)
    kept = (f"stage(s) {', '.join(rebuilt)} done under this config" if rebuilt
            else "no stage done under this config")
    stages_lib.log(f"warning: {man.path} {damaged}; rebuilt it from the models' run.json files: "
                   f"{kept}; the other stages run again (scores come from the models' caches)")
  _preflight(config, man, h, status, stages, workdir, overwrite)
  if damaged:
    man.save()  # the rebuilt manifest replaces the damaged one
  _use_compilation_cache(os.path.join(workdir, "xla_cache"))
  fileio.atomic_write_json(ws.dir.path("config.json"), _config_record(config))
  stages_lib.log(f"run directory {os.path.abspath(workdir)}")
  stages_lib.log(host_memory.status_line())
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
    verdict = status.verdict(stage.name)
    if verdict.done:
      stages_lib.log(f"stage {stage.name}: done, skipped")
      continue
    _check_inputs(stage, config, man, h, status, stages, workdir)
    stages_lib.log(f"stage {stage.name}: start" + (f" ({verdict.why})" if verdict.why else ""))
    for directory in {run_dir_lib.model_directory(p) for p in verdict.broken} - {None}:
      ws.dir.release(directory)  # trained again (resumed), not skipped as finished
    man.mark(stage.name, "running", stage_hash, **_record(stage.name, h))
    status.forget(stage.name)
    ws.enter_stage(stage.name, allowed[stage.name])
    t0 = time.time()
    try:
      stage.run(ws, stage_hash)
    except fileio.JSONFileError as e:  # a damaged file of the run directory or the user's
      raise PipelineError(f"stage {stage.name}: {e}") from e
    seconds = time.time() - t0
    man.mark(stage.name, "done", stage_hash, seconds=round(seconds, 2), **_record(stage.name, h),
             **_finished(stage, config, status, workdir))
    status.forget(stage.name)
    stages_lib.log(f"stage {stage.name}: done in {seconds:.1f}s")
  fileio.sync("pipeline done")


def _finished(stage: stages_lib.Stage, run_config: config_lib.RunConfig, status: _Status,
              workdir: str) -> dict[str, Any]:
  """What a done stage's entry records beyond its hashes: the digests of the outputs it wrote,
  and those of the outputs it read (its input stages')."""
  return {"outputs": run_dir_lib.output_digests(workdir, stage.outputs(run_config)),
          "made_from": status.made_from(stage)}


def _model_infos(ws: Workspace, expected: Mapping[str, str]) -> dict[str, dict | None]:
  """{model directory: its run.json (None: absent or damaged)}."""
  out = {}
  for rel in expected:
    try:
      out[rel] = ws.dir.run_info(rel) if os.path.exists(ws.dir.path(rel, "run.json")) else None
    except PipelineError:  # unfinished or damaged
      out[rel] = None
  return out


def _rebuild(ws: Workspace, man: Manifest, h: _Hashes,
             allowed: Mapping[str, tuple[str, ...]]) -> list[str]:
  """Fills the emptied entries of a damaged manifest from the models' run.json files; returns
  the stages recorded as done under the current config.

  A model stage (pretrain, prep, final) is done when every model it trains under this config is
  finished under the hash this config gives it, with its last checkpoint; the data stage is done
  when one is (their hashes chain over its own) and its outputs are there. A model stage with a
  finished model under another hash holds another config's outputs: recorded as such, so that
  the run is refused without --overwrite. The stages that train nothing run again: their scores
  come from the models' caches."""
  run_config = ws.run_config
  done = []
  for stage in stages_lib.STAGES:
    if not _needed(stage, run_config):
      continue
    ws.enter_stage(stage.name, allowed[stage.name])
    expected = stages_lib.model_hashes(ws, stage.name)
    if not expected:
      continue
    infos = _model_infos(ws, expected)
    if all(info and info.get("hash") == expected[rel]
           and run_dir_lib.final_checkpoint_exists(ws.dir.path(rel), info)
           for rel, info in infos.items()):
      done.append(stage.name)
    elif any(info and info.get("hash") != expected[rel] for rel, info in infos.items()):
      # Models another config trained, which this run would replace: not without --overwrite.
      man.data["stages"][stage.name] = {"status": "done", "hash": None, "config_hash": None,
                                        "rebuilt": True}
  data = _stage("data")
  if done and all(run_dir_lib.output_digests(ws.workdir, [p]) for p in data.outputs(run_config)):
    done.insert(0, "data")
  for name in done:
    # No "made_from": the models' hashes already bind them to their inputs' config, and the
    # stages that train nothing are made again (from the same models, so with the same outputs).
    outputs = run_dir_lib.output_digests(ws.workdir, _stage(name).outputs(run_config))
    man.data["stages"][name] = {"status": "done", "hash": h.stage[name], **_record(name, h),
                                "rebuilt": True, "outputs": outputs}
  man.data["stages"] = {s: man.data["stages"][s] for s in stages_lib.STAGE_NAMES
                        if s in man.data["stages"]}
  ws.config = run_config
  return done
