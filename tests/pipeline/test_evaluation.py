"""Tests of generation-based evaluation: sample ids, per-sample scores and their means."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from visatb_jax.core import metrics
from visatb_jax.data import template
from visatb_jax.data import tokenizer as tk
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration
from visatb_jax.pipeline import evaluation

IMAGE_SIZE = 16
TASK_METRICS = {"vqa": "exact_match", "caption": "cider", "box": "iou_accuracy",
                "cls": "accuracy"}
ANSWERS = {"vqa": ["red", "blue", "green", "red", "two"],
           "caption": ["a red circle", "a blue square", "two green triangles", "a red square"],
           "box": ["[0.1, 0.1, 0.5, 0.5]", "[0, 0, 1, 1]", "[0.2, 0.3, 0.4, 0.9]"],
           "cls": ["cat", "dog", "cat", "dog", "cat", "fish"]}
CORPUS = [template.SYSTEM_PROMPT, " USER: <image>\nWhat is it? ASSISTANT:"] + [
    a for answers in ANSWERS.values() for a in answers]
BATCH, NEW_TOKENS = 4, 4


def _samples(image_path: str) -> list[dict]:
  """Samples of every task, interleaved as a split file would be; one vqa sample has no id."""
  out = []
  for task, answers in ANSWERS.items():
    for i, answer in enumerate(answers):
      sample = {"id": f"{task}/q{i}", "task": task,
                "conversations": [{"from": "human", "value": f"<image>\nWhat is it? {i}"},
                                  {"from": "gpt", "value": answer}],
                "image_path": image_path if i % 2 == 0 else None}
      out.append(sample)
  del out[3]["id"]  # vqa/q3, which the interleaving below puts in the vqa eval set's row 4
  return out[::2] + out[1::2]


@pytest.fixture(scope="module")
def tok():
  return tk.train_tokenizer(CORPUS * 5, vocab_size=300, save_dir=None)


@pytest.fixture(scope="module")
def model(tok):
  config = LlavaConfig(
      vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16,
                          intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
      text=TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
      image_token_id=tk.image_token_id(tok))
  return LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "red.png"
  Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 20, 20)).save(path)
  return _samples(str(path))


def _build(samples, tok, model=None):
  num_image_tokens = 4 if model is None else model.config.num_image_tokens
  return evaluation.build_eval_sets(samples, tokenizer=tok, task_metrics=TASK_METRICS,
                                    num_image_tokens=num_image_tokens, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def eval_sets(samples, tok, model):
  return _build(samples, tok, model)


def _task_ids(samples, task):
  return [s.get("id", "") for s in samples if s["task"] == task]


def test_ids_follow_the_samples_in_order(samples, eval_sets):
  for task, es in eval_sets.items():
    expected = [sid or f"{task}-{row}" for row, sid in enumerate(_task_ids(samples, task))]
    assert es.ids == expected
    assert len(es.ids) == len(es) == len(ANSWERS[task])
  # Hand-written: the sample without an id is named by its row in the task's eval set.
  assert eval_sets["vqa"].ids == ["vqa/q0", "vqa/q2", "vqa/q4", "vqa/q1", "vqa-4"]


def test_duplicate_ids_within_a_task_are_rejected(samples, tok):
  dup = [dict(s) for s in samples]
  caption = [s for s in dup if s["task"] == "caption"]
  caption[2]["id"] = caption[0]["id"]
  with pytest.raises(ValueError, match=f"task 'caption'.*'{caption[0]['id']}'"):
    _build(dup, tok)
  # An explicit id that equals another sample's fallback id is a duplicate too.
  dup = [dict(s) for s in samples]
  next(s for s in dup if s.get("id") == "vqa/q0")["id"] = "vqa-4"
  with pytest.raises(ValueError, match=r"task 'vqa'.*'vqa-4'"):
    _build(dup, tok)


def test_the_same_id_in_two_tasks_is_allowed(samples, tok):
  rows = {"vqa": 0, "box": 0}
  renamed = []
  for s in samples:
    if s["task"] in rows:
      s = dict(s, id=f"x{rows[s['task']]}")
      rows[s["task"]] += 1
    renamed.append(s)
  sets = _build(renamed, tok)
  assert sets["box"].ids == ["x0", "x1", "x2"]
  assert sets["vqa"].ids == ["x0", "x1", "x2", "x3", "x4"]


def test_eval_set_checks_its_ids(eval_sets):
  es = eval_sets["box"]
  default = dataclasses.replace(es, ids=[])
  assert default.ids == ["box-0", "box-1", "box-2"]
  with pytest.raises(ValueError, match=r"task 'box'.*'a'.*more than once"):
    dataclasses.replace(es, ids=["a", "b", "a"])
  with pytest.raises(ValueError, match=r"task 'box': 2 ids for 3 references"):
    dataclasses.replace(es, ids=["a", "b"])


def test_score_predictions_by_id(eval_sets):
  es = eval_sets["vqa"]
  preds = ["Red.", "nope", "green", "nope", "two"]  # rows of es, whose refs are reordered below
  es = dataclasses.replace(es, references=["red", "blue", "green", "red", "two"])
  per = evaluation.score_predictions(es, preds)
  assert list(per) == es.ids
  assert list(per.values()) == [1.0, 0.0, 1.0, 0.0, 1.0]
  assert metrics.mean_score(list(per.values())) == metrics.score("exact_match", preds,
                                                                 es.references) == 0.6


@pytest.fixture(scope="module")
def half_right(eval_sets, tok, model):
  """The eval sets with every even row's reference replaced by the model's own answer.

  A random model answers nothing right; this makes every task's score non-trivial.
  """
  out = {}
  for task, es in eval_sets.items():
    preds = evaluation.generate_answers(model, es, tokenizer=tok, batch_size=BATCH,
                                        max_new_tokens=NEW_TOKENS)
    refs = [p if row % 2 == 0 else r for row, (p, r) in enumerate(zip(preds, es.references))]
    if es.metric == "iou_accuracy":  # a random model's answers are no boxes; keep valid refs
      refs = es.references
    out[task] = dataclasses.replace(es, references=refs)
  return out


@pytest.fixture(scope="module")
def result(half_right, tok, model):
  return evaluation.evaluate_samples(model, half_right, tokenizer=tok, batch_size=BATCH,
                                     max_new_tokens=NEW_TOKENS)


def test_per_sample_means_are_the_scores_exactly(half_right, result):
  assert isinstance(result, evaluation.EvalResult)
  assert list(result.scores) == list(result.samples) == list(result.predictions) == list(
      TASK_METRICS)
  for task, es in half_right.items():
    per = result.samples[task]
    assert list(per) == es.ids  # keyed by id, in eval-set order
    values = list(per.values())
    assert all(isinstance(v, float) for v in values)
    assert float(np.mean(values)) == result.scores[task]
    assert metrics.mean_score(values) == result.scores[task]
    refs = [[r] for r in es.references] if es.metric == "cider" else es.references
    assert metrics.score(es.metric, result.predictions[task], refs) == result.scores[task]
    np.testing.assert_array_equal(
        values, metrics.sample_scores(es.metric, result.predictions[task], refs))
  # Not vacuous: the even rows match their (model-made) references.
  assert 0.0 < result.scores["vqa"] < 1.0
  assert result.samples["vqa"][half_right["vqa"].ids[0]] == 1.0
  assert result.scores["cls"] == 0.5
  assert result.scores["caption"] > 0.0


def test_evaluate_is_evaluate_samples_without_the_samples(half_right, result, tok, model):
  scores, predictions = evaluation.evaluate(model, half_right, tokenizer=tok, batch_size=BATCH,
                                            max_new_tokens=NEW_TOKENS, tasks=["cls", "vqa"])
  assert list(scores) == ["cls", "vqa"]
  assert scores == {t: result.scores[t] for t in ("cls", "vqa")}
  assert predictions == {t: result.predictions[t] for t in ("cls", "vqa")}
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.scores = {}  # type: ignore[misc]
