"""Training metrics: one JSON line per logged step in `metrics.jsonl`, plus TensorBoard.

Resumption must not duplicate steps: on open, lines for steps after the restored step
(logged by the run that crashed before its next checkpoint) are dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from visatb_jax.runtime import fileio

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Parsed lines of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def truncate_after(path: str | os.PathLike, step: int) -> None:
  """Keeps only the records with `step <= step` (atomically rewritten)."""
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("step", math.inf) <= step]
  fileio.atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def by_name(values: Sequence[float], names: Sequence[str]) -> dict[str, float]:
  return {name: float(v) for name, v in zip(names, values, strict=True)}


def make_record(
    *,
    step: int,
    metrics: Mapping[str, Any],
    task_names: Sequence[str],
    lr: float,
    tokens_per_s: float,
    elapsed_s: float,
) -> dict[str, Any]:
  """The JSON line of one step from the (host) metrics of the train step."""
  record = {
      "step": int(step),
      "loss": float(metrics["loss"]),
      "per_task_loss": by_name(metrics["per_task_loss"], task_names),
      "per_task_count": by_name(metrics["per_task_count"], task_names),
      "lambda": by_name(metrics["lam"], task_names),
      "grad_norm": float(metrics["grad_norm"]),
      "weight_sum": float(metrics["weight_sum"]),
      "tokens": int(metrics["tokens"]),
      "lr": float(lr),
      "tokens_per_s": float(tokens_per_s),
      "elapsed_s": float(elapsed_s),
  }
  if "mtl_weights" in metrics:  # a gradient method's combination weights (gradmtl_step.py)
    record["mtl_weights"] = by_name(metrics["mtl_weights"], task_names)
  return record


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """Flattens a record into TensorBoard tags (`per_task_loss/<task>`, ...)."""
  out = {}
  for key, value in record.items():
    if key == "step":
      continue
    if isinstance(value, Mapping):
      out.update({f"{key}/{k}": float(v) for k, v in value.items()})
    else:
      out[key] = float(value)
  return out


class MetricsLog:
  """Appends records to `workdir/metrics.jsonl` and `workdir/tb` (tensorboardX)."""

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
    """`enabled=False` (hosts other than the first of a multi-host run) writes nothing."""
    workdir = os.fspath(workdir)
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(self.path, resume_step)
    # Imported here so that reading metrics needs no tensorboardX.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step hides events of steps the crashed run logged after its last checkpoint.
    self._tb = SummaryWriter(
        os.path.join(workdir, TB_DIR), purge_step=resume_step + 1 if resume_step else None)

  def write(self, record: Mapping[str, Any]) -> None:
    if self._tb is None:
      return
    # One short line per write, flushed: a kill can at worst tear the last line,
    # which read_metrics skips.
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
      f.flush()
    for tag, value in _scalars(record).items():
      self._tb.add_scalar(tag, value, global_step=int(record["step"]))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()  # flushes
      self._tb = None
