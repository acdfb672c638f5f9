"""Tests of LLaVA JSON / JSONL loading: validation, skip counts, task inference, image paths."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import shapes
from visatb_jax.data.sources import load_samples, load_split, task_from_filename


def _conv(*values, roles=("human", "gpt")):
  return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


def _write_json(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1))
  return path


def _write_png(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def test_valid_json_resolves_images_relative_to_the_file(tmp_path):
  _write_png(tmp_path / "data/img/a.png")
  path = _write_json(tmp_path / "data/train.json", [
      {"id": "s1", "task": "vqa", "image": "img/a.png", "conversations": _conv("<image>\nQ?", "A")},
      {"id": "s2", "task": "chat", "conversations": _conv("hi", "hello", "more", "sure")},
  ])
  loaded = load_samples(path)
  assert len(loaded) == 2 and loaded.skipped == {} and loaded.path == str(path)
  first, second = loaded.samples
  assert first["image_path"] == str(tmp_path / "data/img/a.png")
  assert os.path.isabs(first["image_path"]) and first["image_paths"] == [first["image_path"]]
  assert first["task"] == "vqa" and first["conversations"] == _conv("<image>\nQ?", "A")
  assert second["image_path"] is None and second["image_paths"] == []


def test_image_root_argument(tmp_path):
  _write_png(tmp_path / "pics/a.png")
  path = _write_json(tmp_path / "json/x_train.json",
                     [{"image": "a.png", "conversations": _conv("<image>\nQ", "A")}])
  loaded = load_samples(path, image_root=tmp_path / "pics")
  assert loaded.samples[0]["image_path"] == str(tmp_path / "pics/a.png")
  assert loaded.samples[0]["task"] == "x" and loaded.samples[0]["id"] == "x_train-1"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = tmp_path / "caption_train.jsonl"
  good = json.dumps({"conversations": _conv("q", "a")})
  path.write_text(good + "\n\n" + good + "\n{not json\n")
  with pytest.raises(ValueError, match=r"caption_train\.jsonl: line 4: malformed JSON"):
    load_samples(path)


def test_malformed_json_names_file_and_line(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n')
  with pytest.raises(ValueError, match=r"broken\.json: line 3: malformed JSON"):
    load_samples(path, task="t")


def test_json_shapes_other_than_a_list(tmp_path):
  path = tmp_path / "d.json"
  for text in ("[]", " \n"):
    path.write_text(text)
    assert len(load_samples(path, task="t")) == 0
  path.write_text('{\n  "conversations": []\n}\n')
  with pytest.raises(ValueError, match=r"d\.json: expected a JSON list of samples, got dict"):
    load_samples(path, task="t")
  # JSON lines under a .json name are read as JSONL; errors name the line.
  path.write_text(json.dumps({"conversations": _conv("q", "a")}) + "\n" + '{"b": \n')
  with pytest.raises(ValueError, match=r"d\.json: line 2: malformed JSON"):
    load_samples(path, task="t")
  path.write_text(json.dumps({"conversations": _conv("q", "a")}) + "\n" + "{}\n")
  loaded = load_samples(path, task="t")
  assert len(loaded) == 1 and loaded.skipped == {"no_conversations": 1}
  assert loaded.samples[0]["id"] == "d-1"
  path = tmp_path / "val.json"  # No task in the file name.
  path.write_text(json.dumps({"task": "t", "conversations": _conv("q", "a")}) + "\n\n{\"id\": 5}\n")
  with pytest.raises(ValueError, match=r"val\.json: line 3 \(id 5\).*no 'task'"):
    load_samples(path)


def test_invalid_conversations_are_skipped_and_counted(tmp_path):
  path = _write_json(tmp_path / "vqa_train.json", [
      {"conversations": _conv("q", "a")},  # Valid.
      {"conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "a"}]},
      {"conversations": _conv("q")},  # No assistant turn.
      {"conversations": _conv("q", "a", roles=("gpt", "human"))},  # Starts with the assistant.
      {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
      {"conversations": []},
      {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
      {"conversations": _conv("<image>\nq", "a")},  # Placeholder without an image.
      "not a dict",
      {"conversations": _conv("hello", "hi", roles=("user", "assistant"))},  # Valid, renamed.
  ])
  loaded = load_samples(path)
  assert loaded.skipped == {"unknown_role": 1, "no_assistant_turn": 1, "not_alternating": 2,
                            "no_conversations": 1, "bad_turn": 1, "image_token_mismatch": 1,
                            "not_an_object": 1}
  assert loaded.num_skipped == 8
  assert [s["conversations"] for s in loaded.samples] == [_conv("q", "a"), _conv("hello", "hi")]
  assert all(s["task"] == "vqa" for s in loaded.samples)


def test_task_from_field_argument_or_file_name(tmp_path):
  assert task_from_filename("/x/caption_train.json") == "caption"
  assert task_from_filename("caption-mini_train.json") == "caption"
  assert task_from_filename("ok_vqa-large_val.jsonl") == "ok_vqa"
  assert task_from_filename("grounding.jsonl") == "grounding"
  assert task_from_filename("train.json") is None
  path = _write_json(tmp_path / "count-mini_train.json", [
      {"conversations": _conv("q", "a")}, {"task": "own", "conversations": _conv("q", "a")}])
  assert [s["task"] for s in load_samples(path).samples] == ["count", "own"]
  assert [s["task"] for s in load_samples(path, task="given").samples] == ["given", "own"]
  anonymous = _write_json(tmp_path / "train.json", [{"id": "z", "conversations": _conv("q", "a")}])
  with pytest.raises(ValueError, match=r"train\.json: sample 1 \(id 'z'\).*no 'task'"):
    load_samples(anonymous)


def test_missing_image_is_named_or_skipped(tmp_path):
  path = _write_json(tmp_path / "t_train.json", [
      {"id": "m", "image": "nowhere/gone.png", "conversations": _conv("<image>\nq", "a")}])
  with pytest.raises(ValueError, match=r"t_train\.json: sample 1 \(id 'm'\).*nowhere/gone\.png"):
    load_samples(path)
  loaded = load_samples(path, on_missing_image="skip")
  assert len(loaded) == 0 and loaded.skipped == {"missing_image": 1}


def test_image_placeholder_is_added_when_absent(tmp_path):
  _write_png(tmp_path / "a.png")
  _write_png(tmp_path / "b.png")
  path = _write_json(tmp_path / "t_train.json", [
      {"image": "a.png", "conversations": _conv("What is this?", "a")},
      {"image": ["a.png", "b.png"], "conversations": _conv("<image> vs <image>", "same")},
      {"image": ["a.png", "b.png"], "conversations": _conv("<image> only one", "x")},
  ])
  loaded = load_samples(path)
  assert loaded.samples[0]["conversations"][0]["value"] == "<image>\nWhat is this?"
  assert loaded.samples[1]["image_paths"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  assert loaded.skipped == {"image_token_mismatch": 1}


def test_reads_the_shapes_benchmark(tmp_path):
  bench = shapes.generate_benchmark(tmp_path, seed=0, sizes={"val": 2})
  loaded = load_split(bench["root"], "val")
  assert loaded.skipped == {} and len(loaded) == 2 * len(shapes.TASKS)
  assert sorted({s["task"] for s in loaded.samples}) == sorted(shapes.TASKS)
  for sample in loaded.samples:
    assert (sample["image_path"] is None) == (sample["task"] == "chat")
    if sample["image_path"]:
      assert os.path.isfile(sample["image_path"])
