"""The paper configs (configs/academic.py, m3it.py, chat.py, qwen2vl.py) against the paper.

`PAPER` below is transcribed by hand, kept here rather than imported, so that a change to a
config or to `pipeline/presets.py` cannot move the reference with it. Sources:

  * VisATB, arXiv 2403.04343 v3 (WWW 2026), and docs/method.md §5, §6, §9, §10: the benchmarks,
    their rates R_large / R_mini, balancing form, α = (0.25, 0.25, 0.5) everywhere, T = 0.5 for
    Academic and Chat, 1.0 for M3IT and for the Qwen2-VL-2B runs, and the baselines of the
    tables (EW, TLA, STL, RLW, DWA, IGBv1).
  * The release's scripts (github.com/YanqiDai/VisATB, scripts_visatb/): finetune_academic.sh
    trains 1 epoch on 8 tasks, finetune_chat.sh 3 epochs on 3 tasks; weighting_visatb.py uses
    T = 0.5 and the α above for both.
  * M3IT's 17 tasks and 5 groups follow M3IT's own taxonomy (Li et al. 2023, arXiv 2306.04387).
    This list could not be checked against the VisATB paper's own table from here.

Each config is loaded by the launch CLI's loader and checked by the run-config builder, with only
a placeholder data root: neither reads any file.
"""

from __future__ import annotations

import os

import pytest

from visatb_jax.cli import launch
from visatb_jax.pipeline import config as config_lib

from conftest import REPO

ALPHA = (0.25, 0.25, 0.5)
BASELINES = ("ew", "tla", "stl", "rlw", "dwa", "igb")

ACADEMIC_TASKS = ("ShareGPT4V", "RefCOCO-caption", "VQAv2", "GQA", "ChartQA", "OCRVQA",
                  "RefCOCO-bbox", "ShareGPT")

# group -> (its tasks, the metric of every task in it)
M3IT_GROUPS = {
    "captioning": (("coco", "textcap", "image-paragraph-captioning"), "cider"),
    "classification": (("coco-goi", "coco-text", "imagenet", "snli-ve", "coco-itm", "mocheg"),
                       "exact_match"),
    "vqa": (("gqa", "ocr-vqa", "shapes"), "exact_match"),
    "reasoning": (("clevr", "nlvr", "science-qa"), "exact_match"),
    "generation": (("visual-dialog", "multi30k"), "cider"),
}

PAPER = {
    "academic": {
        "tasks": ACADEMIC_TASKS, "groups": {}, "fixed": {"ShareGPT": 1.0},
        "form": "real", "temperature": 0.5, "alpha": ALPHA, "r_large": 1.0, "r_mini": 1 / 32,
        "epochs": 1.0, "baselines": BASELINES,
    },
    "m3it": {
        "tasks": tuple(t for tasks, _ in M3IT_GROUPS.values() for t in tasks),
        "groups": {t: g for g, (tasks, _) in M3IT_GROUPS.items() for t in tasks}, "fixed": {},
        "form": "real", "temperature": 1.0, "alpha": ALPHA, "r_large": 1 / 4, "r_mini": 1 / 32,
        "epochs": 1.0, "baselines": BASELINES,
    },
    "chat": {
        "tasks": ("conversation", "detail", "complex_reasoning"), "groups": {}, "fixed": {},
        "form": "base", "temperature": 0.5, "alpha": ALPHA, "r_large": 1.0, "r_mini": 1 / 32,
        "epochs": 3.0, "baselines": BASELINES,
    },
    "qwen2vl": {
        "tasks": ACADEMIC_TASKS, "groups": {}, "fixed": {"ShareGPT": 1.0},
        "form": "real", "temperature": 1.0, "alpha": ALPHA, "r_large": 1.0, "r_mini": 1 / 32,
        "epochs": 1.0, "baselines": BASELINES,
    },
}


def build(name: str) -> config_lib.RunConfig:
  config = launch.load_config(os.path.join(REPO, "configs", f"{name}.py"))
  config.data.root = "/nonexistent/data"  # required to be set; the builder reads no file
  return config_lib.build(config)


def test_the_table_is_consistent():
  assert len(PAPER["m3it"]["tasks"]) == 17 and len(M3IT_GROUPS) == 5
  assert len(set(PAPER["m3it"]["tasks"])) == 17
  assert len(ACADEMIC_TASKS) == 8 and len(PAPER["chat"]["tasks"]) == 3


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_matches_the_paper(name):
  paper, run = PAPER[name], build(name)
  assert run.tasks.names == paper["tasks"]
  assert dict(run.tasks.groups) == paper["groups"]
  assert dict(run.tasks.fixed) == paper["fixed"]
  assert run.balance.form == paper["form"]
  assert run.balance.temperature == paper["temperature"]
  assert run.balance.alpha == pytest.approx(paper["alpha"])
  assert run.section("prep.r_large") == pytest.approx(paper["r_large"])
  assert run.section("prep.r_mini") == pytest.approx(paper["r_mini"])
  assert run.train_epochs == paper["epochs"]
  assert run.main_method == "visatb"
  assert set(paper["baselines"]) <= set(run.methods[1:]), run.methods


def test_m3it_metrics_follow_the_groups():
  metrics = build("m3it").tasks.metrics
  for group, (tasks, metric) in M3IT_GROUPS.items():
    assert {t: metrics[t] for t in tasks} == dict.fromkeys(tasks, metric), group


def test_qwen2vl_config_is_qwen2vl_2b():
  """configs/qwen2vl.py builds Qwen2-VL-2B itself (its own tower and M-RoPE decoder), 2.21 B
  parameters as the released checkpoint, with the template whose image blocks it reads."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import factory, qwen2vl  # pylint: disable=g-import-not-at-top
  config = launch.load_config(os.path.join(REPO, "configs", "qwen2vl.py"))
  config.data.root = "/nonexistent/data"
  config_lib.build(config)  # family and template agree
  model_config = factory.model_config(config.model)
  assert isinstance(model_config, qwen2vl.Qwen2VLConfig)
  assert model_config.mrope_section == (16, 24, 24) and model_config.image_token_id == 151655
  model = factory.abstract_model(config.model, model_config)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert round(params / 1e9, 2) == 2.21
  config.data.template = "chatml"
  with pytest.raises(config_lib.ConfigError, match="does not fit a Qwen2-VL model"):
    config_lib.build(config)
