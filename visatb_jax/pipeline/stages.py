"""The whole VisATB method as resumable stages (DESIGN.md, "The data flow").

  data ─► prep (mini, <task>+mini) ─► validate ─► lambda ─► final (weighting + baselines) ─► test ─► report

`config.weighting` names the method of the run's own final model (default "visatb"); prep,
validate and lambda only run when VisATB is among the final models.

A stage is skipped when `manifest.json` says it finished under the same stage hash. Inside a stage,
every trained model and every score file carries that hash too, and training resumes from its last
checkpoint, so a run killed at any moment resumes where it stopped and ends with the same results.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from visatb_jax.core import balancing
from visatb_jax.runtime import fileio
from visatb_jax.pipeline import manifest
from visatb_jax.core import metrics
from visatb_jax.pipeline.experiment import Experiment, PipelineError

__all__ = ["PipelineError", "STAGES", "run"]

# (stage, config keys it reads); order is execution order.
_STAGE_INPUTS = (
    ("data", ("seed", "data", "task_order", "tasks")),
    ("prep", ("model", "train", "prep")),
    ("validate", ("eval",)),
    ("lambda", ("balance",)),
    ("final", ("weighting", "baselines", "weighting_options")),
    ("test", ()),
    ("report", ()),
)
STAGES = tuple(name for name, _ in _STAGE_INPUTS)


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- stages ------------------------------------------------------------------------------------


def stage_data(exp: Experiment, stage_hash: str) -> None:
  exp.prepare_data()


def prep_model_names(exp: Experiment) -> list[str]:
  return [name for name, _ in exp.prep_models()]


def _prep_dir(name: str) -> str | None:
  """Where a preparation model is trained; None for `base`, the initial model itself."""
  return None if name == "base" else os.path.join("prep", name)


def stage_prep(exp: Experiment, stage_hash: str) -> None:
  """Trains the preparation models: one after another on the whole mesh, or with
  `prep.parallel = K` side by side, K at a time, each on its own 1/K of the devices."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # logged below, once
    messages = exp.subset_warnings()
  for w in messages:
    _log(f"warning: {w}")
  names = [n for n in prep_model_names(exp) if n != "base"]  # base is the initial model
  ones = np.ones(exp.num_tasks, np.float32)

  def train_all(group, mesh=None):
    for name in group:
      exp.train_model(_prep_dir(name), exp.prep_examples(name), ones, stage_hash=stage_hash,
                      mesh=mesh)

  parallel = int(exp.config.prep.get("parallel") or 1)
  if parallel <= 1:
    train_all(names)
    return
  meshes = exp.sub_meshes(parallel)
  _log(f"prep: {len(names)} runs, {parallel} side by side on {meshes[0].devices.size} "
       f"device(s) each")
  # Threads: JAX dispatch is thread-safe and each group's computations run on its own devices;
  # the host work of one group (packing, batches, checkpoints) overlaps the others' steps.
  with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="prep") as pool:
    futures = [pool.submit(train_all, names[k::parallel], mesh) for k, mesh in enumerate(meshes)]
    for future in futures:
      future.result()  # the first failure, with its own traceback


def stage_validate(exp: Experiment, stage_hash: str) -> None:
  table = {}
  for name, tasks in exp.prep_models():
    table[name] = exp.score_model(_prep_dir(name), "val", stage_hash=stage_hash, tasks=tasks)
  fileio.atomic_write_json(exp.path("scores", "validation.json"), table)


def stage_lambda(exp: Experiment, stage_hash: str) -> None:
  scores = exp.read_output("scores", "validation.json")
  bal = exp.config.balance
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the report lists them; logged below, once
      report = balancing.balance_report(
          scores, tasks=list(exp.task_names), form=bal.form, temperature=bal.temperature,
          alpha=tuple(bal.alpha), fixed=exp.fixed_weights or None, groups=exp.groups or None,
          on_degenerate=bal.get("on_degenerate", "error"))
  except ValueError as e:
    raise PipelineError(f"cannot compute λ from scores/validation.json: {e}") from e
  for w in report.get("warnings", []):
    _log(f"warning: {w}")
  fileio.atomic_write_json(exp.path("lambda.json"), report)
  _log("λ = " + ", ".join(f"{t}={report['lambda'][t]:.3f}" for t in exp.task_names))


def main_method(config) -> str:
  """`config.weighting`: the method of the run's own final model (default VisATB)."""
  return str(config.get("weighting") or "visatb")


def final_methods(exp: Experiment) -> list[str]:
  main = main_method(exp.config)
  return [main] + [m for m in exp.config.baselines if m != main]


# Stages that exist only to produce VisATB's λ.
BALANCE_STAGES = ("prep", "validate", "lambda")


def needs_balance(config) -> bool:
  """Whether VisATB is among the final models (else prep, validate and lambda are not run)."""
  return main_method(config) == "visatb" or "visatb" in config.baselines


# Dynamic loss-weighting baselines (METHOD.md section 9), run in the same train step.
DYNAMIC_BASELINES = ("rlw", "dwa", "igb")
# Gradient-combination baselines (visatb_jax/gradmtl.py), in the per-task-gradient train step.
GRADIENT_BASELINES = ("imgrad", "cagrad", "pcgrad", "mgda", "nash")


def stage_final(exp: Experiment, stage_hash: str) -> None:
  lam = exp.read_output("lambda.json")["lambda"] if needs_balance(exp.config) else None
  ones = np.ones(exp.num_tasks, np.float32)
  for method in final_methods(exp):
    if method == "stl":
      for task in exp.eval_tasks:
        exp.train_model(os.path.join("final", "stl", task), exp.task_examples([task]), ones,
                        stage_hash=stage_hash)
      continue
    examples, run = exp.task_examples(exp.task_names), os.path.join("final", method)
    if method == "visatb":
      weights = np.array([lam[t] for t in exp.task_names], np.float32)
      exp.train_model(run, examples, weights, stage_hash=stage_hash)
    elif method in ("ew", "tla"):
      exp.train_model(run, examples, ones, stage_hash=stage_hash, tla=(method == "tla"))
    elif method in DYNAMIC_BASELINES:
      exp.train_model(run, examples, ones, stage_hash=stage_hash,
                      weighting=exp.weighting_strategy(method))
    elif method in GRADIENT_BASELINES:
      exp.train_model(run, examples, ones, stage_hash=stage_hash, gradient_method=method)
    else:
      raise PipelineError(f"unknown baseline {method!r} in config.baselines (known: "
                          f"{', '.join(KNOWN_METHODS)})")


KNOWN_METHODS = ("visatb", "ew", "tla", "stl") + DYNAMIC_BASELINES + GRADIENT_BASELINES


def stage_test(exp: Experiment, stage_hash: str) -> None:
  table = {"untrained": exp.score_model(None, "test", stage_hash=stage_hash)}
  for method in final_methods(exp):
    if method == "stl":
      table["stl"] = {t: exp.score_model(os.path.join("final", "stl", t), "test", tasks=[t],
                                         stage_hash=stage_hash)[t] for t in exp.eval_tasks}
    else:
      table[method] = exp.score_model(os.path.join("final", method), "test", stage_hash=stage_hash)
  fileio.atomic_write_json(exp.path("scores", "test.json"), table)


def stage_report(exp: Experiment, stage_hash: str) -> None:
  from visatb_jax.pipeline import report  # matplotlib only when a report is written

  test = exp.read_output("scores", "test.json")
  hib = {t: bool(exp.config.tasks[t].higher_is_better) for t in exp.eval_tasks}
  comparison = {}
  for method, scores in test.items():
    if method == "stl" or "stl" not in test:
      continue
    try:
      comparison[method] = metrics.delta_metrics(test["stl"], scores, higher_is_better=hib)
    except ValueError as e:  # e.g. an STL score of 0: ΔI is undefined, say so in the report
      comparison[method] = {"error": str(e)}
  times = {m: report.step_seconds(report.read_metrics(exp.path("final", m, "metrics.jsonl")))
           for m in comparison if os.path.exists(exp.path("final", m, "metrics.jsonl"))}
  for method, seconds in times.items():
    comparison[method]["step_time_s"] = seconds
    if seconds is not None and times.get("ew"):
      comparison[method]["step_time_vs_ew"] = seconds / times["ew"]
  fileio.atomic_write_json(exp.path("report", "comparison.json"), comparison)
  path = report.write_report(exp.workdir, title=f"VisATB run: {exp.config.get('name', '')}")
  _log(f"report: {path}")


_STAGE_FNS: dict[str, Callable[[Experiment, str], None]] = {
    "data": stage_data, "prep": stage_prep, "validate": stage_validate, "lambda": stage_lambda,
    "final": stage_final, "test": stage_test, "report": stage_report,
}


def _use_compilation_cache(directory: str) -> None:
  """XLA's persistent cache: a resumed or repeated run does not compile its steps again."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(config, workdir: str, *, stages: Sequence[str] | None = None) -> None:
  """Runs the requested stages (default: all) in order, skipping those already done."""
  unknown = sorted(set(stages or ()) - set(STAGES))
  if unknown:
    raise PipelineError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
  unknown = [m for m in config.baselines if m not in KNOWN_METHODS]
  if unknown:
    raise PipelineError(f"unknown baseline(s) {unknown} in config.baselines; known: "
                        f"{list(KNOWN_METHODS)}")
  main = main_method(config)
  if main not in KNOWN_METHODS or main == "stl":
    raise PipelineError(
        f"config.weighting={main!r} is not a method of one final model; choose one of "
        f"{[m for m in KNOWN_METHODS if m != 'stl']} (STL, one model per task, is a baseline: "
        f"name it in config.baselines)")
  exp = Experiment(config, workdir)
  _use_compilation_cache(os.path.join(workdir, "xla_cache"))
  man = manifest.Manifest(workdir, config)
  hashes = manifest.stage_hashes(config, _STAGE_INPUTS)
  _log(f"run directory {os.path.abspath(workdir)}")
  for stage in STAGES:
    if stages and stage not in stages:
      continue
    if stage in BALANCE_STAGES and not needs_balance(config):
      _log(f"stage {stage}: not needed (weighting={main!r}, no 'visatb' in baselines)")
      continue
    # Every process reads the manifest between the same two barriers, so all take the same path.
    fileio.sync(f"stage {stage}")
    if man.is_done(stage, hashes[stage]):
      _log(f"stage {stage}: done, skipped")
      continue
    _log(f"stage {stage}: start")
    man.mark(stage, "running", hashes[stage])
    t0 = time.time()
    _STAGE_FNS[stage](exp, hashes[stage])
    seconds = time.time() - t0
    man.mark(stage, "done", hashes[stage], seconds=round(seconds, 2))
    _log(f"stage {stage}: done in {seconds:.1f}s")
  fileio.sync("pipeline done")
