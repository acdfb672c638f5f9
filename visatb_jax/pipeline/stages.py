"""The stages of the VisATB pipeline, each with the config sections it reads.

  data ─► pretrain ─► prep (mini, <u>+mini) ─► validate ─► lambda ─► final (every method) ─► test
       ─► report

A stage's hash covers the sections it declares plus the hash of the stage before it, so it covers
everything the stage can read: the workspace hands each stage a config view limited to those
sections (pipeline/config.py). prep, validate and lambda exist only to produce VisATB's λ.

A model inside a stage is keyed on less: on what it reads (`prep_model_hash`,
`final_model_hash`), and so are its scores (`score_hash`). A change of λ's settings (α, T, form)
therefore trains VisATB's final model alone, and any preparation model the new form adds; every
other model and its scores are reused, and the log names them.

Each stage also declares the stages whose outputs it reads (`inputs`) and the files it writes
(`outputs`, globs in the run directory): the runner records their digests when the stage is done,
and binds the stage to its inputs' recorded outputs (pipeline/runner.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from visatb_jax.core import bootstrap
from visatb_jax.pipeline import methods as methods_lib
from visatb_jax.pipeline import models as models_lib
from visatb_jax.pipeline.config import BalanceConfig
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.run_dir import config_hash
from visatb_jax.pipeline.tasks import TaskPlan
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _no_outputs(run_config: Any) -> Sequence[str]:
  del run_config
  return ()


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  sections: tuple[str, ...]  # config sections (or "section.field") read beyond earlier stages'
  run: Callable[[Workspace, str], None]
  inputs: tuple[str, ...] = ()  # stages whose outputs it reads
  balance_only: bool = False  # needed only when VisATB is among the final models
  pretrain_only: bool = False  # needed only when config.pretrain is set
  # Globs (relative to the run directory) of what it writes, given the RunConfig; a model is its
  # directory's run.json and checkpoints/ (run_dir.output_digest).
  outputs: Callable[[Any], Sequence[str]] = _no_outputs


def _model_outputs(directories: Sequence[str]) -> list[str]:
  return [os.path.join(d, name) for d in directories for name in ("run.json", "checkpoints")]


def score_hash(model_hash: str, ws: Workspace, *sections: str) -> str:
  """What a model's cached scores are keyed on: the model's own hash and the sections that
  scoring reads (`eval`; `zero_shot` for the test split)."""
  return config_hash({"model": model_hash, **{s: ws.config.section(s) for s in sections}})


def base_model_hash(ws: Workspace, stage_hash: str) -> str:
  """The hash of the model every run starts from (the untrained row of the scores): the
  pretrain stage's, which covers data, model and pretrain."""
  return ws.stage_hashes.get("pretrain", stage_hash)


# --- data ----------------------------------------------------------------------------------------


def stage_data(ws: Workspace, stage_hash: str) -> None:
  ws.data.prepare()


def data_outputs(run_config: Any) -> list[str]:
  data = run_config.section("data")
  out = ["data_stats.json", "data/tokenizer/*"]
  if data["source"] == "shapes":
    out += ["data/shapes/*.json", "data/shapes/images"]
  if (data.get("loader") or "memory") == "grain":
    out.append("data/prepared")
  return out


# --- pretrain ------------------------------------------------------------------------------------


def stage_pretrain(ws: Workspace, stage_hash: str) -> None:
  """Trains the base model every later run starts from (LLaVA's stage-1 alignment and pretrained
  LM, on data of its own)."""
  names, examples = ws.data.pretrain_examples()
  method = methods_lib.get("ew").train_method(np.ones(len(names), np.float32),
                                              (False,) * len(names))
  ws.models.train(models_lib.PRETRAIN_DIR, examples, method, stage_hash=stage_hash,
                  pretrain=True, task_names=names)


def pretrain_outputs(run_config: Any) -> list[str]:
  out = _model_outputs([models_lib.PRETRAIN_DIR])
  if run_config.section("data")["source"] == "shapes":  # its generated split
    out += ["data/pretrain/*.json", "data/pretrain/images"]
  return out


# --- prep ----------------------------------------------------------------------------------------


def prep_dir(name: str, replicate: int = 0) -> str | None:
  """Where replicate `replicate` of a preparation model is trained (`prep/<name>` for the first,
  `prep/<name>.rep<r>` for the others); None for `base`, the initial model itself."""
  if name == "base":
    return None
  return os.path.join("prep", name if replicate == 0 else f"{name}.rep{replicate}")


def prep_replicates(run_config: Any) -> int:
  """How many times every preparation model is trained (docs/method.md §13)."""
  return int(run_config.section("prep").get("replicates") or 1)


def _prep_dirs(run_config: Any) -> list[str]:
  return [prep_dir(n, r) for r in range(prep_replicates(run_config))
          for n, _ in run_config.tasks.prep_models(run_config.balance.form) if n != "base"]


def prep_outputs(run_config: Any) -> list[str]:
  return _model_outputs(_prep_dirs(run_config))


def prep_model_hash(ws: Workspace, stage_hash: str) -> str:
  """What a preparation model is keyed on: what it reads — the stages up to pretrain, train and
  prep (not the number of replicates: replicate r is the same model whatever their number) — and
  not balance.form, which only picks the models that exist. So a form change trains only the
  models the new form adds."""
  if not ws.stage_hashes:
    return stage_hash
  prep = {k: v for k, v in ws.config.section("prep").items() if k != "replicates"}
  return config_hash({"before preparation": ws.stage_hashes["pretrain"],
                      "train": ws.config.section("train"), "prep": prep})


def stage_prep(ws: Workspace, stage_hash: str) -> None:
  """Trains the preparation models: one after another on the whole mesh, or with
  `prep.parallel = K` side by side, K at a time, each on its own 1/K of the devices."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # logged below, once
    messages = ws.data.subset_warnings()
  for w in messages:
    log(f"warning: {w}")
  plan = ws.config.tasks
  replicates = prep_replicates(ws.config)
  # Replicate by replicate, so that an interrupted run has whole replicates to show first.
  names = [(n, r) for r in range(replicates)
           for n, _ in plan.prep_models(ws.config.balance.form) if n != "base"]
  if replicates > 1:
    log(f"prep: {replicates} replicates of each preparation model (subsets and data order "
        "seeded per replicate)")
  # Every preparation run trains with the base weights (fixed tasks at their weight).
  method = methods_lib.get("ew").train_method(plan.base_weights(), plan.fixed_mask())

  model_hash = prep_model_hash(ws, stage_hash)
  reused = []

  def train_all(group, mesh=None):
    for name, r in group:
      if ws.models.train(prep_dir(name, r), ws.data.prep_examples(name, r), method,
                         stage_hash=model_hash, mesh=mesh,
                         data_seed=None if r == 0 else ws.data.replicate_seed(r)):
        reused.append(prep_dir(name, r))

  parallel = int(ws.config.section("prep").get("parallel") or 1)
  if parallel <= 1:
    train_all(names)
    log_reused("prep", reused, len(names))
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
  log_reused("prep", sorted(reused), len(names))


def log_reused(stage: str, reused: Sequence[str], total: int) -> None:
  """One line naming the models a stage reused: trained before under the same hash."""
  if reused:
    log(f"{stage}: reused {len(reused)} of {total} model(s), trained before on the same inputs "
        f"and settings: {', '.join(reused)}")


# --- validate ------------------------------------------------------------------------------------


def stage_validate(ws: Workspace, stage_hash: str) -> None:
  """Scores every preparation model on the validation split: scores/validation.json holds each
  model's mean over its replicates, scores/validation_samples.json each sample's score (a list
  over the replicates when there are several) and, with replicates, scores/validation_replicates.json
  every replicate's mean (docs/method.md §13). `base`, the untrained model, is one model."""
  replicates = prep_replicates(ws.config)
  table, samples, per_replicate = {}, {}, {}
  # Keyed on the scored model and config.eval: a form change scores only the models it adds.
  keys = {"base": score_hash(base_model_hash(ws, stage_hash), ws, "eval")}
  prep_key = score_hash(prep_model_hash(ws, stage_hash), ws, "eval")
  for name, tasks in ws.config.tasks.prep_models(ws.config.balance.form):
    runs = [ws.models.score(prep_dir(name, r), "val", stage_hash=keys.get(name, prep_key),
                            tasks=tasks)
            for r in range(1 if name == "base" else replicates)]
    runs += runs[:1] * (replicates - len(runs))  # `base` is the same model in every replicate
    per_replicate[name] = {t: [run[0][t] for run in runs] for t in runs[0][0]}
    table[name] = {t: float(np.mean(v)) for t, v in per_replicate[name].items()}
    if replicates == 1:
      samples[name] = runs[0][1]
    else:
      samples[name] = {t: {i: [run[1][t][i] for run in runs] for i in runs[0][1][t]}
                       for t in runs[0][1]}
  fileio.atomic_write_json(ws.dir.path("scores", "validation_samples.json"), samples)
  if replicates > 1:
    fileio.atomic_write_json(ws.dir.path("scores", "validation_replicates.json"), per_replicate)
  fileio.atomic_write_json(ws.dir.path("scores", "validation.json"), table)


def validate_outputs(run_config: Any) -> list[str]:
  del run_config
  return ["scores/validation.json", "scores/validation_samples.json",
          "scores/validation_replicates.json"]


# --- lambda --------------------------------------------------------------------------------------


def noisy_gain_message(unit: str, report: dict) -> str:
  low, high = report["intervals"]["gain"][unit]
  level = report["bootstrap"]["level"]
  return (f"{unit}: its own-data gain {report['gain'][unit]:+.4f} has the {level:.0%} interval "
          f"[{low:+.4f}, {high:+.4f}], which contains 0, so the contributions to {unit} are "
          "noise; use a larger validation set, a larger large subset (prep.r_large) or more "
          "steps (train.epochs)")


def balance_from_samples(per_sample: dict, plan: TaskPlan, bal: BalanceConfig,
                         seed: int) -> dict:
  """λ with its bootstrap intervals, after the config's rule for noisy own-data gains: what the
  lambda stage writes to lambda.json, and what `python -m visatb_jax.balance --run` reproduces
  from a run directory."""
  kwargs = dict(tasks=list(plan.names), form=bal.form, temperature=bal.temperature,
                alpha=tuple(bal.alpha), fixed=dict(plan.fixed) or None,
                groups=dict(plan.groups) or None, on_degenerate=bal.on_degenerate,
                resamples=bal.resamples, seed=int(seed), level=bal.level,
                shrinkage=bal.shrinkage)
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
  report = balance_from_samples(per_sample, ws.config.tasks, ws.config.balance,
                                int(ws.config.seed))
  for w in report["warnings"]:
    log(f"warning: {w}")
  fileio.atomic_write_json(ws.dir.path("lambda.json"), report)
  log("λ = " + ", ".join(lambda_summary(report, t) for t in ws.config.tasks.names))
  boot = report["bootstrap"]
  if boot.get("replicates", 1) > 1:
    log(f"λ's intervals: {boot['level']:.0%}, two-level bootstrap over {boot['replicates']} "
        "replicates of every preparation model and the validation samples (\"train\": the share "
        "of each λ's variance that is training rather than sampling)")
  if boot.get("shrinkage") == "evidence":
    log("balance.shrinkage='evidence': each component shrunk toward the tasks' mean by its "
        "bootstrap z-score before the softmax (docs/method.md §14; 'none' gives the paper's λ)")


def lambda_summary(report: dict, task: str) -> str:
  """`caption=1.031 [0.962, 1.104] train 71 %`: λ, its interval and its training share."""
  low, high = report["intervals"]["lambda"][task]
  text = f"{task}={report['lambda'][task]:.3f} [{low:.3f}, {high:.3f}]"
  share = ((report.get("variance") or {}).get("training_share") or {}).get("lambda", {}).get(task)
  if share is not None and report["bootstrap"].get("replicates", 1) > 1:
    text += f" train {share:.0%}"
  return text


# --- final ---------------------------------------------------------------------------------------


def final_dir(method: str, task: str | None = None) -> str:
  return os.path.join("final", method, task) if task else os.path.join("final", method)


def final_model_hash(ws: Workspace, stage_hash: str, method: str) -> str:
  """What a final model is keyed on: the final stage's hash for VisATB, which reads λ; for every
  other method only what it reads — the stages up to pretrain (data, model, pretrain, input
  files), train and its own options — so that a change of λ, α, T or form retrains VisATB alone
  and EW, STL and the other baselines are reused (the log names them)."""
  if methods_lib.get(method).needs_balance or not ws.stage_hashes:
    return stage_hash
  return config_hash({"before balancing": ws.stage_hashes["pretrain"],
                      "train": ws.config.section("train"), "method": method,
                      "options": ws.config.method_options.get(method)})


def _final_dirs(run_config: Any) -> list[str]:
  out = []
  for name in run_config.methods:
    if methods_lib.get(name).per_task:
      out += [final_dir(name, t) for t in run_config.tasks.eval_tasks]
    else:
      out.append(final_dir(name))
  return out


def final_outputs(run_config: Any) -> list[str]:
  return _model_outputs(_final_dirs(run_config))


def stage_final(ws: Workspace, stage_hash: str) -> None:
  plan = ws.config.tasks
  base, fixed = plan.base_weights(), plan.fixed_mask()
  lam = None
  if ws.config.needs_balance:
    weights = ws.dir.read_output("lambda.json")["lambda"]
    lam = np.array([weights[t] for t in plan.names], np.float32)
  reused = []
  for name in ws.config.methods:
    spec = methods_lib.get(name)
    method = spec.train_method(base, fixed, ws.config.method_options.get(name), lam=lam)
    model_hash = final_model_hash(ws, stage_hash, name)
    tasks = plan.eval_tasks if spec.per_task else (None,)
    for task in tasks:
      examples = ws.data.task_examples([task] if task else plan.names)
      if ws.models.train(final_dir(name, task), examples, method, stage_hash=model_hash):
        reused.append(final_dir(name, task))
  log_reused("final", reused, len(_final_dirs(ws.config)))


def model_hashes(ws: Workspace, stage: str) -> dict[str, str]:
  """{model directory: the hash its run.json must hold} of every model stage `stage` trains
  (pretrain, prep, final; {} for the others), under the workspace's config: what a damaged
  manifest is rebuilt from. `ws` must be in `stage` (Workspace.enter_stage)."""
  hashes = ws.stage_hashes
  if stage == "pretrain":
    return {models_lib.PRETRAIN_DIR: hashes["pretrain"]}
  if stage == "prep":
    return dict.fromkeys(_prep_dirs(ws.config), prep_model_hash(ws, hashes["prep"]))
  if stage != "final":
    return {}
  out = {}
  for name in ws.config.methods:
    tasks = ws.config.tasks.eval_tasks if methods_lib.get(name).per_task else (None,)
    out.update(dict.fromkeys([final_dir(name, t) for t in tasks],
                             final_model_hash(ws, hashes["final"], name)))
  return out


# --- test ----------------------------------------------------------------------------------------


def stage_test(ws: Workspace, stage_hash: str) -> None:
  """Scores every final model on the trained tasks' test split, each STL model on its own task,
  and every model that is not per task (the untrained one too) on the zero-shot tasks (§12),
  whose scores join the same rows of scores/test.json."""
  plan = ws.config.tasks
  table, samples = {}, {}
  final_hash = ws.stage_hashes.get("final", stage_hash)

  def key(model_hash: str) -> str:  # a model's scores are reused while it and eval are
    return score_hash(model_hash, ws, "eval", "zero_shot")

  for name in ws.config.methods:
    model_key = key(final_model_hash(ws, final_hash, name))
    if methods_lib.get(name).per_task:
      table[name], samples[name] = {}, {}
      for t in plan.eval_tasks:
        scores, per_sample = ws.models.score(final_dir(name, t), "test", tasks=[t],
                                             stage_hash=model_key)
        table[name][t], samples[name][t] = scores[t], per_sample[t]
    else:
      table[name], samples[name] = ws.models.score(final_dir(name), "test",
                                                   stage_hash=model_key)
      _join(table[name], samples[name],
            ws.models.score(final_dir(name), "test", stage_hash=model_key, zero_shot=True))
  # The untrained model last: a reference row, not a method.
  base_key = key(base_model_hash(ws, stage_hash))
  table["untrained"], samples["untrained"] = ws.models.score(None, "test", stage_hash=base_key)
  _join(table["untrained"], samples["untrained"],
        ws.models.score(None, "test", stage_hash=base_key, zero_shot=True))
  fileio.atomic_write_json(ws.dir.path("scores", "test_samples.json"), samples)
  fileio.atomic_write_json(ws.dir.path("scores", "test_reports.json"), _test_reports(ws, samples))
  fileio.atomic_write_json(ws.dir.path("scores", "test.json"), table)


def _test_reports(ws: Workspace, samples: dict) -> dict:
  """POPE's F1 / accuracy / yes-ratio per split and MME's totals of every scored model (§8),
  from the per-sample scores and the test samples' fields (`evaluation.corpus_reports`)."""
  from visatb_jax.pipeline import evaluation  # pylint: disable=g-import-not-at-top
  zero_shot = ws.config.zero_shot
  metric_of = {**ws.config.tasks.metrics, **{n: z.metric for n, z in zero_shot.items()}}

  def task_samples(tasks: Sequence[str]) -> dict[str, list[dict]]:
    zero = tuple(t for t in tasks if t in zero_shot)
    found = list(ws.data.zero_shot_samples("test", zero)) if zero else []
    if any(t not in zero_shot for t in tasks):
      found += ws.data.samples("test")
    return {t: [s for s in found if s["task"] == t] for t in tasks}

  return evaluation.corpus_reports(samples, metric_of, task_samples)


def _join(scores: dict, samples: dict, extra: tuple[dict, dict]) -> None:
  scores.update(extra[0])
  samples.update(extra[1])


# --- report --------------------------------------------------------------------------------------


def stage_report(ws: Workspace, stage_hash: str) -> None:
  from visatb_jax.pipeline import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  path = report.write_report(ws.workdir, title=f"VisATB run: {ws.config.name}")
  log(f"report: {path}")


def report_outputs(run_config: Any) -> list[str]:
  del run_config
  return ["report/report.md", "report/comparison.json", "report/*.png"]


STAGES: tuple[Stage, ...] = (
    # The data stage encodes the training set with the model's image-token count and image size.
    Stage("data", ("seed", "tasks", "data", "model"), stage_data, outputs=data_outputs),
    # It reads the train.* fields it does not set itself (clip norm, warm-up, checkpoints), so
    # that a change of train.lr or train.epochs keeps the pretrained model.
    Stage("pretrain", ("pretrain", *(f"train.{f}" for f in models_lib.PRETRAIN_TRAIN_FIELDS)),
          stage_pretrain, ("data",), pretrain_only=True, outputs=pretrain_outputs),
    Stage("prep", ("train", "prep", "balance.form"), stage_prep, ("data", "pretrain"),
          balance_only=True, outputs=prep_outputs),
    # The untrained model (`base`, the pretrained one) is scored too.
    Stage("validate", ("eval",), stage_validate, ("data", "pretrain", "prep"), balance_only=True,
          outputs=validate_outputs),
    Stage("lambda", ("balance",), stage_lambda, ("validate",), balance_only=True,
          outputs=lambda run_config: ["lambda.json"]),
    # final reads lambda.json when VisATB is among its methods.
    Stage("final", ("methods",), stage_final, ("data", "pretrain", "lambda"),
          outputs=final_outputs),
    # Zero-shot tasks are scored here alone: a changed zero-shot config re-runs test and report.
    Stage("test", ("zero_shot",), stage_test, ("data", "pretrain", "final"),
          outputs=lambda run_config: ["scores/test.json", "scores/test_samples.json",
                                      "scores/test_reports.json"]),
    # Everything the report shows: data statistics, training curves, scores, λ and the tables.
    Stage("report", (), stage_report,
          ("data", "pretrain", "prep", "validate", "lambda", "final", "test"),
          outputs=report_outputs),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BALANCE_STAGES = tuple(s.name for s in STAGES if s.balance_only)
