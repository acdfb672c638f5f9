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
    ("train.accum_steps", 0, "config.train.accum_steps"),
    ("prep.r_mini", 1.5, "config.prep.r_mini"),
    ("prep.parallel", 0, "config.prep.parallel"),
    ("eval.batch_size", 0, "config.eval.batch_size"),
    ("eval.max_new_tokens", -2, "config.eval.max_new_tokens"),
    ("tasks.caption.max_new_tokens", 0, "config.tasks.caption.max_new_tokens"),
    ("tasks.caption.max_new_tokens", 2.5, "config.tasks.caption.max_new_tokens"),
    ("tasks.caption.metric_options", {"tokenization": "ptb"},
     "config.tasks.caption.metric_options: cider option tokenization='ptb'"),
    ("zero_shot", {"background": {"metric": "exact_match", "max_new_tokens": -1}},
     "config.zero_shot.background.max_new_tokens"),
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
  # train.batch_size counts samples (8 here); the trainer's batch_size is the rows they pack into.
  assert cfg.batch_size is None and run.train_config(7, rows_per_step=16).batch_size == 16


def test_batch_size_counts_samples_so_micro_batches_need_not_divide_it():
  """8 samples in 3 micro-batches is valid: the rows they pack into are rounded up to a multiple
  of the micro-batches (docs/architecture.md, "Batch size in samples")."""
  config = micro_config()
  config.train.accum_steps = 3
  run = config_lib.build(config)
  assert run.train_config(5, rows_per_step=6).accum_steps == 3
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by train.accum_steps=3"):
    run.train_config(5, rows_per_step=4)  # rows, unlike samples, must split evenly
  del config.train["batch_size"]
  with pytest.raises(pipeline.ConfigError, match=r"config.train.batch_size is required \(samples "
                                                 "per optimizer step"):
    config_lib.build(config)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
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


# ---------------------------------------------------------------------------------------------
# Per-task generation budgets and the starting model
# ---------------------------------------------------------------------------------------------


def _hashes(config):
  from visatb_jax.pipeline import runner  # pylint: disable=g-import-not-at-top
  return runner.stage_hashes(config_lib.build(config))


def test_a_tasks_own_max_new_tokens_is_hashed_with_eval_not_with_the_tasks():
  """Changing a task's budget re-scores the models; it never retrains them (the data stage,
  which every training stage follows, hashes the tasks section)."""
  plain = micro_config()
  budget = micro_config()
  budget.tasks.caption.max_new_tokens = 16
  run = config_lib.build(budget)
  assert run.section("eval")["task_max_new_tokens"] == {"caption": 16}
  assert "max_new_tokens" not in run.section("tasks")["tasks"]["caption"]
  assert "task_max_new_tokens" not in config_lib.build(plain).section("eval")
  before, after = _hashes(plain), _hashes(budget)
  for stage in ("data", "pretrain", "prep"):
    assert before[stage] == after[stage], stage
  for stage in ("validate", "test"):
    assert before[stage] != after[stage], stage


def test_a_zero_shot_tasks_max_new_tokens_is_kept_only_when_set():
  config = micro_config()
  config.zero_shot = {"background": {"metric": "exact_match", "max_new_tokens": 4},
                      "other": {"metric": "cider", "files": {"test": "/data/other_test.json"}}}
  zero_shot = config_lib.build(config).section("zero_shot")
  assert zero_shot["background"]["max_new_tokens"] == 4
  assert "max_new_tokens" not in zero_shot["other"]  # unchanged hashes for existing runs


def _llava_dir(parent, name, model_type="llava"):
  """A checkpoint directory that passes the path checks: config.json, a weight file and a
  tokenizer file (no weights are read before the data stage)."""
  # pylint: disable=g-import-not-at-top
  import json
  from visatb_jax.model import hf_io
  from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
  # pylint: enable=g-import-not-at-top
  path = parent / name
  path.mkdir()
  hf = hf_io.config_to_hf(LlavaConfig(vision=VisionConfig(), text=TextConfig(), image_token_id=4))
  hf["model_type"] = model_type
  (path / "config.json").write_text(json.dumps(hf))
  (path / "model.safetensors").write_bytes(b"")
  (path / "tokenizer.json").write_text("{}")
  return path


@pytest.mark.parametrize("name, model_type, flagged", [
    ("llava-1.5-7b-hf", "llava", True),          # llava-hf's conversion
    ("llava-v1.5-13b", "llava_llama", True),     # the original release
    ("my-llava-sft", "llava", True),             # a LLaVA by name and config
    ("llava-1.5-7b-hf", "llama", True),          # a LLaVA-1.5 release by its name alone
    ("checkpoint", "llava", False),              # nothing in the name: a user's own LLaVA
    ("llava-v1.5-mlp2x-pretrain", "llava", False),  # a stage-1 (pretrain) model
    ("Qwen2-VL-2B-Instruct", "qwen2_vl", True),
    ("Qwen2-VL-2B", "qwen2_vl", False),          # the base the paper fine-tunes
])
def test_instruction_tuned_starts_are_recognised(tmp_path, name, model_type, flagged):
  path = str(_llava_dir(tmp_path, name, model_type))
  assert (config_lib.instruction_tuned_start(path) is not None) == flagged


def test_an_instruction_tuned_llava_path_is_warned_about_in_one_line(tmp_path):
  config = micro_config()
  config.model.path = str(_llava_dir(tmp_path, "llava-1.5-7b-hf"))
  with pytest.warns(config_lib.InstructionTunedStartWarning) as record:
    config_lib.build(config)
  (warning,) = record
  message = str(warning.message)
  assert "\n" not in message and config.model.path in message
  for source in ("VQAv2", "GQA", "OCRVQA", "RefCOCO", "ShareGPT", "model.vision_path"):
    assert source in message, source
  assert warning.filename == "config.model.path"  # shown as one line naming the field
  # A user's own LLaVA checkpoint (nothing says instruction-tuned) is not warned about.
  config.model.path = str(_llava_dir(tmp_path, "checkpoint"))
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("error", config_lib.InstructionTunedStartWarning)
    config_lib.build(config)
