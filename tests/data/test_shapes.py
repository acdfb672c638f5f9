"""Tests of the procedural shapes benchmark: determinism, sizes, and answers that match pixels."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import shapes

SIZES = {"train": 12, "val": 4, "test": 3}
GRID, CELL = 3, 16


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  return shapes.generate_benchmark(root, seed=7, sizes=SIZES)


def _samples(bench, split):
  with open(bench["splits"][split]) as f:
    return json.load(f)


def _pixels(bench, sample):
  return np.asarray(Image.open(os.path.join(bench["root"], sample["image"])).convert("RGB"))


# --- An independent reading of the image: connected components of non-background pixels. ---


def _components(mask):
  """4-connected components of a boolean mask: list of (ys, xs) arrays."""
  seen = np.zeros_like(mask)
  out = []
  for y0, x0 in zip(*np.nonzero(mask)):
    if seen[y0, x0]:
      continue
    stack, ys, xs = [(y0, x0)], [], []
    seen[y0, x0] = True
    while stack:
      y, x = stack.pop()
      ys.append(y)
      xs.append(x)
      for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        v, u = y + dy, x + dx
        if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
          seen[v, u] = True
          stack.append((v, u))
    out.append((np.array(ys), np.array(xs)))
  return out


def _read_scene(pixels):
  """[(colour, shape, row, col, box)] recovered from pixels alone (shape from the fill ratio)."""
  scene = []
  for color, rgb in shapes.COLORS.items():
    mask = np.all(pixels == np.asarray(rgb, np.uint8), axis=-1)
    for ys, xs in _components(mask):
      box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
      fill = len(ys) / ((box[2] - box[0]) * (box[3] - box[1]))
      shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
      row, col = int(ys.mean()) // CELL, int(xs.mean()) // CELL
      scene.append((color, shape, row, col, box))
  return scene


def _question(sample):
  return sample["conversations"][0]["value"].removeprefix("<image>\n")


def _answer(sample):
  return sample["conversations"][-1]["value"]


def test_every_task_in_every_split_with_requested_sizes(bench):
  assert bench["counts"] == {split: {t: n for t in shapes.TASKS} for split, n in SIZES.items()}
  for split, n in SIZES.items():
    samples = _samples(bench, split)
    tasks = [s["task"] for s in samples]
    assert {t: tasks.count(t) for t in shapes.TASKS} == {t: n for t in shapes.TASKS}
    assert len({s["id"] for s in samples}) == len(samples)


def test_samples_follow_the_sample_contract(bench):
  for sample in _samples(bench, "train"):
    turns = sample["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    if sample["task"] == "chat":
      assert "image" not in sample and "<image>" not in turns[0]["value"]
    else:
      assert sample["image"] == f"images/train/{sample['id']}.png"
      assert turns[0]["value"].startswith("<image>\n") and len(turns) == 2
      pixels = _pixels(bench, sample)
      assert pixels.shape == (GRID * CELL, GRID * CELL, 3)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
  sizes = {"train": 3, "val": 1}
  a = shapes.generate_benchmark(tmp_path / "a", seed=1, sizes=sizes)
  b = shapes.generate_benchmark(tmp_path / "b", seed=1, sizes=sizes)
  c = shapes.generate_benchmark(tmp_path / "c", seed=2, sizes=sizes)

  def files(result):
    root = result["root"]
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names if f != "manifest.json"}

  assert files(a) == files(b)
  # Two JSON files and one PNG per non-chat sample.
  assert len(files(a)) == 2 + (3 + 1) * (len(shapes.TASKS) - 1)
  assert files(a)["train.json"] != files(c)["train.json"]
  assert files(a)["images/train/caption-train-000000.png"] != files(
      c)["images/train/caption-train-000000.png"]


def test_split_sizes_do_not_change_other_samples(tmp_path):
  small = shapes.generate_benchmark(tmp_path / "s", seed=3, sizes={"train": 2, "val": 1})
  large = shapes.generate_benchmark(tmp_path / "l", seed=3, sizes={"train": 2, "val": 5})
  assert open(small["splits"]["train"]).read() == open(large["splits"]["train"]).read()


def test_idempotent_and_regenerates_on_new_arguments(tmp_path):
  first = shapes.generate_benchmark(tmp_path, seed=0, sizes={"val": 2})
  manifest_time = os.stat(first["manifest"]).st_mtime_ns
  image = os.path.join(tmp_path, "images/val/vqa-val-000000.png")
  os.remove(image)  # A regeneration would bring it back.
  again = shapes.generate_benchmark(tmp_path, seed=0, sizes={"val": 2})
  assert again == first
  assert os.stat(first["manifest"]).st_mtime_ns == manifest_time and not os.path.exists(image)
  changed = shapes.generate_benchmark(tmp_path, seed=0, sizes={"val": 3})
  assert changed["counts"]["val"]["vqa"] == 3 and os.path.exists(image)


def test_per_task_sizes_and_bad_arguments(tmp_path):
  result = shapes.generate_benchmark(tmp_path, seed=0, sizes={"train": {"chat": 2, "vqa": 1}})
  assert result["counts"]["train"] == {"caption": 0, "vqa": 1, "count": 0, "grounding": 0,
                                       "chat": 2, "background": 0, "tally": 0}
  with pytest.raises(ValueError, match="unknown splits"):
    shapes.generate_benchmark(tmp_path, seed=0, sizes={"dev": 1})
  with pytest.raises(ValueError, match="max_objects"):
    shapes.generate_benchmark(tmp_path, seed=0, sizes={"val": 1}, grid=2, max_objects=5)


def test_scene_rules_hold_in_the_pixels(bench):
  for split in SIZES:
    for sample in _samples(bench, split):
      if sample["task"] == "chat":
        continue
      scene = _read_scene(_pixels(bench, sample))
      assert len(scene) in range(1, 5)  # 1..max_objects shapes
      assert len({(c, s) for c, s, *_ in scene}) == len(scene)  # Unique (colour, shape) pairs.
      assert len({(r, c) for _, _, r, c, _ in scene}) == len(scene)  # One shape per cell.


def test_captions_list_the_drawn_objects_in_reading_order(bench):
  pattern = re.compile(r"an? (\w+) (\w+) (?:at the|on the|in the) ([a-z ]+?)(?:,| and |\.$)")
  for sample in _samples(bench, "train"):
    if sample["task"] != "caption":
      continue
    scene = sorted(_read_scene(_pixels(bench, sample)), key=lambda o: (o[2], o[3]))
    expected = [(c, s, shapes.POSITIONS_3X3[r][col]) for c, s, r, col, _ in scene]
    assert pattern.findall(_answer(sample)) == expected
    assert "a orange" not in _answer(sample)
    assert _answer(sample) == shapes.caption_text(
        [shapes.ShapeObject(c, s, r, col, b) for c, s, r, col, b in scene], GRID)


def test_vqa_answers_match_the_object_at_the_position(bench):
  names = {name: (r, c) for r, row in enumerate(shapes.POSITIONS_3X3) for c, name in enumerate(row)}
  for split in SIZES:
    for sample in _samples(bench, split):
      if sample["task"] != "vqa":
        continue
      question = _question(sample)
      alternatives = "|".join(sorted(names, key=len, reverse=True))
      where = re.search(rf"(?:at the|on the|in the) ({alternatives})\b", question).group(1)
      (obj,) = [o for o in _read_scene(_pixels(bench, sample)) if (o[2], o[3]) == names[where]]
      expected = obj[0] if "color" in question else obj[1]
      assert _answer(sample) == expected, question


def test_count_answers_match_the_components(bench):
  for split in SIZES:
    for sample in _samples(bench, split):
      if sample["task"] != "count":
        continue
      scene, question = _read_scene(_pixels(bench, sample)), _question(sample)
      color = next((c for c in shapes.COLORS if f" {c} " in question), None)
      shape = next((s for s in shapes.SHAPES if f"{s}s" in question), None)
      expected = sum((color is None or o[0] == color) and (shape is None or o[1] == shape)
                     for o in scene)
      assert _answer(sample) == str(expected), question


def test_grounding_box_is_the_tight_box_of_the_named_shape(bench):
  side = GRID * CELL
  for split in SIZES:
    for sample in _samples(bench, split):
      if sample["task"] != "grounding":
        continue
      color, shape = re.search(r"the (\w+) (\w+)[?.]", _question(sample)).groups()
      (obj,) = [o for o in _read_scene(_pixels(bench, sample)) if o[:2] == (color, shape)]
      box = np.array(json.loads(_answer(sample)))
      assert np.allclose(box * side, obj[4], atol=0.005 * side)
      assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", _answer(sample))


def _number(word):
  return shapes.NUMBER_WORDS.index(word)


def test_chat_answers_are_correct(bench):
  for split in SIZES:
    for sample in _samples(bench, split):
      if sample["task"] != "chat":
        continue
      value = None
      turns = sample["conversations"]
      for question, answer in zip(turns[::2], turns[1::2]):
        q, a = question["value"], answer["value"]
        if ":" in q:
          assert a.split() == q.split(": ", 1)[1].split()[::-1]
          continue
        words = [w.strip("?.") for w in q.split()]
        nums = [_number(w) for w in words if w in shapes.NUMBER_WORDS]
        if len(nums) == 1:  # Follow-up on the previous answer.
          value = value + nums[0] if "add" in words or "plus" in words else value - nums[0]
        elif "plus" in words or "Add" in words:
          value = nums[0] + nums[1]
        elif "minus" in words:
          value = nums[0] - nums[1]
        else:  # "Take b away from a".
          value = nums[1] - nums[0]
        assert _number(a) == value, (q, a)


def test_questions_use_several_phrasings():
  samples = [shapes.make_sample(seed=0, split="train", task=task, index=i, grid=3, cell=16,
                                max_objects=4)[0] for task in shapes.TASKS for i in range(40)]
  for task in shapes.TASKS:
    firsts = {s["conversations"][0]["value"].split()[1] for s in samples if s["task"] == task}
    assert len(firsts) >= 2, task
  # Multi-turn chat exists.
  assert any(len(s["conversations"]) == 4 for s in samples if s["task"] == "chat")


def test_box_text_and_positions():
  assert shapes.box_text((0, 16, 24, 48), 48, 48) == "[0.00, 0.33, 0.50, 1.00]"
  assert shapes.position_phrase(1, 1, 3) == "in the center"
  assert shapes.position_phrase(1, 0, 3) == "on the left"
  assert shapes.position_phrase(2, 2, 3) == "at the bottom right"
  objects = [shapes.ShapeObject("orange", "circle", 0, 0, (1, 1, 9, 9)),
             shapes.ShapeObject("red", "square", 1, 1, (17, 17, 30, 30))]
  assert (shapes.caption_text(objects, 3)
          == "an orange circle at the top left and a red square in the center.")
  assert shapes.position_name(0, 3, 4) == "row 1, column 4"
  assert set(shapes.TASK_METRICS) == set(shapes.TASKS)
  assert set(shapes.TASK_METRICS.values()) == {"cider", "exact_match", "iou_accuracy"}


def test_background_task_names_its_own_palette():
  """The background task's answer is the name of the image's pale background colour, a colour
  no shape has, and its questions never mention shapes."""
  for i in range(30):
    sample, pixels = shapes.make_sample(seed=3, split="train", task="background", index=i,
                                        grid=3, cell=16, max_objects=4)
    answer = sample["conversations"][1]["value"]
    assert answer in shapes.SCENE_BACKGROUNDS
    # Shapes keep a one-pixel margin inside their cell, so a corner is always background.
    assert tuple(int(v) for v in pixels[0, 0]) == shapes.SCENE_BACKGROUNDS[answer]
    assert "background" in sample["conversations"][0]["value"]
  assert not set(shapes.SCENE_BACKGROUNDS.values()) & set(shapes.COLORS.values())
  # Appending the task left every other task's samples as they were.
  before = shapes.make_sample(seed=3, split="train", task="count", index=0, grid=3, cell=16,
                              max_objects=4)[0]
  assert before["id"] == "count-train-000000"


def test_vqa_scope_color_always_asks_the_colour():
  answers = {shapes.make_sample(seed=0, split="train", task="vqa", index=i, grid=3, cell=16,
                                max_objects=4, vqa_scope="color")[0]["conversations"][1]["value"]
             for i in range(40)}
  assert answers <= set(shapes.COLORS)
  with pytest.raises(ValueError, match="vqa_scope"):
    shapes.generate_benchmark("/nonexistent", seed=0, sizes={"train": 1}, vqa_scope="shape")


def test_tally_asks_counts_questions_and_answers_in_words():
  """tally: count's "all shapes" questions, word for word, answered with the number word, on the
  background task's pale palette (the only cue for which convention applies)."""
  for i in range(30):
    sample, pixels = shapes.make_sample(seed=5, split="val", task="tally", index=i,
                                        grid=3, cell=16, max_objects=4)
    question, answer = (turn["value"] for turn in sample["conversations"])
    assert question.removeprefix("<image>\n") in shapes.COUNT_ALL_QUESTIONS
    assert answer in shapes.NUMBER_WORDS[1:5]
    assert tuple(int(v) for v in pixels[0, 0]) in set(shapes.SCENE_BACKGROUNDS.values())
    # The answer is the number of objects drawn: count the non-background shapes' colours.
    colours = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
    drawn = colours & set(shapes.COLORS.values())
    assert len(drawn) <= shapes.NUMBER_WORDS.index(answer)
  # The count task's answer to the same question is a digit, and its samples are unchanged.
  count = shapes.make_sample(seed=5, split="val", task="count", index=0, grid=3, cell=16,
                             max_objects=4, count_scope="all")[0]
  assert count["conversations"][1]["value"].isdigit()
  assert count["id"] == "count-val-000000"
