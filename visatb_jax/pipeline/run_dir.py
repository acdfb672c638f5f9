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
the new version of each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.runtime import fileio


def config_hash(obj: Any) -> str:
  # Key order never matters: json sorts every level.
  blob = json.dumps(config_lib.plain(obj), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


class Manifest:
  """`workdir/manifest.json`, rewritten atomically after every change."""

  def __init__(self, workdir: str, config_digest: str):
    self.path = os.path.join(workdir, "manifest.json")
    self.data = fileio.read_json(self.path) if os.path.exists(self.path) else {"stages": {}}
    self.data["config_hash"] = config_digest
    self.data.setdefault("stages", {})

  def is_done(self, stage: str, stage_hash: str) -> bool:
    entry = self.data["stages"].get(stage, {})
    return entry.get("status") == "done" and entry.get("hash") == stage_hash

  def mark(self, stage: str, status: str, stage_hash: str, **extra: Any) -> None:
    entry = {"status": status, "hash": stage_hash, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entry.update(extra)
    self.data["stages"][stage] = entry
    fileio.atomic_write_json(self.path, self.data, sort_keys=False)  # stages in run order


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
    return fileio.read_json(p)

  def claim(self, rel_dir: str, stage_hash: str) -> bool:
    """True when `rel_dir` already holds a finished result of this stage hash.

    A directory left by another configuration is removed, so that its checkpoints are never
    resumed by a run they do not belong to.
    """
    directory = self.path(rel_dir)
    info_path = os.path.join(directory, "run.json")
    fileio.sync(f"claim {directory}")  # every process decides on the same run.json
    info = fileio.read_json(info_path) if os.path.exists(info_path) else None
    if info is not None and info.get("hash") != stage_hash and fileio.is_primary():
      shutil.rmtree(directory)
    if info is None or info.get("hash") != stage_hash:
      fileio.atomic_write_json(info_path, {"hash": stage_hash, "done": False})
    done = info is not None and info.get("hash") == stage_hash and bool(info.get("done"))
    fileio.sync(f"claimed {directory}")
    return done

  def finish(self, rel_dir: str, info: Mapping[str, Any]) -> None:
    fileio.atomic_write_json(self.path(rel_dir, "run.json"), {**info, "done": True})

  def run_info(self, rel_dir: str) -> dict[str, Any]:
    path = self.path(rel_dir, "run.json")
    info = fileio.read_json(path) if os.path.exists(path) else {}
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
    cached = fileio.read_json(cache)
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
