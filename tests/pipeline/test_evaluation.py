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


def test_a_tasks_own_max_new_tokens_overrides_the_default(half_right, result, tok, model,
                                                            monkeypatch):
  """Each task decodes up to its own budget (`task_max_new_tokens`), the others up to
  `max_new_tokens`."""
  budgets = {}
  generate = evaluation.generate_answers

  def recording(model, eval_set, **kwargs):
    budgets[eval_set.task] = kwargs["max_new_tokens"]
    return generate(model, eval_set, **kwargs)

  monkeypatch.setattr(evaluation, "generate_answers", recording)
  short = evaluation.evaluate_samples(model, half_right, tokenizer=tok, batch_size=BATCH,
                                      max_new_tokens=NEW_TOKENS, task_max_new_tokens={"vqa": 1})
  assert budgets == {"vqa": 1, "caption": NEW_TOKENS, "box": NEW_TOKENS, "cls": NEW_TOKENS}
  for task in ("caption", "box", "cls"):
    assert short.predictions[task] == result.predictions[task], task
  # The budget reaches the decoder: one token is not the four of the default.
  assert short.predictions["vqa"] != result.predictions["vqa"]


def test_task_budgets_merge_the_trained_and_zero_shot_tasks():
  eval_section = {"batch_size": 8, "max_new_tokens": 128,
                  "task_max_new_tokens": {"caption": 2048}}
  zero_shot = {"POPE": {"metric": "pope", "max_new_tokens": 16}, "MME": {"metric": "mme"}}
  assert evaluation.task_budgets(eval_section, zero_shot) == {"caption": 2048, "POPE": 16}
  assert evaluation.task_budgets(eval_section) == {"caption": 2048}
  assert evaluation.task_budgets({"batch_size": 8, "max_new_tokens": 128}) == {}


# --- references: a sample's "answers", else its last assistant turn ---------------------------


def _qa(task, sample_id, answer, *, answers=None, image_path=None, turns=()):
  """A sample whose last assistant turn is `answer`, after the earlier rounds `turns`."""
  conversations = []
  for q, a in list(turns) + [("<image>\nWhat is it?", answer)]:
    conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  sample = {"id": sample_id, "task": task, "conversations": conversations,
            "image_path": image_path}
  if answers is not None:
    sample["answers"] = answers
  return sample


def test_answers_are_the_references_and_multi_reference_scorers_get_them_all(tok):
  samples = [
      _qa("vqa", "v0", "blue", answers=["red", "red", "blue"]),
      _qa("vqa", "v1", "green", turns=[("<image>\nAnd this?", "red")]),  # no answers: last turn
      _qa("cap", "c0", "a red circle", answers=["a red circle", "one red round shape"]),
      _qa("cap", "c1", "a blue square"),
      _qa("yn", "y0", "no", answers=["yes", "no"]),
  ]
  sets = evaluation.build_eval_sets(
      samples, tokenizer=tok, task_metrics={"vqa": "vqa_accuracy", "cap": "cider", "yn": "pope"},
      num_image_tokens=4, image_size=IMAGE_SIZE)
  assert sets["vqa"].references == [["red", "red", "blue"], "green"]
  assert sets["cap"].references == [["a red circle", "one red round shape"], "a blue square"]

  # VQA soft accuracy over the three human answers: "red" matches 2 of them. With the last turn
  # ("blue") alone it would score 0.
  per = evaluation.score_predictions(sets["vqa"], ["red", "green"])
  assert per == {"v0": pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3), "v1": 1.0}
  # Multi-reference CIDEr-D: the per-sample values of the scorer given every reference.
  preds = ["one red round shape", "a blue square"]
  want = metrics.cider_scores(preds, [["a red circle", "one red round shape"], ["a blue square"]])
  np.testing.assert_array_equal(list(evaluation.score_predictions(sets["cap"], preds).values()),
                                want)
  # POPE scores against one label: the first answer ("yes"), not the disagreeing pair.
  assert evaluation.score_predictions(sets["yn"], ["Yes, there is."]) == {"y0": 1.0}
  assert evaluation.MULTI_REFERENCE_METRICS <= set(metrics.SAMPLE_SCORERS)


def test_a_malformed_answers_field_is_named(tok):
  for bad in ([], "red", ["red", 3]):
    with pytest.raises(ValueError, match=r"task 'vqa', sample 'v0'.*'answers' must be"):
      evaluation.build_eval_sets([_qa("vqa", "v0", "red", answers=bad)], tokenizer=tok,
                                 task_metrics={"vqa": "exact_match"}, num_image_tokens=4,
                                 image_size=IMAGE_SIZE)


def test_llava_json_answers_are_kept_and_bad_ones_skipped(tmp_path):
  import json
  from visatb_jax.data import sources
  conv = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "red"}]
  path = tmp_path / "vqa_test.json"
  path.write_text(json.dumps([
      {"id": "a", "conversations": conv, "answers": ["red", "crimson"]},
      {"id": "b", "conversations": conv},
      {"id": "c", "conversations": conv, "answers": []},
  ]))
  loaded = sources.load_samples(path)
  assert [s["id"] for s in loaded.samples] == ["a", "b"]
  assert loaded.skipped == {"bad_answers": 1}
  assert [sources.scoring_references(s) for s in loaded.samples] == [["red", "crimson"], ["red"]]


def test_metric_options_reach_the_scorer(tok):
  samples = [_qa("box", "b0", "[0.1, 0.1, 0.5, 0.5]")]
  build = lambda options: evaluation.build_eval_sets(  # noqa: E731
      samples, tokenizer=tok, task_metrics={"box": "iou_accuracy"}, num_image_tokens=4,
      image_size=IMAGE_SIZE, task_options=options)
  pred = ["[0.1, 0.1, 0.5, 0.45]"]  # IoU 0.875
  assert evaluation.score_predictions(build(None)["box"], pred) == {"b0": 1.0}
  assert evaluation.score_predictions(build({"box": {"threshold": 0.9}})["box"], pred) == {
      "b0": 0.0}


# --- a sample is answered with all of its images ------------------------------------------------


def _manual_answers(model, tok, samples):
  """Greedy decoding by full forward passes (no cache), every image of a sample in its slot.

  The samples share their prompt length and image count, so that they decode as one batch.
  """
  import jax
  from visatb_jax.data import images as images_lib
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(st, ids, mask, imgs):
    # Left padding (segment 0, never attended to) keeps one shape, hence one compilation.
    positions = jax.numpy.maximum(jax.numpy.cumsum(mask, axis=1) - 1, 0)
    return nnx.merge(graphdef, st)(ids, imgs, positions, mask)[:, -1]

  prompt = np.stack([template.encode_prompt(s["conversations"], tok,
                                            num_image_tokens=model.config.num_image_tokens)[0]
                     for s in samples]).astype(np.int32)
  imgs = np.stack([images_lib.normalize(images_lib.load_images(s["image_paths"], IMAGE_SIZE))
                   for s in samples])
  n, length = len(samples), prompt.shape[1] + NEW_TOKENS
  ids = np.full((n, length), tok.pad_token_id, np.int32)
  mask = np.zeros((n, length), np.int32)
  ids[:, NEW_TOKENS:], mask[:, NEW_TOKENS:] = prompt, 1
  out = []
  for _ in range(NEW_TOKENS):
    token = np.argmax(np.asarray(last_logits(state, ids, mask, imgs)), -1).astype(np.int32)
    out.append(token)
    ids, mask = np.roll(ids, -1, axis=1), np.roll(mask, -1, axis=1)
    ids[:, -1], mask[:, -1] = token, 1
  out = np.stack(out, axis=1)
  answers = []
  for row in out:
    stop = np.flatnonzero(row == tok.eos_token_id)
    row = row[:stop[0]] if stop.size else row
    answers.append(tok.decode(row[row != tok.pad_token_id].tolist(),
                              skip_special_tokens=True).strip())
  return answers


def test_a_two_image_sample_is_answered_with_both_images(tok, model, tmp_path):
  colours = [(200, 20, 20), (20, 20, 200), (20, 200, 20), (240, 240, 240), (10, 10, 10)]
  paths = []
  for k, colour in enumerate(colours):
    paths.append(str(tmp_path / f"{k}.png"))
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour).save(paths[-1])
  question = "<image>\n<image>\nWhat changed?"
  samples = [{"id": f"pair{k}", "task": "pair", "image_paths": [paths[0], p],
              "conversations": [{"from": "human", "value": question},
                                {"from": "gpt", "value": "red"}]} for k, p in enumerate(paths)]
  samples.append({"id": "one", "task": "pair", "image_paths": [paths[1]],
                  "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                    {"from": "gpt", "value": "blue"}]})
  es = evaluation.build_eval_sets(samples, tokenizer=tok, task_metrics={"pair": "exact_match"},
                                  num_image_tokens=model.config.num_image_tokens,
                                  image_size=IMAGE_SIZE)["pair"]
  assert es.images.shape == (len(samples), 2, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert not es.images[-1, 1].any()  # the one-image sample's second slot stays empty
  got = evaluation.generate_answers(model, es, tokenizer=tok, batch_size=BATCH,
                                    max_new_tokens=NEW_TOKENS)
  assert got[:len(paths)] == _manual_answers(model, tok, samples[:len(paths)])
  assert got[-1:] == _manual_answers(model, tok, samples[-1:])
  # Not vacuous: the pairs share their first image, yet their answers differ, so an evaluation
  # that read only the first image would answer them all alike.
  assert len(set(got[:len(paths)])) > 1


def test_native_images_batch_like_training_with_their_own_token_counts(tmp_path):
  """Qwen2-VL's eval batches: each prompt's images keep their size (4 or 6 tokens here), the
  slots hold what `NativeImages.fill` makes, and the positions are get_rope_index's on the
  left-padded prompts, exactly as the model's parity tests feed transformers."""
  from visatb_jax.data import image_format, qwen2vl_image  # pylint: disable=g-import-not-at-top
  from visatb_jax.model.qwen2vl import RowImages  # pylint: disable=g-import-not-at-top
  qwen = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
  tok = tk.train_tokenizer(CORPUS, vocab_size=300, save_dir=None)
  tok.add_tokens(list(qwen), special_tokens=True)
  pad_id = template.image_token_id(tok, "qwen2vl")
  paths = []
  for name, size in (("square", (48, 48)), ("wide", (96, 48))):
    paths.append(str(tmp_path / f"{name}.png"))
    Image.new("RGB", size, (200, 30, 30)).save(paths[-1])
  samples = [_qa("vqa", "one", "red", image_path=paths[0]),
             {**_qa("vqa", "two", "red"), "image_paths": [paths[1], paths[0]],
              "conversations": [{"from": "human", "value": "<image><image>\nWhat?"},
                                {"from": "gpt", "value": "red"}]},
             {**_qa("vqa", "none", "red"),
              "conversations": [{"from": "human", "value": "What?"},
                                {"from": "gpt", "value": "red"}]}]
  fmt = image_format.NativeImages(image_token_id=pad_id, max_pixels=56 * 84)
  sets = evaluation.build_eval_sets(samples, tokenizer=tok, task_metrics={"vqa": "exact_match"},
                                    num_image_tokens=0, image_size=0, template_name="qwen2vl",
                                    image_format=fmt)
  es = sets["vqa"]
  assert [(row == pad_id).sum() for row in es.prompt_ids] == [4, 10, 0]  # 4; 6 + 4; none
  # A placeholder without its image: named, not a bare count mismatch.
  with pytest.raises(ValueError, match="task 'vqa', sample 'lost'.*1 <image> placeholder"):
    evaluation.build_eval_sets([_qa("vqa", "lost", "red")], tokenizer=tok,
                               task_metrics={"vqa": "exact_match"}, num_image_tokens=0,
                               image_size=0, template_name="qwen2vl", image_format=fmt)

  class Reader:  # What evaluation needs of a Qwen2-VL model to lay out its inputs.
    from visatb_jax.model.qwen2vl import Qwen2VLForConditionalGeneration as _Q  # noqa: N814
    batch_inputs = staticmethod(_Q.batch_inputs)

  images, positions = evaluation._batch_inputs(Reader(), es, np.arange(3))
  assert isinstance(images, RowImages)
  grids = [(1, 4, 4), (1, 4, 6), (1, 4, 4)]
  want_pos, _ = qwen2vl_image.get_rope_index(es.prompt_ids, grids, es.prompt_mask,
                                             image_token_id=pad_id)
  np.testing.assert_array_equal(positions * es.prompt_mask[:, None], want_pos)
  np.testing.assert_array_equal(images.grid[1], [(1, 4, 6), (1, 4, 4)])
  np.testing.assert_array_equal(images.grid[2], [(0, 0, 0), (0, 0, 0)])
  pixels, _ = qwen2vl_image.preprocess_images([Image.open(p) for p in paths[::-1]],
                                              max_pixels=56 * 84)
  np.testing.assert_allclose(images.pixel_values[1, 0, :24], pixels[:24], atol=1e-6)
  np.testing.assert_allclose(images.pixel_values[1, 1, :16], pixels[24:], atol=1e-6)
