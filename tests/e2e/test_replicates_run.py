"""Preparation replicates and the evidence rule through the pipeline (docs/method.md §13–14)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from visatb_jax import pipeline
from visatb_jax.core import bootstrap
from visatb_jax.pipeline import stages
from visatb_jax.runtime import fileio

from conftest import micro_config, set_fields

pytestmark = pytest.mark.slow

BALANCED = ("caption", "count")


def _config():
  return set_fields(micro_config(), {"task_order": BALANCED + ("chat",), "prep.replicates": 2,
                                     "balance.shrinkage": "evidence", "baselines": ("ew",)})


@pytest.fixture(scope="module")
def replicated_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("replicates"))
  pipeline.run(_config(), workdir, stages=("data", "prep", "validate", "lambda"))
  return workdir


def test_every_preparation_model_is_trained_once_per_replicate(replicated_run):
  models = ["mini"] + [f"{u}+mini" for u in BALANCED]
  for name in models:
    first = fileio.read_json(os.path.join(replicated_run, stages.prep_dir(name, 0), "run.json"))
    second = fileio.read_json(os.path.join(replicated_run, stages.prep_dir(name, 1), "run.json"))
    assert first["done"] and second["done"]
    assert stages.prep_dir(name, 1) == os.path.join("prep", f"{name}.rep1")
    assert "data_seed" not in first and second["data_seed"] != 0  # replicate 0 = the run's seed


def test_validation_keeps_each_replicate_and_the_mean(replicated_run):
  table = fileio.read_json(os.path.join(replicated_run, "scores", "validation.json"))
  per_replicate = fileio.read_json(os.path.join(replicated_run, "scores",
                                                "validation_replicates.json"))
  samples = fileio.read_json(os.path.join(replicated_run, "scores", "validation_samples.json"))
  for model, row in table.items():
    for task, value in row.items():
      runs = per_replicate[model][task]
      assert len(runs) == 2 and value == pytest.approx(np.mean(runs))
      per_sample = samples[model][task]
      assert all(len(v) == 2 for v in per_sample.values())
      # Each replicate's mean is the mean of its per-sample scores.
      for r in range(2):
        assert runs[r] == pytest.approx(np.mean([v[r] for v in per_sample.values()]))


def test_lambda_json_has_two_level_intervals_and_training_shares(replicated_run):
  report = fileio.read_json(os.path.join(replicated_run, "lambda.json"))
  assert report["bootstrap"]["replicates"] == 2
  assert report["bootstrap"]["shrinkage"] == "evidence"
  shares = report["variance"]["training_share"]
  for key in ("c_out", "c_in", "d", "gain"):
    assert set(shares[key]) == set(BALANCED)
  for task in BALANCED:
    share = shares["lambda"][task]
    assert share is None or 0.0 <= share <= 1.0
  assert shares["lambda"]["chat"] is None  # fixed weight: no variance at all
  # The same numbers again from the stored per-sample scores (what `balance --samples` reads).
  again = bootstrap.bootstrap_report(
      bootstrap.align_by_id(fileio.read_json(os.path.join(replicated_run, "scores",
                                                          "validation_samples.json"))),
      tasks=list(BALANCED) + ["chat"], temperature=0.5, fixed={"chat": 1.0},
      on_degenerate="warn", shrinkage="evidence", seed=0)
  assert again["lambda"] == pytest.approx(report["lambda"])
  for task, interval in report["intervals"]["lambda"].items():
    assert again["intervals"]["lambda"][task] == pytest.approx(interval)


def test_balance_run_reproduces_lambda_json_exactly(replicated_run, capsys):
  """`python -m visatb_jax.balance --run WORKDIR` = the lambda stage, from the files alone."""
  import json
  from visatb_jax.cli import balance
  assert balance.main(["--run", replicated_run, "--json"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed == fileio.read_json(os.path.join(replicated_run, "lambda.json"))
  # The table form shows each λ's training share.
  assert balance.main(["--run", replicated_run]) == 0
  assert "train" in capsys.readouterr().out
  # Settings come from the run: another option would make it disagree, so it is refused.
  assert balance.main(["--run", replicated_run, "--temperature", "auto"]) == 2
  assert "--temperature" in capsys.readouterr().err
