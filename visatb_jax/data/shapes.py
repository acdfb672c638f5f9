"""Built-in procedural benchmark: coloured shapes on a grid, seven instruction tasks.

Each image is a ``grid`` x ``grid`` board of ``cell``-pixel cells (48 x 48 pixels by default).
Between 1 and ``max_objects`` cells hold one filled shape (circle, square or triangle) in one of six
colours, with a random size and offset that keep it at least one pixel inside its cell, so shapes
never touch. Every (colour, shape) pair occurs at most once per image, which makes every grounding
question unambiguous. Shapes are drawn without anti-aliasing, so every shape pixel has its exact
palette colour.

Tasks (all but chat share the skills "read the grid", "name colours/shapes", "locate"):

* ``caption``   -- a sentence listing every object in reading order with its position (CIDEr).
* ``vqa``       -- the colour or the shape at an occupied position, one word (exact match).
* ``count``     -- how many shapes (of one colour / of one kind), a number (exact match).
* ``grounding`` -- the tight box of a named object, ``[x1, y1, x2, y2]`` in [0, 1] (IoU accuracy).
* ``chat``      -- text-only: reverse a word list, or small arithmetic in words, 1-2 turns
  (exact match).
* ``background`` -- the colour of the background, one word (exact match). Its images have a
  pale background of their own palette (``SCENE_BACKGROUNDS``), and no other task says anything
  about backgrounds: a short-answer skill the other tasks do not teach.
* ``tally``     -- count's "how many shapes" questions, word for word, answered with a number
  word ("three", not "3"), on images with the background task's pale palette: a second source
  with another annotation convention for the same question, as real mixtures have (one dataset
  writes digits, another words). Only the image's source tells which convention applies, so
  the mixture pulls the two against each other (exact match).

The output follows the Sample contract of ``docs/architecture.md``: ``<root>/{split}.json`` holds a
list of samples of all tasks and ``<root>/images/<split>/<id>.png`` the images. Everything is a pure
function of the arguments: each sample draws from its own generator seeded by
``(seed, split, task, index)``, so changing the size of one split or task never changes another.
"""

from __future__ import annotations

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visatb_jax.runtime.fileio import atomic_write_bytes, atomic_write_json, read_json

# New tasks go at the end: a task's index seeds its samples (`sample_rng`).
TASKS = ("caption", "vqa", "count", "grounding", "chat", "background", "tally")
TASK_METRICS = {
    "caption": "cider",
    "vqa": "exact_match",
    "count": "exact_match",
    "grounding": "iou_accuracy",
    "chat": "exact_match",
    "background": "exact_match",
    "tally": "exact_match",
}
SPLITS = ("train", "val", "test")
# Images for a pretraining run (pipeline's pretrain stage): drawn from their own random streams,
# so none of them is an image of the task splits.
PRETRAIN_SPLIT = "pretrain"
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
# Light backgrounds, far from every palette colour.
BACKGROUNDS = ((255, 255, 255), (245, 245, 238), (238, 242, 250), (250, 244, 232))
# The background task's own pale palette (the other tasks' light backgrounds are near-white
# and never named); every value is far from every shape colour.
SCENE_BACKGROUNDS = {
    "gray": (215, 215, 215),
    "pink": (240, 212, 222),
    "green": (212, 236, 216),
    "blue": (212, 222, 242),
}
POSITIONS_3X3 = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Bumped whenever the generated data changes, so a stale manifest forces regeneration.
GENERATOR_VERSION = 2  # 2: the tally task
MANIFEST = "manifest.json"

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
CHAT_WORDS = (
    "red", "green", "blue", "yellow", "circle", "square", "triangle", "cat", "dog", "tree", "sun",
    "moon", "book", "river", "stone", "bird",
)

CAPTION_QUESTIONS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What does the image show? Describe it briefly.",
)
COLOR_QUESTIONS = (
    "What color is the shape {where}? Answer with one word.",
    "Which color does the object {where} have? Answer with one word.",
    "Tell me the color of the shape {where}. Answer with one word.",
)
SHAPE_QUESTIONS = (
    "What shape is {where}? Answer with one word.",
    "Which kind of shape is {where}? Answer with one word.",
    "Name the shape {where}. Answer with one word.",
)
COUNT_ALL_QUESTIONS = (
    "How many shapes are there? Answer with a number.",
    "How many objects are in the image? Answer with a number.",
    "Count the shapes in the picture. Answer with a number.",
)
COUNT_COLOR_QUESTIONS = (
    "How many {color} shapes are there? Answer with a number.",
    "Count the {color} objects in the image. Answer with a number.",
)
COUNT_SHAPE_QUESTIONS = (
    "How many {shape}s are there? Answer with a number.",
    "Count the {shape}s in the picture. Answer with a number.",
)
BACKGROUND_QUESTIONS = (
    "What color is the background? Answer with one word.",
    "Which color does the background have? Answer with one word.",
    "Name the background color. Answer with one word.",
)
GROUNDING_QUESTIONS = (
    "What is the bounding box of the {color} {shape}? Answer as [x1, y1, x2, y2].",
    "Give the bounding box of the {color} {shape}. Answer as [x1, y1, x2, y2].",
    "Where is the {color} {shape}? Answer as [x1, y1, x2, y2].",
)
REVERSE_QUESTIONS = (
    "Reverse the order of these words: {words}",
    "Write these words in reverse order: {words}",
    "Say these words backwards, last word first: {words}",
)
ADD_QUESTIONS = (
    "What is {a} plus {b}? Answer in words.",
    "Add {a} and {b}. Answer in words.",
)
SUB_QUESTIONS = (
    "What is {a} minus {b}? Answer in words.",
    "Take {b} away from {a}. Answer in words.",
)
FOLLOW_UP_ADD = ("Now add {c}.", "And plus {c}?")
FOLLOW_UP_SUB = ("Now subtract {c}.", "And minus {c}?")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One drawn shape; ``box`` is the tight pixel box ``(x1, y1, x2, y2)``, end-exclusive."""
  color: str
  shape: str
  row: int
  col: int
  box: tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------
# Words.


def position_name(row: int, col: int, grid: int) -> str:
  """Name of a grid cell: the nine 3x3 words, or "row r, column c" for other grids."""
  if grid == 3:
    return POSITIONS_3X3[row][col]
  return f"row {row + 1}, column {col + 1}"


def position_phrase(row: int, col: int, grid: int) -> str:
  """A cell with its preposition: "at the top left", "on the left", "in the center"."""
  name = position_name(row, col, grid)
  if grid != 3:
    return f"at {name}"
  if name == "center":
    return "in the center"
  if name in ("left", "right"):
    return f"on the {name}"
  return f"at the {name}"


def article(word: str) -> str:
  """"an" before a vowel ("an orange circle"), else "a"."""
  return "an" if word[:1] in "aeiou" else "a"


def caption_text(objects: Sequence[ShapeObject], grid: int) -> str:
  """"a red circle at the top left, ... and a blue square in the center." in reading order."""
  ordered = sorted(objects, key=lambda o: (o.row, o.col))
  parts = [f"{article(o.color)} {o.color} {o.shape} {position_phrase(o.row, o.col, grid)}"
           for o in ordered]
  if len(parts) == 1:
    body = parts[0]
  else:
    body = ", ".join(parts[:-1]) + " and " + parts[-1]
  return body + "."


def box_text(box: tuple[int, int, int, int], width: int, height: int) -> str:
  """Pixel box (end-exclusive) -> "[x1, y1, x2, y2]" normalised to [0, 1] with 2 decimals."""
  x1, y1, x2, y2 = box
  values = (x1 / width, y1 / height, x2 / width, y2 / height)
  return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


# ---------------------------------------------------------------------------------------------
# Images.


def sample_objects(rng: np.random.Generator, *, grid: int, cell: int,
                   max_objects: int) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
  """Random scene: objects (colour, shape, cell, size, offset) and a background colour."""
  pairs = [(c, s) for c in COLORS for s in SHAPES]
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(grid * grid, size=n, replace=False)
  chosen = rng.choice(len(pairs), size=n, replace=False)
  # One pixel margin on each side keeps neighbouring shapes from touching.
  max_size = cell - 2
  min_size = max(3, min(max_size, int(round(cell * 0.55))))
  specs = []
  for cell_index, pair_index in zip(cells, chosen):
    size = int(rng.integers(min_size, max_size + 1))
    slack = max_size - size
    specs.append({
        "color": pairs[pair_index][0],
        "shape": pairs[pair_index][1],
        "row": int(cell_index) // grid,
        "col": int(cell_index) % grid,
        "size": size,
        "dx": 1 + int(rng.integers(0, slack + 1)),
        "dy": 1 + int(rng.integers(0, slack + 1)),
    })
  background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  return specs, background


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, size: int,
                fill: tuple[int, int, int]) -> None:
  x1, y1 = x0 + size - 1, y0 + size - 1
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=fill)
  elif shape == "triangle":
    draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) / 2, y0)), fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(specs: Sequence[Mapping[str, Any]], background: tuple[int, int, int], *,
                 grid: int, cell: int) -> tuple[np.ndarray, list[ShapeObject]]:
  """Draws a scene; returns the uint8 image [H, W, 3] and the objects with their tight boxes.

  The boxes are measured on the drawn pixels (not the requested size), so a grounding answer is
  exactly the extent of the visible shape.
  """
  side = grid * cell
  image = Image.new("RGB", (side, side), background)
  draw = ImageDraw.Draw(image)
  for spec in specs:
    x0 = spec["col"] * cell + spec["dx"]
    y0 = spec["row"] * cell + spec["dy"]
    _draw_shape(draw, spec["shape"], x0, y0, spec["size"], COLORS[spec["color"]])
  pixels = np.asarray(image, dtype=np.uint8)
  objects = []
  for spec in specs:
    r0, c0 = spec["row"] * cell, spec["col"] * cell
    patch = pixels[r0:r0 + cell, c0:c0 + cell]
    mask = np.all(patch == np.asarray(COLORS[spec["color"]], np.uint8), axis=-1)
    ys, xs = np.nonzero(mask)
    box = (c0 + int(xs.min()), r0 + int(ys.min()), c0 + int(xs.max()) + 1, r0 + int(ys.max()) + 1)
    objects.append(ShapeObject(spec["color"], spec["shape"], spec["row"], spec["col"], box))
  return pixels, objects


def png_bytes(pixels: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W, 3] array as PNG (deterministic: no metadata)."""
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Questions and answers.


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def caption_qa(rng: np.random.Generator, objects: Sequence[ShapeObject],
               grid: int) -> tuple[str, str]:
  """Caption question and its reference sentence."""
  return _pick(rng, CAPTION_QUESTIONS), caption_text(objects, grid)


VQA_SCOPES = ("any", "color")


def vqa_qa(rng: np.random.Generator, objects: Sequence[ShapeObject], grid: int,
           scope: str = "any") -> tuple[str, str]:
  """Colour or shape of the object at an occupied position (one word); with scope="color",
  always its colour (an easier task for a small model: a colour is the mean of a few patches)."""
  obj = _pick(rng, objects)
  where = position_phrase(obj.row, obj.col, grid)
  if rng.random() < 0.5 or scope == "color":
    return _pick(rng, COLOR_QUESTIONS).format(where=where), obj.color
  return _pick(rng, SHAPE_QUESTIONS).format(where=where), obj.shape


COUNT_SCOPES = ("any", "all")


def count_qa(rng: np.random.Generator, objects: Sequence[ShapeObject],
             scope: str = "any") -> tuple[str, str]:
  """Count all shapes (half the time), or those of one colour / one kind (may be zero); with
  scope="all", always all of them (an easier task for a small model)."""
  kind = rng.random()
  if kind < 0.5 or scope == "all":
    return _pick(rng, COUNT_ALL_QUESTIONS), str(len(objects))
  if kind < 0.75:
    # Mostly a colour that is present, sometimes any colour, so "0" is a possible answer.
    present = sorted({o.color for o in objects})
    color = _pick(rng, present) if rng.random() < 0.75 else _pick(rng, tuple(COLORS))
    answer = sum(o.color == color for o in objects)
    return _pick(rng, COUNT_COLOR_QUESTIONS).format(color=color), str(answer)
  shape = _pick(rng, SHAPES)
  answer = sum(o.shape == shape for o in objects)
  return _pick(rng, COUNT_SHAPE_QUESTIONS).format(shape=shape), str(answer)


def grounding_qa(rng: np.random.Generator, objects: Sequence[ShapeObject], width: int,
                 height: int) -> tuple[str, str]:
  """Box of a named (colour, shape) object, normalised, 2 decimals."""
  obj = _pick(rng, objects)
  question = _pick(rng, GROUNDING_QUESTIONS).format(color=obj.color, shape=obj.shape)
  return question, box_text(obj.box, width, height)


def chat_conversation(rng: np.random.Generator) -> list[dict[str, str]]:
  """A text-only conversation: word reversal, or 1-2 turns of arithmetic in words (0..20)."""
  kind = rng.random()
  if kind < 0.4:
    n = int(rng.integers(3, 6))
    words = [CHAT_WORDS[int(i)] for i in rng.integers(0, len(CHAT_WORDS), size=n)]
    question = _pick(rng, REVERSE_QUESTIONS).format(words=" ".join(words))
    return _turns([(question, " ".join(reversed(words)))])
  a, b = (int(v) for v in rng.integers(0, 11, size=2))
  if rng.random() < 0.5:
    question, value = _pick(rng, ADD_QUESTIONS), a + b
  else:
    a, b = max(a, b), min(a, b)
    question, value = _pick(rng, SUB_QUESTIONS), a - b
  turns = [(question.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), NUMBER_WORDS[value])]
  if kind >= 0.7:
    # A follow-up turn whose answer depends on the first answer: the model must read the history.
    if rng.random() < 0.5 and value < 20:
      c = int(rng.integers(1, 21 - value))
      follow, value = _pick(rng, FOLLOW_UP_ADD), value + c
    elif value > 0:
      c = int(rng.integers(1, value + 1))
      follow, value = _pick(rng, FOLLOW_UP_SUB), value - c
    else:
      c = int(rng.integers(1, 11))
      follow, value = _pick(rng, FOLLOW_UP_ADD), value + c
    turns.append((follow.format(c=NUMBER_WORDS[c]), NUMBER_WORDS[value]))
  return _turns(turns)


def _turns(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
  conversation = []
  for question, answer in pairs:
    conversation.append({"from": "human", "value": question})
    conversation.append({"from": "gpt", "value": answer})
  return conversation


# ---------------------------------------------------------------------------------------------
# Samples and the benchmark.


def sample_rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
  """The generator of one sample: independent of every other sample, split size and task size."""
  return np.random.default_rng([seed, (SPLITS + (PRETRAIN_SPLIT,)).index(split),
                                TASKS.index(task), index])


def make_sample(*, seed: int, split: str, task: str, index: int, grid: int, cell: int,
                max_objects: int, count_scope: str = "any", vqa_scope: str = "any"
                ) -> tuple[dict[str, Any], np.ndarray | None]:
  """One sample (Sample contract) and its image pixels (None for the text-only chat task)."""
  rng = sample_rng(seed, split, task, index)
  sample_id = f"{task}-{split}-{index:06d}"
  if task == "chat":
    return {"id": sample_id, "task": task, "conversations": chat_conversation(rng)}, None
  specs, background = sample_objects(rng, grid=grid, cell=cell, max_objects=max_objects)
  if task in ("background", "tally"):
    background_name = _pick(rng, tuple(SCENE_BACKGROUNDS))
    background = SCENE_BACKGROUNDS[background_name]
  pixels, objects = render_scene(specs, background, grid=grid, cell=cell)
  height, width = pixels.shape[:2]
  if task == "caption":
    question, answer = caption_qa(rng, objects, grid)
  elif task == "vqa":
    question, answer = vqa_qa(rng, objects, grid, vqa_scope)
  elif task == "count":
    question, answer = count_qa(rng, objects, count_scope)
  elif task == "grounding":
    question, answer = grounding_qa(rng, objects, width, height)
  elif task == "background":
    question, answer = _pick(rng, BACKGROUND_QUESTIONS), background_name
  elif task == "tally":
    question, answer = _pick(rng, COUNT_ALL_QUESTIONS), NUMBER_WORDS[len(objects)]
  else:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  sample = {
      "id": sample_id,
      "task": task,
      "image": f"images/{split}/{sample_id}.png",
      "conversations": _turns([("<image>\n" + question, answer)]),
  }
  return sample, pixels


def _task_sizes(sizes: Mapping[str, int | Mapping[str, int]], split: str) -> dict[str, int]:
  value = sizes[split]
  if isinstance(value, Mapping):
    unknown = set(value) - set(TASKS)
    if unknown:
      raise ValueError(f"sizes[{split!r}] names unknown tasks {sorted(unknown)}; known: {TASKS}")
    return {task: int(value.get(task, 0)) for task in TASKS}
  return {task: int(value) for task in TASKS}


def _validate(sizes: Mapping[str, Any], grid: int, cell: int, max_objects: int) -> None:
  unknown = set(sizes) - set(SPLITS) - {PRETRAIN_SPLIT}
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; expected a subset of "
                     f"{SPLITS + (PRETRAIN_SPLIT,)}")
  if grid < 1 or cell < 6:
    raise ValueError(f"grid must be >= 1 and cell >= 6 pixels, got grid={grid}, cell={cell}")
  if not 1 <= max_objects <= min(grid * grid, len(COLORS) * len(SHAPES)):
    raise ValueError(f"max_objects={max_objects} must be in [1, min(grid*grid, "
                     f"{len(COLORS) * len(SHAPES)})] for grid={grid}")


def _manifest_args(seed: int, sizes: Mapping[str, Any], grid: int, cell: int,
                   max_objects: int, count_scope: str = "any",
                   vqa_scope: str = "any") -> dict[str, Any]:
  # JSON round trip so the comparison with a stored manifest is between like types.
  plain_sizes = {split: (dict(v) if isinstance(v, Mapping) else int(v))
                 for split, v in sizes.items()}
  args = {"seed": int(seed), "sizes": plain_sizes, "grid": int(grid), "cell": int(cell),
          "max_objects": int(max_objects), "version": GENERATOR_VERSION}
  if count_scope != "any":  # absent by default, so earlier manifests stay valid
    args["count_scope"] = count_scope
  if vqa_scope != "any":
    args["vqa_scope"] = vqa_scope
  return args


def generate_benchmark(root: str | os.PathLike, *, seed: int,
                       sizes: Mapping[str, int | Mapping[str, int]], grid: int = 3, cell: int = 16,
                       max_objects: int = 4, num_threads: int = 8,
                       count_scope: str = "any", vqa_scope: str = "any") -> dict[str, Any]:
  """Writes the shapes benchmark under ``root`` and returns its paths and counts.

  Args:
    root: output directory.
    seed: base seed; the output is a pure function of all arguments.
    sizes: samples per task for each split, e.g. ``{"train": 1000, "val": 100, "test": 100}``;
      a split may instead map task -> count.
    grid: cells per side; position words are the 3x3 names when ``grid == 3``.
    cell: pixels per cell side.
    max_objects: at most this many shapes per image (at least one).
    count_scope: "any" (count all shapes, or those of one colour or kind) or "all" (always all).
    vqa_scope: "any" (the colour or the shape at a position) or "color" (always the colour).
    num_threads: threads writing PNG files (I/O only; the content does not depend on it).

  Returns:
    ``{"root", "splits": {split: json_path}, "counts": {split: {task: n}}, "num_images",
    "manifest", "args"}``. If ``root/manifest.json`` already records the same arguments, it is
    returned without regenerating anything; the manifest is written last, so a killed run is redone.
  """
  _validate(sizes, grid, cell, max_objects)
  root = os.path.abspath(os.fspath(root))
  if count_scope not in COUNT_SCOPES:
    raise ValueError(f"count_scope={count_scope!r}; choose one of {COUNT_SCOPES}")
  if vqa_scope not in VQA_SCOPES:
    raise ValueError(f"vqa_scope={vqa_scope!r}; choose one of {VQA_SCOPES}")
  args = _manifest_args(seed, sizes, grid, cell, max_objects, count_scope, vqa_scope)
  manifest_path = os.path.join(root, MANIFEST)
  if os.path.exists(manifest_path):
    stored = read_json(manifest_path)
    if stored.get("args") == args and all(os.path.exists(p) for p in stored["splits"].values()):
      return stored
  splits, counts, num_images = {}, {}, 0
  with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for split in sizes:
      samples, writes = [], []
      task_sizes = _task_sizes(sizes, split)
      for task in TASKS:
        for index in range(task_sizes[task]):
          sample, pixels = make_sample(seed=seed, split=split, task=task, index=index, grid=grid,
                                       cell=cell, max_objects=max_objects,
                                       count_scope=count_scope, vqa_scope=vqa_scope)
          samples.append(sample)
          if pixels is not None:
            path = os.path.join(root, sample["image"])
            writes.append(pool.submit(atomic_write_bytes, path, png_bytes(pixels)))
      for future in writes:
        future.result()  # Re-raises a failed write.
      num_images += len(writes)
      splits[split] = os.path.join(root, f"{split}.json")
      atomic_write_json(splits[split], samples)
      counts[split] = task_sizes
  result = {"root": root, "splits": splits, "counts": counts, "num_images": num_images,
            "manifest": manifest_path, "args": args, "task_metrics": dict(TASK_METRICS)}
  atomic_write_json(manifest_path, result)
  return result
