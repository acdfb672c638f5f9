"""The run directory: its paths, model-directory claims, score caches and the manifest.

  workdir/manifest.json          which stage finished under which stage hash (and config-only
                                 hash and input-file fingerprints: why it is stale)
  workdir/config.json            the run config (read by the report)
  workdir/data/                  the generated benchmark, the tokenizer, the prepared mixture
  workdir/prep/<model>/          preparation runs (run.json, checkpoints/, metrics.jsonl, scores);
                                 prep/<model>.rep<r>/ for replicate r >= 1 (docs/method.md §13)
  workdir/scores/*.json          validation and test tables (and their per-sample scores)
  workdir/lambda.json            λ, its components and their intervals
  workdir/final/<method>/        final runs (final/stl/<task>/ for STL)
  workdir/report/                report.md, comparison.json, plots

Every file is written atomically (runtime/fileio.py), so a killed run leaves either the old or
the new version of each. The manifest records what each finished stage wrote (`output_digests`):
a stage whose outputs were since removed or changed is not done, and runs again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.runtime import fileio


def config_hash(obj: Any) -> str:
  # Key order never matters: json sorts every level.
  blob = json.dumps(config_lib.plain(obj), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


# --- what a stage wrote ---------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"  # a model directory's orbax checkpoints (runtime/checkpoint.py)
# Files up to this size are recorded by their sha256; larger ones (a prepared mixture's shards)
# by their size, so that checking a run directory never reads gigabytes.
_DIGESTED_BYTES = 64 << 20


def _file_digest(path: str) -> str:
  size = os.path.getsize(path)
  if size > _DIGESTED_BYTES:
    return f"size {size}"
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return "sha256 " + h.hexdigest()[:32]


def _listing_digest(directory: str) -> str:
  """The names and sizes of every file under `directory`: what a deleted, added or truncated
  file changes, for the price of a stat each (a benchmark's images, a checkpoint's arrays)."""
  entries = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      entries.append(f"{os.path.relpath(path, directory)}\t{os.path.getsize(path)}")
  return f"{len(entries)} files " + hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]


def finished_steps(checkpoints: str) -> list[int]:
  """The steps under an orbax checkpoint directory that orbax finalized (renamed from their
  temporary name, or holding its commit marker on an object store), in order."""
  if not os.path.isdir(checkpoints):
    return []
  from orbax.checkpoint.path import step as ocp_step  # pylint: disable=g-import-not-at-top
  return sorted(int(n) for n in os.listdir(checkpoints)
                if n.isdigit() and ocp_step.is_path_finalized(os.path.join(checkpoints, n)))


def final_checkpoint_exists(directory: str, info: Mapping[str, Any]) -> bool:
  """True when the model directory whose run.json is `info` holds the finished checkpoint of its
  last step (training always saves one); True when `info` does not say how many steps."""
  steps = (info.get("train") or {}).get("steps") if isinstance(info.get("train"), dict) else None
  if steps is None:
    return True
  return int(steps) in finished_steps(os.path.join(directory, CHECKPOINTS))


def output_digest(path: str) -> str | None:
  """What the manifest records of one output: a file's digest; for a model's `checkpoints/`
  directory its latest finished step and the names and sizes of that step's files; for another
  directory the names and sizes of its files. None when `path` does not exist."""
  if os.path.isfile(path):
    return _file_digest(path)
  if not os.path.isdir(path):
    return None
  if os.path.basename(path) == CHECKPOINTS:
    steps = finished_steps(path)
    if not steps:
      return None
    return f"step {steps[-1]}: " + _listing_digest(os.path.join(path, str(steps[-1])))
  return _listing_digest(path)


def output_digests(workdir: str, patterns: Iterable[str]) -> dict[str, str]:
  """{path relative to `workdir`: `output_digest`} of what the globs `patterns` match."""
  out = {}
  for pattern in patterns:
    for path in sorted(glob.glob(os.path.join(glob.escape(workdir), pattern))):
      if fileio.is_temporary_name(os.path.basename(path)):
        continue
      digest = output_digest(path)
      if digest is not None:
        out[os.path.relpath(path, workdir)] = digest
  return out


def output_problems(workdir: str, recorded: Mapping[str, str]) -> list[tuple[str, str]]:
  """[(path, "is missing" | "changed since the stage wrote it")] of the recorded outputs that are
  no longer what the stage wrote, in order."""
  out = []
  for rel, digest in recorded.items():
    now = output_digest(os.path.join(workdir, rel))
    if now != digest:
      out.append((rel, "is missing" if now is None else "changed since the stage wrote it"))
  return out


def model_directory(rel: str) -> str | None:
  """The model directory (relative) an output path belongs to: `final/ew` for
  `final/ew/run.json` or `final/ew/checkpoints`; None for another output."""
  head, name = os.path.split(rel)
  return head if name in ("run.json", CHECKPOINTS) and head else None


def read_object(path: str, advice: str = "") -> dict[str, Any]:
  """The JSON object in the run-directory file `path`; a file that is not one (damaged, cut
  short, another JSON value) is a PipelineError naming it, followed by `advice`."""
  try:
    value = fileio.read_json(path)
  except fileio.JSONFileError as e:
    raise PipelineError(f"{e}{advice}") from None
  if not isinstance(value, dict):
    raise PipelineError(f"{path} holds a JSON {type(value).__name__}, not an object: it is "
                        f"damaged{advice}")
  return value


def _manifest_damage(data: Any) -> str | None:
  """Why a parsed manifest.json cannot be used; None when it can."""
  if not isinstance(data, dict):
    return f"holds a JSON {type(data).__name__}, not an object"
  stages = data.get("stages", {})
  if not isinstance(stages, dict) or not all(isinstance(e, dict) for e in stages.values()):
    return "holds no object of stage entries under \"stages\""
  return None


class Manifest:
  """`workdir/manifest.json`, rewritten atomically after every change.

  A damaged file (empty, cut short, another JSON value) is read as an empty manifest, and
  `damaged` says why: the runner rebuilds the entries it can from the models' run.json files.
  """

  def __init__(self, workdir: str, config_digest: str):
    self.path = os.path.join(workdir, "manifest.json")
    self.damaged: str | None = None
    data: Any = {"stages": {}}
    if os.path.exists(self.path):
      try:
        data = fileio.read_json(self.path)
      except fileio.JSONFileError as e:
        self.damaged = str(e).removeprefix(f"{self.path} ")
      else:
        self.damaged = _manifest_damage(data)
      if self.damaged:
        data = {"stages": {}}
    self.data = data
    self.data["config_hash"] = config_digest
    self.data.setdefault("stages", {})

  def is_done(self, stage: str, stage_hash: str) -> bool:
    entry = self.data["stages"].get(stage, {})
    return entry.get("status") == "done" and entry.get("hash") == stage_hash

  def mark(self, stage: str, status: str, stage_hash: str | None, **extra: Any) -> None:
    entry = {"status": status, "hash": stage_hash, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entry.update(extra)
    self.data["stages"][stage] = entry
    self.save()

  def save(self) -> None:
    fileio.atomic_write_json(self.path, self.data, sort_keys=False)  # stages in run order
    self.damaged = None


class RunDir:
  """Paths and bookkeeping of one run directory."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def read_output(self, *parts: str) -> Any:
    p = self.path(*parts)
    if not os.path.exists(p):
      raise PipelineError(f"{p} does not exist: run the stage that writes it first")
    try:
      return fileio.read_json(p)
    except fileio.JSONFileError as e:
      raise PipelineError(f"{e}; remove it and run the stage that writes it again") from None

  def _run_json(self, directory: str) -> dict[str, Any] | None:
    """A model directory's run.json, None when there is none."""
    path = os.path.join(directory, "run.json")
    if not os.path.exists(path):
      return None
    return read_object(path, f"; remove {directory} to train that model again")

  def claim(self, rel_dir: str, stage_hash: str) -> bool:
    """True when `rel_dir` already holds a finished result of this stage hash.

    A directory left by another configuration is removed, so that its checkpoints are never
    resumed by a run they do not belong to.
    """
    directory = self.path(rel_dir)
    info_path = os.path.join(directory, "run.json")
    fileio.sync(f"claim {directory}")  # every process decides on the same run.json
    info = self._run_json(directory)
    if info is not None and info.get("hash") != stage_hash and fileio.is_primary():
      shutil.rmtree(directory)
    if info is None or info.get("hash") != stage_hash:
      fileio.atomic_write_json(info_path, {"hash": stage_hash, "done": False})
    done = info is not None and info.get("hash") == stage_hash and bool(info.get("done"))
    if done and not final_checkpoint_exists(directory, info):
      # Its last checkpoint was removed (or never completed): training resumes from the latest
      # one that is left, and ends with the same model.
      print(f"  {rel_dir}: the checkpoint of its last step is missing; training it again from "
            "the latest checkpoint left", flush=True)
      self.release(rel_dir)
      done = False
    fileio.sync(f"claimed {directory}")
    return done

  def release(self, rel_dir: str) -> None:
    """Marks the model in `rel_dir` unfinished (its hash kept), so that its next claim resumes
    its training instead of skipping it."""
    info = self._run_json(self.path(rel_dir))
    if info is not None and info.get("done"):
      fileio.atomic_write_json(self.path(rel_dir, "run.json"),
                               {"hash": info.get("hash"), "done": False})

  def finish(self, rel_dir: str, info: Mapping[str, Any]) -> None:
    fileio.atomic_write_json(self.path(rel_dir, "run.json"), {**info, "done": True})

  def run_info(self, rel_dir: str) -> dict[str, Any]:
    info = self._run_json(self.path(rel_dir)) or {}
    if not info.get("done"):
      raise PipelineError(f"{self.path(rel_dir)} has no finished training run")
    return info

  def cached_scores(self, rel_dir: str, split: str, stage_hash: str,
                    tasks: list[str]) -> tuple[dict, dict] | None:
    """(scores, per-sample scores) of a model on a split, when cached under this stage hash."""
    cache = self.path(rel_dir, f"scores_{split}.json")
    fileio.sync(f"scores {cache}")  # every process reads the cache in the same state
    if not os.path.exists(cache):
      return None
    try:
      cached = fileio.read_json(cache)
    except fileio.JSONFileError:
      return None  # a damaged cache is made again
    if not isinstance(cached, dict) or not isinstance(cached.get("scores"), dict):
      return None
    if cached.get("hash") != stage_hash or not set(tasks) <= set(cached["scores"]):
      return None
    samples = cached.get("samples") or {}
    if not set(tasks) <= set(samples):
      return None
    return ({t: cached["scores"][t] for t in tasks}, {t: samples[t] for t in tasks})

  def cache_scores(self, rel_dir: str, split: str, stage_hash: str, scores: Mapping[str, float],
                   samples: Mapping[str, Mapping[str, float]],
                   examples: Mapping[str, list[str]]) -> None:
    fileio.atomic_write_json(self.path(rel_dir, f"scores_{split}.json"), {
        "hash": stage_hash, "scores": dict(scores), "samples": dict(samples),
        "examples": {t: p[:5] for t, p in examples.items()}})
