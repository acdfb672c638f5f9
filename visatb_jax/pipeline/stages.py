"""The stages of the VisATB pipeline, each with the config sections it reads.

  data ─► pretrain ─► prep (mini, <u>+mini) ─► validate ─► lambda ─► final (every method) ─► test
       ─► report

A stage's hash covers the sections it declares plus the hash of the stage before it, so it covers
everything the stage can read: the workspace hands each stage a config view limited to those
sections (pipeline/config.py). prep, validate and lambda exist only to produce VisATB's λ.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import numpy as np

from visatb_jax.core import bootstrap
from visatb_jax.pipeline import methods as methods_lib
from visatb_jax.pipeline import models as models_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  sections: tuple[str, ...]  # config sections (or "section.field") read beyond earlier stages'
  run: Callable[[Workspace, str], None]
  inputs: tuple[str, ...] = ()  # stages whose outputs it reads
  balance_only: bool = False  # needed only when VisATB is among the final models
  pretrain_only: bool = False  # needed only when config.pretrain is set


# --- data ----------------------------------------------------------------------------------------


def stage_data(ws: Workspace, stage_hash: str) -> None:
  ws.data.prepare()


# --- pretrain ------------------------------------------------------------------------------------


def stage_pretrain(ws: Workspace, stage_hash: str) -> None:
  """Trains the base model every later run starts from (LLaVA's stage-1 alignment and pretrained
  LM, on data of its own)."""
  names, examples = ws.data.pretrain_examples()
  method = methods_lib.get("ew").train_method(np.ones(len(names), np.float32),
                                              (False,) * len(names))
  ws.models.train(models_lib.PRETRAIN_DIR, examples, method, stage_hash=stage_hash,
                  pretrain=True, task_names=names)


# --- prep ----------------------------------------------------------------------------------------


def prep_dir(name: str) -> str | None:
  """Where a preparation model is trained; None for `base`, the initial model itself."""
  return None if name == "base" else os.path.join("prep", name)


def stage_prep(ws: Workspace, stage_hash: str) -> None:
  """Trains the preparation models: one after another on the whole mesh, or with
  `prep.parallel = K` side by side, K at a time, each on its own 1/K of the devices."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # logged below, once
    messages = ws.data.subset_warnings()
  for w in messages:
    log(f"warning: {w}")
  plan = ws.config.tasks
  names = [n for n, _ in plan.prep_models(ws.config.balance.form) if n != "base"]
  # Every preparation run trains with the base weights (fixed tasks at their weight).
  method = methods_lib.get("ew").train_method(plan.base_weights(), plan.fixed_mask())

  def train_all(group, mesh=None):
    for name in group:
      ws.models.train(prep_dir(name), ws.data.prep_examples(name), method,
                      stage_hash=stage_hash, mesh=mesh)

  parallel = int(ws.config.section("prep").get("parallel") or 1)
  if parallel <= 1:
    train_all(names)
    return
  meshes = ws.models.sub_meshes(parallel)
  log(f"prep: {len(names)} runs, {parallel} side by side on {meshes[0].devices.size} "
      f"device(s) each")
  # Threads: JAX dispatch is thread-safe and each group's computations run on its own devices;
  # the host work of one group (packing, batches, checkpoints) overlaps the others' steps.
  with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="prep") as pool:
    futures = [pool.submit(train_all, names[k::parallel], mesh) for k, mesh in enumerate(meshes)]
    for future in futures:
      future.result()  # the first failure, with its own traceback


# --- validate ------------------------------------------------------------------------------------


def stage_validate(ws: Workspace, stage_hash: str) -> None:
  table, samples = {}, {}
  for name, tasks in ws.config.tasks.prep_models(ws.config.balance.form):
    table[name], samples[name] = ws.models.score(prep_dir(name), "val", stage_hash=stage_hash,
                                                 tasks=tasks)
  fileio.atomic_write_json(ws.dir.path("scores", "validation_samples.json"), samples)
  fileio.atomic_write_json(ws.dir.path("scores", "validation.json"), table)


# --- lambda --------------------------------------------------------------------------------------


def noisy_gain_message(unit: str, report: dict) -> str:
  low, high = report["intervals"]["gain"][unit]
  level = report["bootstrap"]["level"]
  return (f"{unit}: its own-data gain {report['gain'][unit]:+.4f} has the {level:.0%} interval "
          f"[{low:+.4f}, {high:+.4f}], which contains 0, so the contributions to {unit} are "
          "noise; use a larger validation set, a larger large subset (prep.r_large) or more "
          "steps (train.epochs)")


def balance_from_samples(ws: Workspace, per_sample: dict) -> dict:
  """λ with its bootstrap intervals, after the config's rule for noisy own-data gains."""
  plan, bal = ws.config.tasks, ws.config.balance
  kwargs = dict(tasks=list(plan.names), form=bal.form, temperature=bal.temperature,
                alpha=tuple(bal.alpha), fixed=dict(plan.fixed) or None,
                groups=dict(plan.groups) or None, on_degenerate=bal.on_degenerate,
                resamples=bal.resamples, seed=int(ws.config.seed), level=bal.level)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the report lists them; logged by the caller, once
      report = bootstrap.bootstrap_report(per_sample, **kwargs)
      noisy = list(report.get("noisy", []))
      if noisy and bal.on_noisy_gain == "error":
        raise PipelineError("noisy own-data gain of " + "; ".join(
            noisy_gain_message(u, report) for u in noisy) + " (balance.on_noisy_gain='error')")
      if noisy and bal.on_noisy_gain == "drop":
        report = bootstrap.bootstrap_report(per_sample, drop=noisy, **kwargs)
        report["dropped"] = noisy
  except ValueError as e:
    raise PipelineError(f"cannot compute λ from scores/validation_samples.json: {e}") from e
  report["warnings"] = list(report.get("warnings", [])) + [
      f"noisy own-data gain of {noisy_gain_message(u, report)}"
      + (" (its column is left out of C_out and C_in: balance.on_noisy_gain='drop')"
         if u in report.get("dropped", []) else "")
      for u in noisy]
  return report


def stage_lambda(ws: Workspace, stage_hash: str) -> None:
  try:
    per_sample = bootstrap.align_by_id(ws.dir.read_output("scores", "validation_samples.json"))
  except ValueError as e:
    raise PipelineError(f"scores/validation_samples.json: {e}") from e
  report = balance_from_samples(ws, per_sample)
  for w in report["warnings"]:
    log(f"warning: {w}")
  fileio.atomic_write_json(ws.dir.path("lambda.json"), report)
  intervals = report["intervals"]["lambda"]
  log("λ = " + ", ".join(f"{t}={report['lambda'][t]:.3f} [{intervals[t][0]:.3f}, "
                         f"{intervals[t][1]:.3f}]" for t in ws.config.tasks.names))


# --- final ---------------------------------------------------------------------------------------


def final_dir(method: str, task: str | None = None) -> str:
  return os.path.join("final", method, task) if task else os.path.join("final", method)


def stage_final(ws: Workspace, stage_hash: str) -> None:
  plan = ws.config.tasks
  base, fixed = plan.base_weights(), plan.fixed_mask()
  lam = None
  if ws.config.needs_balance:
    weights = ws.dir.read_output("lambda.json")["lambda"]
    lam = np.array([weights[t] for t in plan.names], np.float32)
  for name in ws.config.methods:
    spec = methods_lib.get(name)
    method = spec.train_method(base, fixed, ws.config.method_options.get(name), lam=lam)
    if spec.per_task:
      for task in plan.eval_tasks:
        ws.models.train(final_dir(name, task), ws.data.task_examples([task]), method,
                        stage_hash=stage_hash)
    else:
      ws.models.train(final_dir(name), ws.data.task_examples(plan.names), method,
                      stage_hash=stage_hash)


# --- test ----------------------------------------------------------------------------------------


def stage_test(ws: Workspace, stage_hash: str) -> None:
  """Scores every final model on the trained tasks' test split, each STL model on its own task,
  and every model that is not per task (the untrained one too) on the zero-shot tasks (§12),
  whose scores join the same rows of scores/test.json."""
  plan = ws.config.tasks
  table, samples = {}, {}
  for name in ws.config.methods:
    if methods_lib.get(name).per_task:
      table[name], samples[name] = {}, {}
      for t in plan.eval_tasks:
        scores, per_sample = ws.models.score(final_dir(name, t), "test", tasks=[t],
                                             stage_hash=stage_hash)
        table[name][t], samples[name][t] = scores[t], per_sample[t]
    else:
      table[name], samples[name] = ws.models.score(final_dir(name), "test",
                                                   stage_hash=stage_hash)
      _join(table[name], samples[name],
            ws.models.score(final_dir(name), "test", stage_hash=stage_hash, zero_shot=True))
  # The untrained model last: a reference row, not a method.
  table["untrained"], samples["untrained"] = ws.models.score(None, "test", stage_hash=stage_hash)
  _join(table["untrained"], samples["untrained"],
        ws.models.score(None, "test", stage_hash=stage_hash, zero_shot=True))
  fileio.atomic_write_json(ws.dir.path("scores", "test_samples.json"), samples)
  fileio.atomic_write_json(ws.dir.path("scores", "test.json"), table)


def _join(scores: dict, samples: dict, extra: tuple[dict, dict]) -> None:
  scores.update(extra[0])
  samples.update(extra[1])


# --- report --------------------------------------------------------------------------------------


def stage_report(ws: Workspace, stage_hash: str) -> None:
  from visatb_jax.pipeline import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  path = report.write_report(ws.workdir, title=f"VisATB run: {ws.config.name}")
  log(f"report: {path}")


STAGES: tuple[Stage, ...] = (
    # The data stage encodes the training set with the model's image-token count and image size.
    Stage("data", ("seed", "tasks", "data", "model"), stage_data),
    # It reads train.* for what it does not set itself (clip norm, warm-up, checkpoints).
    Stage("pretrain", ("pretrain", "train"), stage_pretrain, ("data",), pretrain_only=True),
    Stage("prep", ("prep", "balance.form"), stage_prep, ("data", "pretrain"),
          balance_only=True),
    Stage("validate", ("eval",), stage_validate, ("prep",), balance_only=True),
    Stage("lambda", ("balance",), stage_lambda, ("validate",), balance_only=True),
    # final reads lambda.json when VisATB is among its methods.
    Stage("final", ("methods",), stage_final, ("data", "pretrain", "lambda")),
    # Zero-shot tasks are scored here alone: a changed zero-shot config re-runs test and report.
    Stage("test", ("zero_shot",), stage_test, ("final",)),
    Stage("report", (), stage_report),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BALANCE_STAGES = tuple(s.name for s in STAGES if s.balance_only)
