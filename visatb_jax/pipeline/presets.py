"""What the paper's configs share (docs/method.md section 10): the LLaVA-1.5 recipe on user data.

`configs/academic.py`, `academic13b.py`, `m3it.py`, `chat.py` and `qwen2vl.py` call `paper_config`
and add their task registry. The LLaVA configs start where the paper and its release start: the
CLIP ViT-L/14-336 tower, Vicuna-v1.5 and the stage-1 projector (`--pretrain_mm_mlp_adapter`), at
the local paths of `PARTS` (download them there, or override the fields); not from
llava-1.5-7b-hf, which was already instruction-tuned on the Academic tasks' sources. The model
sizes below are those of the parts, used by `--dry-run` when the parts are not on the machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

# LLaVA-1.5-7B: CLIP ViT-L/14-336 (feature layer -2) + 2-layer GELU MLP + Vicuna-7B-v1.5.
LLAVA15_7B_VISION = {"image_size": 336, "patch_size": 14, "hidden_size": 1024,
                     "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16}
VICUNA_7B_TEXT = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
# Vicuna-13B-v1.5 (lmsys/vicuna-13b-v1.5 config.json), its vocabulary grown as the 7B's.
VICUNA_13B_TEXT = {"vocab_size": 32064, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
# <image> in the llava-hf tokenizer (32000 Llama tokens + <image> + <pad>, padded to 32064).
LLAVA15_IMAGE_TOKEN_ID = 32000

# The paper's starting point per language model, as local paths to fill (README, "Starting from
# the official parts"): openai/clip-vit-large-patch14-336, lmsys/vicuna-{7b,13b}-v1.5, LLaVA-1.5's
# stage-1 projector liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-{7b,13b}-v1.5, and Vicuna's
# tokenizer with <image> added (README). The release's finetune_academic.sh and
# finetune_academic_vicuna13b.sh start from exactly these (--model_name_or_path,
# --vision_tower, --pretrain_mm_mlp_adapter).
PARTS = {
    size: {"vision_path": "/models/clip-vit-large-patch14-336",
           "text_path": f"/models/vicuna-{size}-v1.5",
           "projector_path": (f"/models/llava-v1.5-mlp2x-336px-pretrain-vicuna-{size}-v1.5/"
                              "mm_projector.bin"),
           "tokenizer": f"/models/vicuna-{size}-v1.5-image"}
    for size in ("7b", "13b")
}
TEXT_SIZES = {"7b": VICUNA_7B_TEXT, "13b": VICUNA_13B_TEXT}


def temperature(value: float | str) -> config_dict.FieldReference:
  """`balance.temperature`: a number or "auto", typed so that either can replace the other from
  the command line (`--config.balance.temperature=auto`)."""
  return config_dict.FieldReference(value, field_type=object)


# paper_config's `temperature` argument shadows the helper's name inside it.
_temperature_field = temperature


def task(metric: str | None, *, group: str | None = None, fixed_weight: float | None = None,
         higher_is_better: bool = True, prompt_suffix: str = "",
         files: Mapping[str, str] | None = None,
         metric_options: Mapping[str, Any] | None = None,
         max_new_tokens: int | None = None) -> dict[str, Any]:
  """One entry of a config's task registry.

  Args:
    metric: scorer of visatb_jax.metrics ("cider", "exact_match", "accuracy", "iou_accuracy");
      None for a task that is trained but never scored (it must have a fixed weight).
    group: balancing group (docs/method.md section 6); all balanced tasks or none have one.
    fixed_weight: λ kept out of the balancing (ShareGPT = 1.0 in the paper).
    higher_is_better: direction of the metric.
    prompt_suffix: an instruction appended (after a newline) to every human turn that does not
      already end with it, in training and evaluation alike (LLaVA-1.5's short-answer prompt).
    files: per-split file patterns overriding `data.files` for this task.
    metric_options: keyword options of the scorer (`metrics.metric_options`), e.g.
      {"tokenization": "raw"} for CIDEr as the release computes it.
    max_new_tokens: the task's own generation budget (None: `eval.max_new_tokens`).
  """
  entry = {"metric": metric, "group": group, "fixed_weight": fixed_weight,
           "higher_is_better": higher_is_better, "prompt_suffix": prompt_suffix}
  if files:
    entry["files"] = dict(files)
  if metric_options:
    entry["metric_options"] = dict(metric_options)
  if max_new_tokens is not None:
    entry["max_new_tokens"] = int(max_new_tokens)
  return entry


# LLaVA-1.5's short-answer instruction. Table 9 of the paper lists each Academic task's
# instruction; its text is not in this repository, so OCRVQA takes LLaVA-1.5's (its mixture's
# OCR-VQA questions end with it already, and a suffix is never added twice).
_SHORT_ANSWER = "Answer the question using a single word or phrase."

# Generation budgets of the paper configs (docs/method.md §10). The release answers every
# validation and test sample with inference_visatb.py's default max_new_tokens=2048, greedy.
# A free-form answer (a caption, a chat turn: every CIDEr task) keeps that budget, since its
# score reads the whole text. A short answer (exact match, a box) gets 128, LLaVA-1.5's budget for
# short-answer benchmarks (model_vqa_loader.py): greedy decoding stops at the end of the answer
# either way, an exact match against a reference shorter than 128 tokens is the same whether a
# runaway answer is cut at 128 or 2048, and `iou_accuracy` reads the first box; the cache of a
# batch is 16x smaller.
LONG_ANSWER_TOKENS = 2048
SHORT_ANSWER_TOKENS = 128
# CIDEr as the release computes it: pycocoevalcap's Cider on the raw text (metrics.cider).
RELEASE_CIDER = {"tokenization": "raw"}


def free_form_task(*, group: str | None = None) -> dict[str, Any]:
  """A CIDEr-scored task of a paper config: the release's CIDEr and generation budget."""
  return task("cider", group=group, metric_options=RELEASE_CIDER,
              max_new_tokens=LONG_ANSWER_TOKENS)


# DWA as the release's weight_method.py runs it: loss means over windows of 25 steps, λ dynamic
# after 25 steps (docs/method.md §10); the library's default window is 50.
RELEASE_DWA = {"window": 25, "start": 25}

# The baselines every table of the paper compares VisATB with (docs/method.md §9): EW, TLA, STL,
# RLW, DWA and IGBv1. STL is the reference of ΔI% and ΔE% (§8).
PAPER_BASELINES = ("ew", "tla", "stl", "rlw", "dwa", "igb")


def academic_tasks() -> dict[str, dict[str, Any]]:
  """The Academic benchmark's 8 tasks, in the task order of the paper's release.

  Metrics as in the release's eval/ scripts: captions scored with CIDEr (as the release computes
  it, on the raw text), short answers with exact match, RefCOCO boxes with IoU > 0.5. ShareGPT
  (text-only conversations) keeps λ = 1.0 and is not scored.
  """
  return {
      "ShareGPT4V": free_form_task(),
      "RefCOCO-caption": free_form_task(),
      "VQAv2": task("exact_match", prompt_suffix=_SHORT_ANSWER),
      "GQA": task("exact_match", prompt_suffix=_SHORT_ANSWER),
      "ChartQA": task("exact_match", prompt_suffix=_SHORT_ANSWER),
      "OCRVQA": task("exact_match", prompt_suffix=_SHORT_ANSWER),
      "RefCOCO-bbox": task("iou_accuracy"),
      "ShareGPT": task(None, fixed_weight=1.0),
  }


# The zero-shot suite (docs/method.md §12): the paper's zero-shot benchmarks, with the prompts of
# its Table 10. The release scores them with LLaVA-1.5's evaluation code on LLaVA-1.5's question
# files (its scripts_visatb/eval/{textvqa,pope,mme,sqa,mmbench,seed,mmvet}.sh), so the prompts
# are LLaVA-1.5's: the short-answer one for TextVQA, POPE and MME (their question files end with
# it), and the multiple-choice one for ScienceQA-IMG and MMBench (`--single-pred-prompt`) and
# SEED (its question file). Table 10's own text is not in this repository.
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_PROMPT = _SHORT_ANSWER
# Each benchmark's test file, relative to config.zero_shot_root.
ZERO_SHOT_FILE = "{task}_test.json"


def _zero_shot_task(name: str, metric: str, prompt: str = "",
                    max_new_tokens: int = SHORT_ANSWER_TOKENS,
                    metric_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  return task(metric, prompt_suffix=prompt, files={"test": ZERO_SHOT_FILE.format(task=name)},
              max_new_tokens=max_new_tokens, metric_options=metric_options)


def zero_shot_suite() -> dict[str, dict[str, Any]]:
  """The paper's zero-shot benchmarks, for `config.zero_shot` (files under `zero_shot_root`).

  Scorers as LLaVA-1.5's evaluation, which the release runs: TextVQA's soft accuracy, POPE's and
  MME's yes/no reading (their per-split F1 and perception / cognition totals in
  scores/test_reports.json), the option letter for ScienceQA-IMG and SEED-Image, and MMBench's
  circular evaluation. A letter or a short answer gets 128 new tokens, as LLaVA-1.5's
  `model_vqa_loader.py` gives short answers. MM-Vet is judged by GPT-4 in the paper; here
  **(choice)** by CIDEr-D on its reference answers (docs/method.md §8: no GPT judge), with
  2048 new tokens, and no prompt suffix (LLaVA-1.5 asks its questions as they are).
  """
  return {
      "TextVQA": _zero_shot_task("TextVQA", "vqa_accuracy", SHORT_ANSWER_PROMPT),
      "POPE": _zero_shot_task("POPE", "pope", SHORT_ANSWER_PROMPT),
      "MME": _zero_shot_task("MME", "mme", SHORT_ANSWER_PROMPT),
      "SQA-IMG": _zero_shot_task("SQA-IMG", "multiple_choice", MULTIPLE_CHOICE_PROMPT),
      "MMBench": _zero_shot_task("MMBench", "mmbench_circular", MULTIPLE_CHOICE_PROMPT),
      "SEED-IMG": _zero_shot_task("SEED-IMG", "multiple_choice", MULTIPLE_CHOICE_PROMPT),
      "MM-Vet": _zero_shot_task("MM-Vet", "cider", max_new_tokens=LONG_ANSWER_TOKENS),
  }


def with_zero_shot_suite(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with the paper's zero-shot suite declared and `zero_shot_root` empty: until the root is
  set (--config.zero_shot_root=/data/visatb/zero_shot) the suite is skipped, with one warning."""
  # In the paper's order (a ConfigDict sorts its keys by default), which the report's columns keep.
  c.zero_shot = ml_collections.ConfigDict(zero_shot_suite(), sort_keys=False)
  c.zero_shot_root = ""
  return c


def paper_config(name: str, tasks: Mapping[str, Mapping[str, Any]], *, r_large: float,
                 r_mini: float, form: str = "real", temperature: float | str = 0.5,
                 epochs: float = 1.0, baselines: Sequence[str] = PAPER_BASELINES,
                 size: str | None = "7b") -> ml_collections.ConfigDict:
  """The full config of a paper benchmark: LLaVA-1.5, batch 128, lr 2e-5 cosine.

  Per benchmark (docs/method.md §10): the rates `r_large` and `r_mini`, the balancing `form`, the
  softmax `temperature` T (0.5 for Academic and Chat, 1.0 for M3IT and Qwen2-VL-2B) and the
  training `epochs` (1, except Chat's 3 in the release's script). `size` ("7b" or "13b") picks
  Vicuna and the parts of `PARTS` the model starts from; None leaves the start empty (a config
  that sets its own, as configs/qwen2vl.py).
  """
  if size is not None and size not in PARTS:
    raise ValueError(f"size={size!r}; choose one of {sorted(PARTS)}")
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.tasks = ml_collections.ConfigDict({t: dict(v) for t, v in tasks.items()})
  c.task_order = tuple(tasks)

  c.data = ml_collections.ConfigDict()
  c.data.source = "llava_json"
  c.data.root = ""             # the directory of the task files: required
  # The paper's release names its files {task}_{split}-{size}.json: set data.files (or a task's
  # own `files`) to those names, e.g. "{task}_train-120k.json".
  c.data.files = {"train": "{task}_train.json", "val": "{task}_val.json",
                  "test": "{task}_test.json"}
  c.data.image_root = ""       # default: each JSON file's directory
  c.data.on_missing_image = "error"  # or "skip" (counted in the report)
  # Vicuna's tokenizer with <image> (the language model part has none); "" with model.path: the
  # checkpoint's own.
  c.data.tokenizer = PARTS[size]["tokenizer"] if size else ""
  c.data.template = "vicuna_v1"
  c.data.system_prompt = None  # None: LLaVA-1.5's
  c.data.max_len = 2048
  c.data.seq_len = 2048
  # A 2048-token row holds at most 3 images of 576 tokens; empty slots would still cost the tower.
  c.data.max_images = 3

  c.model = ml_collections.ConfigDict()
  # The paper's start, from its three parts (each checked before any stage): a CLIP vision
  # directory, a Llama/Vicuna directory and the stage-1 projector (mm_projector.bin or
  # .safetensors). A single HF LLaVA checkpoint in model.path instead takes the three cleared
  # (--config.model.vision_path= ...); an instruction-tuned one is warned about, since it changes
  # what the comparison measures.
  parts = PARTS.get(size or "", {})
  c.model.path = ""
  c.model.vision_path = parts.get("vision_path", "")
  c.model.text_path = parts.get("text_path", "")
  c.model.projector_path = parts.get("projector_path", "")
  c.model.vision = dict(LLAVA15_7B_VISION)
  c.model.text = dict(TEXT_SIZES[size or "7b"])
  c.model.image_token_id = LLAVA15_IMAGE_TOKEN_ID
  c.model.init_seed = 0
  c.model.dtype = "bfloat16"   # compute; parameters and optimizer state stay float32
  c.model.param_dtype = "float32"
  # Save the layers' matmul outputs, recompute the rest: fewer recomputed FLOPs than full remat,
  # and the 7B step still fits an 80 GB device; on smaller ones, --config.model.remat=full (the
  # paper's DeepSpeed runs checkpoint every layer). Figures: BENCHMARKS.md, "Dry run".
  c.model.remat = "dots_with_no_batch_dims_saveable"
  c.model.lora = {"rank": 0, "alpha": 16.0, "dropout": 0.0,
                  "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj")}

  # FSDP over every device (ZeRO-3 in the paper's runs).
  c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}

  c.train = ml_collections.ConfigDict()
  c.train.epochs = float(epochs)
  # Samples per optimizer step (global), the paper's 128. They pack into ~50 rows of 2048 tokens
  # (~2.6 samples a row), padded to a multiple of devices x micro-batches (docs/architecture.md,
  # "Batch size in samples").
  c.train.batch_size = 128
  # 4 micro-batches: at most 4 rows per device on 8 devices (memory: BENCHMARKS.md, "Dry run",
  # sized at 128 rows, one a sample); the loss is still normalised once over the whole step.
  c.train.accum_steps = 4
  c.train.lr = 2e-5
  c.train.warmup_frac = 0.03
  c.train.clip_norm = 1.0
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 500
  c.train.log_every = 10
  c.train.freeze_vision_tower = True
  c.train.ce_chunk_size = 2048  # tokens per cross-entropy block and device; 0 = full logits

  c.prep = ml_collections.ConfigDict()
  c.prep.r_large = r_large
  c.prep.r_mini = r_mini
  # 1: the preparation runs one after another on the whole mesh; K > 1: K at a time, each on
  # 1/K of the devices (one host's devices: a single-process run).
  c.prep.parallel = 1
  # Each preparation model trained once, as in the paper; R > 1 trains it R times with its own
  # subset draw and data order, so that λ's intervals see training variance (§13).
  c.prep.replicates = 1

  c.balance = ml_collections.ConfigDict()
  c.balance.form = form
  c.balance.temperature = _temperature_field(temperature)
  c.balance.alpha = (0.25, 0.25, 0.5)
  c.balance.on_degenerate = "error"
  # The paper's λ exactly; "evidence" (docs/method.md §14, the default of user configs) is one
  # override away, and so are preparation replicates (`--config.prep.replicates=2`, §13).
  c.balance.shrinkage = "none"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32
  # Tasks without their own max_new_tokens (short answers; free-form tasks have 2048, above).
  c.eval.max_new_tokens = SHORT_ANSWER_TOKENS

  c.weighting = "visatb"  # the run's own final model (pipeline/methods.py names them all)
  c.baselines = tuple(baselines)
  c.weighting_options = {"dwa": dict(RELEASE_DWA)}
  return c
