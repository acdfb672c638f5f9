"""The method registry: every method trains through one TrainMethod, and honours fixed weights."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.core import balancing
from visatb_jax.pipeline import methods
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "train"))
import test_train as tt  # noqa: E402  (the train tests' tiny model and batches)

TASKS = ("a", "b", "c")
FIXED_WEIGHT = 0.5
BASE = np.array([1.0, 1.0, FIXED_WEIGHT], np.float32)
FIXED = (False, False, True)
ROWS = 6


def batches(step):
  return tt.make_batch(step, rows=ROWS, task_of_row=np.arange(ROWS) % len(TASKS))


def visatb_lambda():
  scores = {"mini": {"a": 0.2, "b": 0.3}, "a+mini": {"a": 0.5, "b": 0.35},
            "b+mini": {"a": 0.25, "b": 0.6}}
  lam = balancing.compute_lambda(scores, tasks=list(TASKS), fixed={"c": FIXED_WEIGHT})
  return np.array([lam[t] for t in TASKS], np.float32)


def test_registry_names_every_kind_once():
  kinds = {spec.kind for spec in methods.REGISTRY.values()}
  assert kinds == {"visatb", "static", "tla", "per_task", "dynamic", "gradient"}
  assert [n for n, s in methods.REGISTRY.items() if s.needs_balance] == ["visatb"]
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.get("nope")


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_gives_a_fixed_weight_task_the_same_weight(tmp_path, name):
  """The fixed task's weight reaches the loss as the same share under every method: λ_c = w
  (TLA: λ_c · count_c = w, its per-task mean weighted by w)."""
  spec = methods.get(name)
  method = spec.train_method(BASE, FIXED, lam=visatb_lambda() if spec.needs_balance else None)
  cfg = {"steps": 3, "lr": 1e-2, "batch_size": ROWS, "log_every": 1, "checkpoint_every": 10}
  train.train(tt.new_model(), batches, method, cfg, tmp_path,
              mesh=sharding.make_mesh(devices=__import__("jax").devices()[:1]),
              task_names=TASKS)
  records = metrics_log.read_metrics(tmp_path / metrics_log.METRICS_FILE)
  assert len(records) == 3
  for r in records:
    lam, count = r["lambda"], r["per_task_count"]
    effective = lam["c"] * count["c"] if spec.kind == "tla" else lam["c"]
    assert effective == pytest.approx(FIXED_WEIGHT, rel=1e-6), (name, r)
  if name in ("visatb", "rlw"):  # the balanced tasks' weights do move (DWA and IGB wait a window)
    assert any(abs(r["lambda"]["a"] - 1.0) > 1e-4 for r in records), name
