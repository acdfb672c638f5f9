"""UW (uncertainty weighting) in the train loop: the gradient w.r.t. s is the analytical one, s is
checkpointed and restored on resume, and the method is selectable by name like the others."""

import os
import sys

import jax
import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.core import loss as loss_lib
from visatb_jax.core import weighting
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import methods
from visatb_jax.pipeline.errors import ConfigError
from visatb_jax.runtime import checkpoint
from visatb_jax.runtime import metrics_log

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import (TASKS, WCFG, Crash, deterministic, make_batch,  # noqa: E402
                        new_model, params_of)

from conftest import micro_config  # noqa: E402

# Fast enough for s to reach log L within the 6 steps of WCFG, so that λ really differs between
# the tasks by the time the resumed run takes over (the tiny model's two losses are close).
LR = 0.5
BASE = np.ones(len(TASKS), np.float32)


def uw_method() -> train.TrainMethod:
  return methods.get("uw").train_method(BASE, (False,) * len(TASKS), {"lr": LR})


def records(workdir):
  return metrics_log.read_metrics(workdir / metrics_log.METRICS_FILE)


def per_task(record, key):
  return np.array([record[key][t] for t in TASKS], np.float32)


def stored_uw_state(workdir, cfg, step=None):
  """The UW state saved in `workdir`'s checkpoint of `step` (default: the latest)."""
  _, params, _ = train.split_model(new_model())
  target = train.init_train_state(params, train.make_optimizer(cfg))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
  try:
    _, extras = ckpt.restore_with_extras(
        target, {checkpoint.WEIGHTING_ITEM: weighting.get_strategy("uw").init(len(TASKS))}, step)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, extras[checkpoint.WEIGHTING_ITEM])


def crashing_batch(i):
  if i == 4:  # after step 4 was logged; the last checkpoint is step 3
    raise Crash()
  return make_batch(i)


def test_first_step_moves_s_along_the_analytical_gradient(tmp_path, meshes):
  """After one train step, s's Adam moments hold g = 1 − exp(−s)·L with s = 0 and L the
  per-task mean NLL of the initial model on the first batch, computed here apart from the step."""
  cfg = dict(WCFG, steps=1)
  train.train(new_model(), make_batch, uw_method(), cfg, tmp_path, mesh=meshes[1],
              task_names=TASKS)
  (record,) = records(tmp_path)
  b = make_batch(0)
  logits = new_model()(b["input_ids"], images=b["images"])
  _, _, task_sum, task_count = loss_lib.token_loss(
      logits, b["targets"], b["loss_mask"], b["task_ids"], BASE)
  measured = np.asarray(task_sum / task_count, np.float64)
  np.testing.assert_allclose(per_task(record, "per_task_loss"), measured, rtol=1e-5)
  np.testing.assert_array_equal(per_task(record, "lambda"), 1.0)  # s = 0: λ of step 0 is EW

  state = stored_uw_state(tmp_path, cfg)
  grad = 1.0 - np.exp(-0.0) * measured
  b1, b2, eps = weighting.UW_ADAM_B1, weighting.UW_ADAM_B2, weighting.UW_ADAM_EPS
  np.testing.assert_allclose(state["adam_mu"], (1 - b1) * grad, rtol=1e-5)
  np.testing.assert_allclose(state["adam_nu"], (1 - b2) * grad**2, rtol=1e-5)
  np.testing.assert_array_equal(state["adam_count"], [1, 1])
  # Adam's first step after bias correction: −lr · g / (|g| + eps).
  np.testing.assert_allclose(state["log_var"], -LR * grad / (np.abs(grad) + eps), rtol=1e-5)
  np.testing.assert_allclose(state["lam"], len(TASKS) * np.exp(-state["log_var"])
                             / np.sum(np.exp(-state["log_var"])), rtol=1e-6)


def test_logged_lambda_is_uw_on_the_logged_losses(tmp_path, meshes):
  """The loop logs λ = N·softmax(−s) (exp(−s) at mean 1), s from UW run on the logged losses."""
  train.train(new_model(), make_batch, uw_method(), WCFG, tmp_path, mesh=meshes[1],
              task_names=TASKS)
  logged = records(tmp_path)
  assert [r["step"] for r in logged] == list(range(1, WCFG["steps"] + 1))
  uw = weighting.get_strategy("uw", lr=LR)
  state = uw.init(len(TASKS))
  for index, r in enumerate(logged):
    np.testing.assert_allclose(per_task(r, "lambda"), state["lam"], rtol=1e-6)
    _, state = uw.update(state, per_task(r, "per_task_loss"), index,
                         train.weighting_rng(WCFG["seed"], index),
                         per_task_count=per_task(r, "per_task_count"))
  stored = stored_uw_state(tmp_path, WCFG)
  np.testing.assert_allclose(stored["log_var"], state["log_var"], rtol=1e-6)
  assert np.ptp(per_task(logged[-1], "lambda")) > 1e-3  # the weights really moved apart


def test_stopped_and_resumed_run_has_the_same_s_and_loss(tmp_path, meshes):
  run = dict(mesh=meshes[1], task_names=TASKS)
  straight = train.train(new_model(), make_batch, uw_method(), WCFG, tmp_path / "a", **run)
  with pytest.raises(Crash):
    train.train(new_model(), crashing_batch, uw_method(), WCFG, tmp_path / "b", **run)
  # "New process": a fresh method and strategy; only the workdir survives.
  resumed = train.train(new_model(), make_batch, uw_method(), WCFG, tmp_path / "b", **run)

  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  assert deterministic(records(tmp_path / "b")) == deterministic(records(tmp_path / "a"))
  final_a, final_b = (stored_uw_state(tmp_path / d, WCFG) for d in ("a", "b"))
  for key in final_a:
    np.testing.assert_array_equal(final_b[key], final_a[key], err_msg=key)
  # Sensitive: at the resume point s is far from its initial 0, so a run that did not restore it
  # would train the last steps with other weights.
  assert np.all(np.abs(stored_uw_state(tmp_path / "b", WCFG, step=3)["log_var"]) > 0.1)


def test_uw_is_selectable_by_name_and_its_options_are_checked():
  config = micro_config()
  config.weighting = "uw"
  config.baselines = ("ew", "uw", "stl")
  config.weighting_options = {"uw": {"lr": 0.1}}
  run = config_lib.build(config)
  assert run.methods == ("uw", "ew", "stl") and not run.needs_balance
  assert run.method_options["uw"] == {"lr": 0.1}
  method = methods.get("uw").train_method(BASE, (False, True), run.method_options["uw"])
  assert (method.kind, method.name, method.weighting.name) == ("dynamic", "uw", "uw")
  config.weighting_options = {"uw": {"lr": 0.0}}
  with pytest.raises(ConfigError, match="config.weighting_options.uw"):
    config_lib.build(config)
  config.weighting_options = {"uw": {"rate": 0.1}}
  with pytest.raises(ConfigError, match="config.weighting_options.uw"):
    config_lib.build(config)
