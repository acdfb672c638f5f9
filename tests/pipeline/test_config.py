"""The run config: every check before any stage, each a one-line error naming the field."""

from __future__ import annotations

import os

import pytest

from visatb_jax import pipeline
from visatb_jax.pipeline import config as config_lib
from visatb_jax.runtime import fileio

from conftest import micro_config

BAD = [
    ("balance.alpha", (0.5, 0.5, 0.5), "config.balance.alpha"),
    ("balance.temperature", -1.0, "config.balance.temperature"),
    ("balance.temperature", "hot", "config.balance.temperature"),
    ("balance.form", "exact", "config.balance.form"),
    ("balance.on_degenerate", "ignore", "config.balance.on_degenerate"),
    ("weighting_options", {"dwa": {"windw": 3}}, "config.weighting_options.dwa"),
    ("weighting_options", {"dwa": {"window": 0}}, "config.weighting_options.dwa"),
    ("weighting_options", {"cagrad": {"cc": 0.4}}, "config.weighting_options.cagrad"),
    ("weighting_options", {"ew": {"x": 1}}, "config.weighting_options.ew"),
    ("train.epochs", -1.0, "config.train.epochs"),
    ("train.epochs", 0.0, "config.train.epochs"),
    ("train.batch_size", 0, "config.train.batch_size"),
    ("train.lr", 0.0, "config.train.lr"),
    ("train.accum_steps", 3, "config.train.batch_size=8 is not divisible by"),
    ("prep.r_mini", 1.5, "config.prep.r_mini"),
    ("prep.parallel", 0, "config.prep.parallel"),
    ("eval.batch_size", 0, "config.eval.batch_size"),
    ("eval.max_new_tokens", -2, "config.eval.max_new_tokens"),
    ("data.max_len", 1000, "config.data.max_len"),
    ("data.loader", "tfdata", "config.data.loader"),
    ("mesh", {"data": -1, "fsdp": 3, "tensor": 1}, "config.mesh"),
    ("weighting", "stl", "config.weighting='stl'"),
    ("baselines", ("ew", "mgdaa"), "mgdaa"),
]


def _set(config, key, value):
  *path, leaf = key.split(".")
  node = config
  for p in path:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize("key,value,named", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_field_fails_before_the_data_stage_in_one_line(tmp_path, key, value, named):
  config = micro_config().to_dict()  # plain: a field may take a value of another type
  _set(config, key, value)
  with pytest.raises(pipeline.ConfigError) as info:
    pipeline.run(config, str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert named in message, message
  assert not os.path.exists(tmp_path / "data")  # nothing ran
  assert not os.path.exists(tmp_path / "manifest.json")


def test_defaults_are_filled_once():
  config = micro_config()
  del config.balance["on_degenerate"]
  run = config_lib.build(config)
  assert run.balance == config_lib.BalanceConfig(temperature=0.5, on_degenerate="error",
                                                 shrinkage="none")
  assert run.methods == ("visatb", "ew", "stl", "mgda") and run.needs_balance
  cfg = run.train_config(steps=7)
  assert (cfg.steps, cfg.seed, cfg.accum_steps, cfg.ce_chunk_size) == (7, 0, 1, 0)


def test_changing_the_form_reruns_prep(tmp_path, capsys):
  """balance.form decides which preparation models exist: it is in prep's hash."""
  config = micro_config()
  config.baselines = ()
  config.train.epochs = 0.1
  workdir = str(tmp_path)
  pipeline.run(config, workdir, stages=["data", "prep"])
  capsys.readouterr()
  config.balance.form = "precise"
  pipeline.run(config, workdir, stages=["data", "prep"], overwrite=True)
  logged = capsys.readouterr().out
  assert "stage data: done, skipped" in logged
  assert "stage prep: start (its config changed since it ran)" in logged
  assert os.path.exists(os.path.join(workdir, "prep", "mini_vqa", "run.json"))


@pytest.mark.slow
def test_a_new_temperature_retrains_visatb_alone(tmp_path, capsys):
  """λ, α, T and the form are read by VisATB's final model only: EW and STL are reused."""
  config = micro_config()
  config.task_order = ("caption", "count", "chat")
  config.baselines = ("ew", "stl")
  config.train.epochs = 0.5
  workdir = str(tmp_path)
  stages = ["data", "prep", "validate", "lambda", "final"]
  pipeline.run(config, workdir, stages=stages)
  ew_info = fileio.read_json(os.path.join(workdir, "final", "ew", "run.json"))
  capsys.readouterr()
  config.balance.temperature = 2.0
  pipeline.run(config, workdir, stages=stages, overwrite=True)
  logged = capsys.readouterr().out
  assert "stage lambda: start (its config changed since it ran)" in logged
  assert "final/ew: trained, skipped" in logged
  assert "final/stl/count: trained, skipped" in logged
  assert "final/visatb: trained, skipped" not in logged
  assert fileio.read_json(os.path.join(workdir, "final", "ew", "run.json")) == ew_info


def test_evidence_rule_is_the_default_of_user_configs_and_replicates_are_checked():
  """docs/method.md §13–14: beyond the paper, so the default where a config says nothing."""
  config = micro_config()
  del config.balance["shrinkage"]
  assert config_lib.build(config).balance.shrinkage == "evidence"
  for key, value, named in (("balance.shrinkage", "james-stein", "config.balance.shrinkage"),
                            ("prep.replicates", 0, "config.prep.replicates"),
                            ("prep.replicates", 1.5, "config.prep.replicates")):
    plain = micro_config().to_dict()
    _set(plain, key, value)
    with pytest.raises(pipeline.ConfigError, match=named.replace(".", r"\.")):
      config_lib.build(plain)
