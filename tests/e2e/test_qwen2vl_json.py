"""The whole pipeline on a tiny random Qwen2-VL saved by transformers, the shapes data as LLaVA JSON.

Half of the images are re-saved at another aspect ratio, so that samples carry images of
different token counts (native resolution) through packing, training and evaluation.
"""

import os

import numpy as np
import pytest
from PIL import Image

from visatb_jax import pipeline
from visatb_jax.data import shapes, template
from visatb_jax.data import tokenizer as tokenizer_lib
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio

from conftest import micro_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

TASKS = ("caption", "count", "chat")
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
               "<|vision_end|>", "<|video_pad|>")
# 48 x 48 images become 56 x 56 (4 tokens), 96 x 48 ones 84 x 56 (6 tokens) under this cap.
MAX_PIXELS = 56 * 84


def _write_task_files(root: str) -> None:
  shapes.generate_benchmark(root, seed=0, sizes={"train": 16, "val": 4, "test": 4}, grid=3,
                            cell=16, max_objects=4)
  for split in ("train", "val", "test"):
    samples = fileio.read_json(os.path.join(root, f"{split}.json"))
    for i, s in enumerate(samples):
      if i % 2 and s.get("image"):  # Another aspect ratio: another token count.
        path = os.path.join(root, s["image"])
        Image.open(path).convert("RGB").resize((96, 48)).save(path)
    for task in TASKS:
      rows = [{k: v for k, v in s.items() if k != "task"} for s in samples if s["task"] == task]
      fileio.atomic_write_json(os.path.join(root, f"{task}_{split}.json"), rows)


def _write_checkpoint(root: str, path: str) -> None:
  """A tiny random Qwen2-VL and a tokenizer with its special tokens, saved by transformers."""
  texts = [t["value"] for s in fileio.read_json(os.path.join(root, "train.json"))
           for t in s["conversations"]]
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size=300, save_dir=None)
  tok.add_tokens(list(QWEN_TOKENS), special_tokens=True)
  ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
  torch.manual_seed(0)
  config = transformers.Qwen2VLConfig(
      vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
      text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       rms_norm_eps=1e-6, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 3, 3]}),
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
      tie_word_embeddings=False)
  transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(path)
  tok.save_pretrained(path)


@pytest.fixture(scope="module")
def qwen_setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  ckpt = str(tmp_path_factory.mktemp("qwen2vl"))
  _write_task_files(root)
  _write_checkpoint(root, ckpt)
  config = micro_config()
  config.task_order, config.baselines = TASKS, ("ew", "stl")
  config.data.source = "llava_json"
  config.data.root = root
  config.data.files = {"train": "{task}_train.json", "val": "{task}_val.json",
                       "test": "{task}_test.json"}
  config.data.template = "qwen2vl"
  config.data.max_pixels = MAX_PIXELS
  config.model.path = ckpt
  return config


@pytest.fixture(scope="module")
def finished(qwen_setup, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("qwen_run") / "run")
  pipeline.run(qwen_setup, workdir)
  return qwen_setup, workdir


def test_qwen2vl_pipeline_runs_to_comparison(finished):
  config, workdir = finished

  comparison = fileio.read_json(os.path.join(workdir, "report", "comparison.json"))
  assert set(comparison) == {"visatb", "ew"}, comparison
  # A random model may score 0 under STL, where ΔI is undefined and the entry says so.
  assert all(comparison[m]["step_time_s"] > 0 for m in comparison), comparison
  lam = fileio.read_json(os.path.join(workdir, "lambda.json"))["lambda"]
  assert lam["chat"] == 1.0 and all(np.isfinite(v) for v in lam.values())
  test_scores = fileio.read_json(os.path.join(workdir, "scores", "test.json"))
  assert set(test_scores["visatb"]) == set(TASKS)

  # Training saw images of both token counts, each block wrapped in its vision tokens.
  ws = Workspace(config_lib.build(config), workdir)
  tok = ws.data.tokenizer
  pad = template.image_token_id(tok, "qwen2vl")
  start = tok.convert_tokens_to_ids("<|vision_start|>")
  blocks = set()
  for examples in ws.data.encoded_train().values():
    for ex in examples:
      ids = np.asarray(ex.input_ids)
      for s in np.flatnonzero(ids == start):
        blocks.add(int(np.argmax(ids[s + 1:] != pad)))
  assert blocks == {4, 6}, blocks
  assert ws.models.model_config.image_token_id == pad


def test_the_exported_final_model_scores_as_the_test_stage_did(finished, tmp_path):
  """The VisATB model written by `qwen2vl_io.save_pretrained` with its tokenizer is a Hugging
  Face Qwen2-VL directory that `python -m visatb_jax.evaluate` scores exactly as the pipeline's
  test stage scored the run's own checkpoint."""
  from visatb_jax.cli import evaluate  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import qwen2vl_io  # pylint: disable=g-import-not-at-top
  config, workdir = finished
  ws = Workspace(config_lib.build(config), workdir)
  hf_dir = str(tmp_path / "visatb_hf")
  qwen2vl_io.save_pretrained(ws.models.load("final/visatb"), hf_dir, tokenizer=ws.data.tokenizer)
  hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(hf_dir)
  assert hf.config.image_token_id == template.image_token_id(ws.data.tokenizer, "qwen2vl")
  result = evaluate.evaluate_model(config, hf_dir, split="test")
  assert result["kind"] == "hf"
  assert result["scores"] == fileio.read_json(os.path.join(workdir, "scores",
                                                           "test.json"))["visatb"]
