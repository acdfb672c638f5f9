"""The pipeline on user data: one LLaVA JSON file per task and split, a local HF checkpoint."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from visatb_jax import pipeline
from visatb_jax.runtime import fileio
from visatb_jax.data import shapes, tokenizer as tokenizer_lib
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.model import hf_io
from visatb_jax.model.config import LlavaConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration

from conftest import micro_config

pytestmark = pytest.mark.slow

TASKS = ("caption", "vqa", "count", "grounding", "chat")


def _write_task_files(root: str) -> None:
  """The shapes benchmark rewritten as `{task}_{split}.json`, as the paper's release names them."""
  shapes.generate_benchmark(root, seed=0, sizes={"train": 16, "val": 4, "test": 4}, grid=3,
                            cell=16, max_objects=4)
  for split in ("train", "val", "test"):
    samples = fileio.read_json(os.path.join(root, f"{split}.json"))
    for task in TASKS:
      rows = [{k: v for k, v in s.items() if k != "task"} for s in samples if s["task"] == task]
      if split == "train" and task == "vqa":  # one invalid sample, skipped and counted
        rows.append({"id": "bad", "conversations": [{"from": "robot", "value": "hi"}]})
      fileio.atomic_write_json(os.path.join(root, f"{task}_{split}.json"), rows)


def _write_checkpoint(root: str, path: str, config) -> LlavaForConditionalGeneration:
  """A tiny random LLaVA saved as an HF directory with its tokenizer, as a user would have."""
  texts = [t["value"] for s in fileio.read_json(os.path.join(root, "train.json"))
           for t in s["conversations"]]
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size=300, save_dir=None)
  mc = config.model
  model = LlavaForConditionalGeneration(LlavaConfig.from_dict({
      "vision": dict(mc.vision), "text": {**dict(mc.text), "vocab_size": len(tok)},
      "image_token_id": tokenizer_lib.image_token_id(tok)}), rngs=nnx.Rngs(7))
  hf_io.save_pretrained(model, path)
  tok.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  ckpt = str(tmp_path_factory.mktemp("ckpt"))
  _write_task_files(root)
  config = micro_config()
  reference = _write_checkpoint(root, ckpt, config)
  config.data.source = "llava_json"
  config.data.root = root
  config.data.files = {"train": "{task}_train.json", "val": "{task}_val.json",
                       "test": "{task}_test.json"}
  config.model.path = ckpt
  return config, reference


def test_prep_starts_from_the_checkpoint_and_lambda_comes_out(user_setup, tmp_path):
  config, reference = user_setup
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, stages=["data", "prep", "validate", "lambda"])

  ws = Workspace(config_lib.build(config), workdir)
  start = nnx.state(ws.models.new_model(), nnx.Param)
  want = nnx.state(reference, nnx.Param)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ws.data.tokenizer.get_vocab() == tokenizer_lib.load_pretrained_tokenizer(
      config.model.path).get_vocab()

  validation = fileio.read_json(os.path.join(workdir, "scores", "validation.json"))
  assert set(validation) == {"mini"} | {f"{t}+mini" for t in TASKS if t != "chat"}
  lam = fileio.read_json(os.path.join(workdir, "lambda.json"))["lambda"]
  assert lam["chat"] == 1.0 and all(np.isfinite(v) for v in lam.values())
  stats = fileio.read_json(os.path.join(workdir, "data_stats.json"))
  assert stats["vqa_train.json (skipped)"] == {"unknown_role": 1}


def test_missing_task_file_names_the_file(user_setup, tmp_path):
  config, _ = user_setup
  config = json.loads(config.to_json())
  import ml_collections
  config = ml_collections.ConfigDict(config)
  config.data.files = {**config.data.files, "val": "{task}_dev.json"}
  with pytest.raises(PipelineError, match=r"task 'caption': val file .*caption_dev\.json"):
    pipeline.run(config, str(tmp_path / "run"), stages=["data"])


def test_missing_root_and_tokenizer_are_clear(user_setup, tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict(json.loads(user_setup[0].to_json()))
  config.data.root = ""
  with pytest.raises(PipelineError, match="config.data.root is empty"):
    pipeline.run(config, str(tmp_path / "a"), stages=["data"])
  config = ml_collections.ConfigDict(json.loads(user_setup[0].to_json()))
  config.model.path = str(tmp_path / "nowhere")
  with pytest.raises(PipelineError, match="tokenizer directory .*nowhere does not exist"):
    pipeline.run(config, str(tmp_path / "b"), stages=["data"])


def test_grain_loader_trains_the_prep_runs_and_checkpoints_its_position(user_setup, tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict(json.loads(user_setup[0].to_json()))
  config.data.loader = "grain"
  workdir = tmp_path / "run"
  pipeline.run(config, str(workdir), stages=["data", "prep"])
  assert (workdir / "data" / "prepared" / "prepare.json").exists()
  for name in ["mini"] + [f"{t}+mini" for t in TASKS if t != "chat"]:
    run = workdir / "prep" / name
    assert fileio.read_json(run / "run.json")["done"], name
    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    state = run / "checkpoints" / str(steps[-1]) / "data" / "process_0-of-1.json"
    assert state.exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["tokens"] > 0


def test_an_edited_task_file_reruns_the_data_stage_and_every_later_one(user_setup, tmp_path,
                                                                         capsys):
  """Same config, a task file edited in place: a stage selected with --stages refuses its stale
  inputs in one line; a full run redoes data and what follows, naming the file, unasked."""
  import shutil  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.loads(user_setup[0].to_json()))
  config.data.root = str(tmp_path / "data")
  shutil.copytree(user_setup[0].data.root, config.data.root)  # the module's files stay as they are
  # data, final, test and report of one model on two tasks: the fewest steps that show it.
  config.weighting, config.baselines, config.task_order = "ew", (), ("count", "chat")
  config.train.epochs, config.eval.max_new_tokens = 0.5, 2
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  path = os.path.join(config.data.root, "count_train.json")
  rows = fileio.read_json(path)
  rows[0]["conversations"][-1]["value"] += " shapes"
  fileio.atomic_write_json(path, rows)
  test_scores = fileio.read_json(os.path.join(workdir, "scores", "test.json"))
  capsys.readouterr()

  with pytest.raises(PipelineError) as info:
    pipeline.run(config, workdir, stages=["test"])
  message = str(info.value)
  assert "\n" not in message and "--overwrite" not in message, message
  assert (f"which is stale: input file {path} changed since it ran; run --stages data,final,test "
          in message), message

  pipeline.run(config, workdir)
  logged = capsys.readouterr().out
  for stage in ("data", "final", "test", "report"):
    assert f"stage {stage}: start (input file {path} changed since it ran)" in logged, stage
  manifest = fileio.read_json(os.path.join(workdir, "manifest.json"))
  assert all(manifest["stages"][s]["inputs"][path]["sha256"] == manifest["stages"]["data"]
             ["inputs"][path]["sha256"] for s in ("final", "test", "report"))
  assert set(fileio.read_json(os.path.join(workdir, "scores", "test.json"))) == set(test_scores)
  pipeline.run(config, workdir)
  assert "stage data: done, skipped" in capsys.readouterr().out
