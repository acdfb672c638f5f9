"""The run manifest: which stage finished under which configuration.

Each stage's hash covers the config sections it reads plus the hash of the stage before it, so a
change to, say, the temperature re-runs `lambda` and everything after it but keeps the
preparation runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from visatb_jax.runtime import fileio


def _canonical(obj: Any) -> Any:
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
  if isinstance(obj, (list, tuple)):
    return [_canonical(v) for v in obj]
  return obj


def config_hash(obj: Any) -> str:
  blob = json.dumps(_canonical(obj), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def stage_hashes(config: Any, stage_inputs: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
  """Chained per-stage hashes; `stage_inputs` is [(stage, config keys it reads)] in order."""
  hashes, prev = {}, ""
  for stage, keys in stage_inputs:
    prev = config_hash({"prev": prev, **{k: config.get(k) for k in keys}})
    hashes[stage] = prev
  return hashes


class Manifest:
  """`workdir/manifest.json`, rewritten atomically after every change."""

  def __init__(self, workdir: str, config: Any):
    self.path = os.path.join(workdir, "manifest.json")
    self.data = fileio.read_json(self.path) if os.path.exists(self.path) else {"stages": {}}
    self.data["config_hash"] = config_hash(config)
    self.data.setdefault("stages", {})

  def is_done(self, stage: str, stage_hash: str) -> bool:
    entry = self.data["stages"].get(stage, {})
    return entry.get("status") == "done" and entry.get("hash") == stage_hash

  def mark(self, stage: str, status: str, stage_hash: str, **extra: Any) -> None:
    entry = {"status": status, "hash": stage_hash, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entry.update(extra)
    self.data["stages"][stage] = entry
    fileio.atomic_write_json(self.path, self.data, sort_keys=False)  # stages in run order
