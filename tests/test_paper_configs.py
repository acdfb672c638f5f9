"""The paper configs (configs/academic.py, academic13b.py, m3it.py, chat.py, qwen2vl.py) against
the paper and its release.

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
  * The release (github.com/YanqiDai/VisATB, read at commit 409e8eb): every fine-tuning script
    starts from lmsys/vicuna-{7b,13b}-v1.5 with a CLIP tower and `--pretrain_mm_mlp_adapter`;
    finetune_academic_vicuna13b.sh is the 7B script with Vicuna-13B; weighting_visatb.py prints
    the final weights of Academic-7B, Academic-13B and Chat from the C_out, C_in and
    V(mini)/V(i+mini) values transcribed in RELEASE below; weight_method.py's DWA has
    iteration_window=25 and is dynamic once more than 25 steps ran; inference_visatb.py answers
    with max_new_tokens=2048; eval/caption.py scores with pycocoevalcap's Cider on raw text.

Each config is loaded by the launch CLI's loader and checked by the run-config builder, with only
a placeholder data root and its model parts cleared: neither reads any file.
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
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
    # The release's finetune_academic_vicuna13b.sh and the "vicuna 13b" block of
    # weighting_visatb.py: Academic's settings, T = 0.5.
    "academic13b": {
        "tasks": ACADEMIC_TASKS, "groups": {}, "fixed": {"ShareGPT": 1.0},
        "form": "real", "temperature": 0.5, "alpha": ALPHA, "r_large": 1.0, "r_mini": 1 / 32,
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


PART_FIELDS = ("vision_path", "text_path", "projector_path")
# The LLaVA configs and the language model they start from.
LLAVA_CONFIGS = {"academic": "7b", "academic13b": "13b", "m3it": "7b", "chat": "7b"}


def load(name: str):
  return launch.load_config(os.path.join(REPO, "configs", f"{name}.py"))


def build(name: str) -> config_lib.RunConfig:
  config = load(name)
  config.data.root = "/nonexistent/data"  # required to be set; the builder reads no file
  for field in PART_FIELDS:  # the parts are not on this machine: a random init of their sizes
    config.model[field] = ""
  config.data.tokenizer = ""
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


# ---------------------------------------------------------------------------------------------
# Item 1: the starting model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", sorted(LLAVA_CONFIGS.items()))
def test_llava_configs_start_from_the_papers_parts(name, size):
  """CLIP ViT-L/14-336 + Vicuna-v1.5 + the stage-1 projector, as the release's scripts, never an
  instruction-tuned LLaVA; every path is a local one to fill, checked before any stage."""
  config = load(name)
  model = config.model
  assert model.path == ""
  assert os.path.basename(model.vision_path) == "clip-vit-large-patch14-336"
  assert os.path.basename(model.text_path) == f"vicuna-{size}-v1.5"
  assert model.projector_path.endswith(
      f"llava-v1.5-mlp2x-336px-pretrain-vicuna-{size}-v1.5/mm_projector.bin")
  assert os.path.basename(config.data.tokenizer) == f"vicuna-{size}-v1.5-image"
  assert all(os.path.isabs(model[f]) for f in PART_FIELDS)
  config.data.root = "/nonexistent/data"
  if not os.path.exists(model.vision_path):  # the usual case: one line naming the field to fill
    with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.vision_path: .*clip"):
      config_lib.build(config)


def test_dry_run_sizes_a_paper_config_without_its_parts():
  """`--dry-run` needs no weights: parts that are not on the machine give way to the config's
  sizes, which are theirs (Vicuna-13B's for academic13b)."""
  from visatb_jax.cli import dryrun  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  config = load("academic13b")
  for field in PART_FIELDS:  # parts that are not on this machine, whatever this machine holds
    if config.model[field]:
      config.model[field] = f"/nonexistent/{field}"
  section = dryrun._sized_model_section(config.model)  # pylint: disable=protected-access
  assert not any(section[f] for f in PART_FIELDS)
  model_config = factory.model_config(section)
  assert (model_config.text.hidden_size, model_config.text.num_hidden_layers) == (5120, 40)
  demo = load("demo")
  assert dryrun._sized_model_section(demo.model) is demo.model  # pylint: disable=protected-access


def test_academic13b_is_vicuna_13b_with_academics_settings():
  config, academic = load("academic13b"), load("academic")
  # lmsys/vicuna-13b-v1.5 config.json, the vocabulary grown to 32064 as the 7B's (<image>, <pad>).
  assert dict(config.model.text) == {
      "vocab_size": 32064, "hidden_size": 5120, "intermediate_size": 13824,
      "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
      "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
  assert dict(config.model.vision) == dict(academic.model.vision)
  assert config.model.remat == "full"  # 13B's activations do not fit 80 GB with the 7B's policy
  for section in ("train", "prep", "balance", "eval", "tasks"):
    assert config[section].to_dict() == academic[section].to_dict(), section
  assert config.data.to_dict() == {**academic.data.to_dict(),
                                   "tokenizer": "/models/vicuna-13b-v1.5-image"}


def _section(text: str, heading: str) -> str:
  start = text.index(heading)
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else len(text)]


def test_readme_runs_the_paper_configs_from_the_parts():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    section = _section(f.read(), "## Your data and checkpoint: the paper's benchmarks")
  command = section[section.index("python -m visatb_jax.launch --config academic.py"):]
  command = command[:command.index("```")]
  for field in PART_FIELDS:
    assert f"--config.model.{field}=" in command, field
  assert "--config.data.tokenizer=" in command
  assert "llava-1.5-7b-hf" not in command and "--config.model.path" not in command
  # The pretrained base, not -Instruct.
  assert re.search(r"--config\.model\.path=/models/Qwen2-VL-2B\s", section)
  assert "--config.model.path=/models/Qwen2-VL-2B-Instruct" not in section


def test_qwen2vl_config_names_the_pretrained_base():
  config = load("qwen2vl")
  assert config.model.path == "" and not any(config.model[f] for f in PART_FIELDS)
  with open(os.path.join(REPO, "configs", "qwen2vl.py"), encoding="utf-8") as f:
    command = f.read().split('"""')[1].split("\n\n")[1]
  assert re.search(r"--config\.model\.path=/models/Qwen2-VL-2B\s", command + "\n"), command
  assert "Instruct" not in command


_MODULE_PATH = re.compile(r"`?(visatb_jax(?:\.\w+)+)")
_DOC_PATH = re.compile(r"(docs/[\w.]+\.md|README\.md|BENCHMARKS\.md)")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_docstrings_name_existing_modules_and_files(name):
  with open(os.path.join(REPO, "configs", f"{name}.py"), encoding="utf-8") as f:
    doc = f.read().split('"""')[1]
  for dotted in _MODULE_PATH.findall(doc):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
      try:
        obj = importlib.import_module(".".join(parts[:cut]))
        break
      except ImportError:
        continue
    for attr in parts[cut:]:
      assert hasattr(obj, attr), f"{name}.py names {dotted}, which does not exist"
      obj = getattr(obj, attr)
  for path in _DOC_PATH.findall(doc):
    assert os.path.exists(os.path.join(REPO, path)), f"{name}.py names {path}"


# ---------------------------------------------------------------------------------------------
# λ as the release computes it
# ---------------------------------------------------------------------------------------------

# weighting_visatb.py's inputs: C_out, C_in and the ratio V_i(mini) / V_i(i+mini) (the release's
# "difficulties"; D = 1 − ratio), and the final weights it prints (torch float32).
RELEASE = {
    "academic": {
        "c_out": [0.1637, 0.1903, 0.1952, 0.1433, 0.0768, 0.1316, 0.1582],
        "c_in": [0.1634, 0.2179, 0.1326, 0.1775, 0.1674, 0.0783, 0.1219],
        "ratio": [0.7597, 0.5313, 0.8852, 0.7979, 0.5511, 0.8680, 0.1904],
        "lambda": [0.85851181, 1.05566788, 0.81072426, 0.81507051, 1.00204682, 0.81767565,
                   1.64030278]},
    "academic13b": {
        "c_out": [0.1885, 0.2192, 0.1561, 0.1390, 0.0409, 0.1519, 0.1248],
        "c_in": [0.0551, 0.2067, 0.1497, 0.2181, 0.1392, 0.0702, 0.1813],
        "ratio": [0.6814, 0.5744, 0.8916, 0.8065, 0.5705, 0.8715, 0.1247],
        "lambda": [0.97307062, 1.00892878, 0.76591253, 0.77518851, 0.95822358, 0.81713641,
                   1.70153952]},
    "chat": {
        "c_out": [0.7601, 0.3496, 1.6727], "c_in": [1.2890, 0.9779, 0.5156],
        "ratio": [0.8636, 0.3534, 0.9593],
        "lambda": [0.52340889, 1.13265085, 1.34394014]},
}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_lambda_of_the_configs_settings_is_the_releases(name):
  from visatb_jax.core import balancing  # pylint: disable=g-import-not-at-top
  release, run = RELEASE[name], build(name)
  assert len(release["c_out"]) == len(run.tasks.balanced_tasks)
  lam = balancing.lambda_from_components(
      np.asarray(release["c_out"]), np.asarray(release["c_in"]),
      1.0 - np.asarray(release["ratio"]), temperature=run.balance.temperature,
      alpha=run.balance.alpha)
  np.testing.assert_allclose(np.asarray(lam), release["lambda"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Item 3: evaluation as released
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER))
def test_free_form_tasks_generate_and_score_as_the_release(name):
  """Every CIDEr task: up to 2048 new tokens (inference_visatb.py) and CIDEr on raw text
  (eval/caption.py); every other task the eval default, 128."""
  run = build(name)
  entries = run.section("tasks")["tasks"]
  budgets = run.section("eval")["task_max_new_tokens"]
  assert run.section("eval")["max_new_tokens"] == 128
  for task, metric in run.tasks.metrics.items():
    if metric == "cider":
      assert budgets[task] == 2048, task
      assert entries[task]["metric_options"] == {"tokenization": "raw"}, task
    else:
      assert task not in budgets, task
  assert any(m == "cider" for m in run.tasks.metrics.values())


def test_demo_keeps_its_own_evaluation():
  demo = load("demo")
  demo_run = config_lib.build(demo)
  assert "task_max_new_tokens" not in demo_run.section("eval")
  assert "metric_options" not in demo_run.section("tasks")["tasks"]["caption"]  # normalised CIDEr


def test_cider_as_released_differs_from_the_normalised_form_on_case_and_punctuation():
  """What the default of the paper configs changes: "A dog." and "a dog" share no token."""
  from visatb_jax.core import metrics  # pylint: disable=g-import-not-at-top
  preds, refs = ["A dog runs.", "a cat sleeps"], [["a dog runs"], ["A cat sleeps."]]
  assert metrics.cider(preds, refs) == pytest.approx(10.0 * 3 / 4)  # 1-, 2-, 3-grams all match
  assert metrics.cider(preds, refs, tokenization="raw") < metrics.cider(preds, refs) / 2


# The paper's zero-shot suite (docs/method.md §12), transcribed: the release's
# scripts_visatb/eval/*.sh run LLaVA-1.5's evaluation on LLaVA-1.5's question files, whose prompts
# end with the short-answer instruction (TextVQA, POPE, MME) or the multiple-choice one (SEED;
# ScienceQA and MMBench through --single-pred-prompt); MM-Vet's questions are asked as they are.
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
ZERO_SHOT = {
    "TextVQA": ("vqa_accuracy", SHORT), "POPE": ("pope", SHORT), "MME": ("mme", SHORT),
    "SQA-IMG": ("multiple_choice", LETTER), "MMBench": ("mmbench_circular", LETTER),
    "SEED-IMG": ("multiple_choice", LETTER), "MM-Vet": ("cider", ""),
}
ZERO_SHOT_CONFIGS = ("academic", "academic13b")


def _with_root(name: str, root: str):
  config = load(name)
  config.data.root = "/nonexistent/data"
  for field in PART_FIELDS:
    config.model[field] = ""
  config.data.tokenizer = ""
  config.zero_shot_root = root
  return config


@pytest.mark.parametrize("name", ZERO_SHOT_CONFIGS)
def test_the_zero_shot_suite_is_declared_with_its_metrics_and_prompts(name):
  run = config_lib.build(_with_root(name, "/data/zero_shot"))
  assert list(run.zero_shot) == list(ZERO_SHOT)  # the paper's order, the report's columns
  section = run.section("zero_shot")
  for task, (metric, prompt) in ZERO_SHOT.items():
    entry = run.zero_shot[task]
    assert (entry.metric, entry.prompt_suffix) == (metric, prompt), task
    assert entry.higher_is_better, task
    # Under the root, wherever data.root is.
    assert entry.files == {"test": f"/data/zero_shot/{task}_test.json"}, task
    # A letter or a short answer: LLaVA-1.5's 128 tokens; MM-Vet's free text: the release's 2048.
    assert section[task]["max_new_tokens"] == (2048 if task == "MM-Vet" else 128), task
  assert "zero_shot_skipped" not in run.sections


@pytest.mark.parametrize("name", ZERO_SHOT_CONFIGS)
def test_an_empty_zero_shot_root_skips_the_suite_saying_so_once(name):
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    runs = [config_lib.build(_with_root(name, "")) for _ in range(2)]
  said = [w for w in caught if issubclass(w.category, config_lib.ZeroShotSkippedWarning)]
  assert len(said) == 1, [str(w.message) for w in caught]
  assert str(said[0].message).startswith("config.zero_shot_root is empty, so the zero-shot "
                                         "suite (TextVQA, POPE, MME, SQA-IMG, MMBench, SEED-IMG, "
                                         "MM-Vet) is skipped")
  for run in runs:
    assert run.zero_shot == {} and run.section("zero_shot") == {}
    # config.json keeps the reason for the report; no stage hashes it.
    assert run.sections["zero_shot_skipped"] == str(said[0].message)
  # The default of the shipped configs: the root empty.
  assert load(name).zero_shot_root == ""


def test_a_given_root_keeps_absolute_files_and_a_config_without_the_field_is_unchanged():
  config = _with_root("academic", "~/zs")
  config.zero_shot.POPE.files = {"test": "/elsewhere/pope.json"}
  run = config_lib.build(config)
  assert run.zero_shot["POPE"].files == {"test": "/elsewhere/pope.json"}
  assert run.zero_shot["MME"].files == {"test": os.path.expanduser("~/zs/MME_test.json")}
  # Without zero_shot_root (user configs, the demo), files stay relative to data.root.
  demo = load("demo")
  assert "zero_shot_root" not in demo
  demo.zero_shot = {"vqa": {"metric": "exact_match"}}
  assert config_lib.build(demo).zero_shot["vqa"].files == {}  # read from the generated split


def test_a_mistake_in_the_suite_shows_even_while_it_is_skipped():
  config = _with_root("academic", "")
  config.zero_shot.POPE.metric = "f1"
  with pytest.raises(config_lib.ConfigError, match="config.zero_shot.POPE.metric='f1'"):
    config_lib.build(config)


# ---------------------------------------------------------------------------------------------
# Item 6: the smaller mismatches
# ---------------------------------------------------------------------------------------------


def test_ocrvqa_has_the_short_answer_instruction():
  for name in ("academic", "academic13b", "qwen2vl"):
    tasks = build(name).section("tasks")["tasks"]
    assert tasks["OCRVQA"]["prompt_suffix"] == (
        "Answer the question using a single word or phrase."), name
    assert tasks["OCRVQA"]["prompt_suffix"] == tasks["VQAv2"]["prompt_suffix"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dwa_is_the_releases_window_25_dynamic_after_25_steps(name):
  assert build(name).method_options["dwa"] == {"window": 25, "start": 25}


def test_demo_keeps_its_own_dwa_window():
  assert load("demo").weighting_options["dwa"].to_dict() == {"window": 10}


def test_release_dwa_hand_computed():
  """Two tasks: task 0's loss is always 1; task 1's is 2 at step 0, then 1. With window 25 and
  start 25, λ stays 1 through step 25 and is dynamic from step 26 (weight_method.py computes it
  once more than 25 steps ran): the last 25 losses of task 1 average 1, the one before them 2,
  so its ratio is 1/2, and λ = 2·softmax([1/2, 1/4]) at temperature 2."""
  import jax  # pylint: disable=g-import-not-at-top
  from visatb_jax.core import weighting  # pylint: disable=g-import-not-at-top
  options = build("academic").method_options["dwa"]
  strategy = weighting.get_strategy("dwa", **options)
  state = strategy.init(2)
  rng = jax.random.PRNGKey(0)
  lams = []
  for step in range(27):
    loss = np.array([1.0, 2.0 if step == 0 else 1.0], np.float32)
    lam, state = strategy.update(state, loss, step, rng, per_task_count=np.array([5, 5]))
    lams.append(np.asarray(lam))  # the λ of step + 1
  for step in range(25):  # λ of steps 1..25
    np.testing.assert_array_equal(lams[step], [1.0, 1.0])
  expected = 2 * np.exp([0.5, 0.25]) / np.exp([0.5, 0.25]).sum()
  np.testing.assert_allclose(lams[25], expected, rtol=1e-6)  # λ of step 26
  # The library's default start (2·window − 1) would still give 1 here.
  default = weighting.get_strategy("dwa", window=25)
  state = default.init(2)
  for step in range(26):
    loss = np.array([1.0, 2.0 if step == 0 else 1.0], np.float32)
    lam, state = default.update(state, loss, step, rng, per_task_count=np.array([5, 5]))
  np.testing.assert_array_equal(np.asarray(lam), [1.0, 1.0])
