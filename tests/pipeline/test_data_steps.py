"""train.batch_size in samples through the pipeline: the preparation runs' step counts and their
warning under the paper's 100 steps, and a trained model's static rows per step."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import data as data_lib
from visatb_jax.pipeline import methods
from visatb_jax.pipeline.workspace import Workspace

from conftest import micro_config


def _workspace(tmp_path, **train) -> Workspace:
  config = micro_config()
  for key, value in train.items():
    config.train[key] = value
  ws = Workspace(config_lib.build(config), str(tmp_path))
  return ws


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The micro config's directory with its data stage done (shared by the workspaces below)."""
  path = tmp_path_factory.mktemp("steps")
  _workspace(path).data.prepare()
  return path


def _counts(ws):
  return {name: len(ws.data.prep_examples(name))
          for name, _ in ws.config.tasks.prep_models(ws.config.balance.form)}


def test_preparation_runs_under_100_steps_are_warned_with_their_count(prepared):
  ws = _workspace(prepared)  # 8 samples a step, 1 epoch
  counts = _counts(ws)
  with pytest.warns(UserWarning) as record:
    msgs = ws.data.prep_step_warnings()
  assert [str(w.message) for w in record] == msgs
  assert len(msgs) == len(counts) == 5  # mini and the four <unit>+mini
  for (name, n), msg in zip(counts.items(), msgs):
    steps = math.ceil(n / 8)
    assert msg.startswith(f"preparation model {name!r} trains {steps} optimizer steps "
                          f"({n} samples, 1 epoch(s) of train.batch_size=8 samples), under "
                          "the paper's 100 recommended"), msg
  # The prep stage logs them with the subsets' size warnings.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert set(msgs) <= set(ws.data.subset_warnings())


def test_enough_steps_are_not_warned_and_the_count_follows_the_batch_in_samples(prepared):
  smallest = min(_counts(_workspace(prepared)).values())
  # One sample a step, enough epochs that the smallest model reaches exactly 100 steps.
  epochs = 100 / smallest
  ws = _workspace(prepared, batch_size=1, epochs=epochs)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing to warn about
    assert ws.data.prep_step_warnings() == []
  below = _workspace(prepared, batch_size=1, epochs=99 / smallest)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    msgs = below.data.prep_step_warnings()
  assert len(msgs) == 1 and "trains 99 optimizer steps" in msgs[0]
  assert data_lib.MIN_PREP_STEPS == 100


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_a_trained_model_records_steps_of_samples_in_static_rows(prepared, tmp_path, capsys):
  """One preparation model trained on the 8 simulated devices: ceil(samples / batch) steps,
  rows per step a multiple of the 8 batch shards that fits every step, recorded in run.json."""
  ws = _workspace(prepared, batch_size=5, epochs=2.0)
  examples = ws.data.prep_examples("mini")
  plan = ws.config.tasks
  method = methods.get("ew").train_method(plan.base_weights(), plan.fixed_mask())
  assert not ws.models.train("prep/mini", examples, method, stage_hash="h")
  info = ws.dir.run_info("prep/mini")
  steps = 2 * math.ceil(len(examples) / 5)
  rows = info["rows_per_step"]
  assert info["train"]["steps"] == steps and info["samples_per_step"] == 5
  assert info["train"]["batch_size"] == rows and rows % 8 == 0  # the trainer's rows
  assert 0.0 <= info["padding"]["empty_rows"] < 1.0 and info["padding"]["samples_per_row"] > 1
  logged = capsys.readouterr().out
  assert f"{len(examples)} samples, {steps} steps of 5 samples in {rows} rows" in logged
  with open(os.path.join(str(prepared), "prep", "mini", "metrics.jsonl")) as f:
    assert max(json.loads(line).get("step", 0) for line in f) >= steps - 1
