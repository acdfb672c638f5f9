"""Read LLaVA-style samples (JSON list or JSONL), validate them and resolve their images.

A sample follows the Sample contract of ``docs/architecture.md``::

    {"id": ..., "image": "images/train/x.png" (optional), "task": "caption" (optional),
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}

Rules applied by :func:`load_samples`:

* Malformed JSON raises ``ValueError`` naming the file and the line.
* The task is the sample's ``"task"``, else the ``task`` argument, else the file name
  (``{task}_train.json``, ``{task}-mini_train.json``, ``{task}.jsonl``); none of these raises.
* Invalid conversations are skipped and counted by reason (``LoadedSplit.skipped``):
  ``no_conversations``, ``bad_turn`` (not a dict with string ``from``/``value``), ``unknown_role``,
  ``not_alternating`` (must alternate human/gpt starting with human), ``no_assistant_turn``,
  ``image_token_mismatch`` (placeholders other than none or one per image), ``bad_image_field``,
  ``bad_answers`` (an ``"answers"`` field that is not a non-empty list of strings),
  ``not_an_object``.
* An optional ``"answers": [str, ...]`` beside the conversations lists the sample's references:
  scoring uses them instead of the last assistant turn (:func:`scoring_references`), and every one
  of them where the task's metric takes several (e.g. VQA soft accuracy, multi-reference CIDEr).
  Training and the generation prompt still come from the conversations alone.
* Roles ``user``/``assistant`` are renamed ``human``/``gpt``. A sample with images but no
  ``<image>`` placeholder gets ``"<image>\\n"`` prepended to its first human turn (as LLaVA does).
* Image paths resolve against ``image_root`` or the JSON file's directory; ``image_paths`` (list)
  and ``image_path`` (the first one, or None) are recorded absolute. A missing image raises
  ``ValueError`` naming the image, the sample and the JSON file (or is skipped and counted as
  ``missing_image`` with ``on_missing_image="skip"``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterator, NamedTuple

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
SPLIT_NAMES = ("train", "val", "validation", "test", "dev", "eval")
_FILE_TASK = re.compile(
    r"^(?P<task>.+?)(?:-(?:mini|large))?(?:_(?:" + "|".join(SPLIT_NAMES) + r"))?$")


@dataclasses.dataclass
class LoadedSplit:
  """Valid samples of one file and the number of skipped samples per reason."""
  samples: list[dict[str, Any]]
  skipped: dict[str, int]
  path: str

  def __len__(self) -> int:
    return len(self.samples)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


class SampleError(ValueError):
  """A sample that cannot be used; ``reason`` is the key it is counted under."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def task_from_filename(path: str | os.PathLike) -> str | None:
  """``caption_train.json`` / ``caption-mini_train.jsonl`` -> "caption"; ``train.json`` -> None."""
  stem = os.path.basename(os.fspath(path))
  for ext in (".jsonl", ".json"):
    if stem.endswith(ext):
      stem = stem[:-len(ext)]
      break
  if stem in SPLIT_NAMES:
    return None
  match = _FILE_TASK.match(stem)
  return match.group("task") if match else None


class Record(NamedTuple):
  """One raw record; ``unit`` is "line" (JSONL) or "sample" (index in a JSON list), 1-based."""
  number: int
  unit: str
  value: Any


def _jsonl_records(path: str, text: str) -> Iterator[Record]:
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      yield Record(line_number, "line", json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {line_number}: malformed JSON ({e.msg})") from e


def read_records(path: str | os.PathLike) -> Iterator[Record]:
  """Yields the records of a JSON list or of a JSONL file.

  A ``.json`` file whose content is several JSON values (one per line) is read as JSONL.

  Raises:
    ValueError: malformed JSON (naming the file and line) or a JSON value that is not a list.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".jsonl") or not text.strip():
    yield from _jsonl_records(path, text)
    return
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # Several values: JSON lines under a .json name.
      yield from _jsonl_records(path, text)
      return
    raise ValueError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from e
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
  for index, value in enumerate(records, start=1):
    yield Record(index, "sample", value)


def normalize_conversations(conversations: Any) -> list[dict[str, str]]:
  """Validates a conversation; returns it with roles renamed to human/gpt.

  Raises:
    SampleError: with the skip reason (see the module docstring).
  """
  if not isinstance(conversations, list) or not conversations:
    raise SampleError("no_conversations", "missing or empty 'conversations'")
  turns = []
  for i, turn in enumerate(conversations):
    if (not isinstance(turn, dict) or not isinstance(turn.get("from"), str)
        or not isinstance(turn.get("value"), str)):
      raise SampleError("bad_turn", f"turn {i} is not {{'from': str, 'value': str}}")
    role = ROLE_ALIASES.get(turn["from"].lower())
    if role is None:
      raise SampleError("unknown_role", f"turn {i} has unknown role {turn['from']!r}")
    expected = "human" if i % 2 == 0 else "gpt"
    if role != expected:
      raise SampleError("not_alternating", f"turn {i} is {role!r}, expected {expected!r}")
    turns.append({"from": role, "value": turn["value"]})
  if not any(t["from"] == "gpt" for t in turns):
    raise SampleError("no_assistant_turn", "no assistant ('gpt') turn")
  return turns


def image_list(sample: dict[str, Any]) -> list[str]:
  """The sample's relative image paths: ``"image"`` as a string or a list (empty if absent)."""
  image = sample.get("image")
  if image is None or image == "":
    return []
  if isinstance(image, str):
    return [image]
  if isinstance(image, list) and all(isinstance(p, str) for p in image):
    return list(image)
  raise SampleError("bad_image_field", f"'image' must be a string or a list of strings: {image!r}")


def answer_list(sample: dict[str, Any]) -> list[str] | None:
  """The sample's ``"answers"`` (None when absent).

  Raises:
    SampleError: ``bad_answers``, when present but not a non-empty list of strings.
  """
  answers = sample.get("answers")
  if answers is None:
    return None
  if (not isinstance(answers, list) or not answers
      or not all(isinstance(a, str) for a in answers)):
    raise SampleError("bad_answers",
                      f"'answers' must be a non-empty list of strings: {answers!r}")
  return list(answers)


def scoring_references(sample: dict[str, Any]) -> list[str]:
  """The reference(s) a sample is scored against: its ``"answers"``, else its last gpt turn.

  One convention for every split and source, so that a file with several human answers per
  question (VQAv2, TextVQA) scores the same whether it is a trained or a zero-shot task.

  Raises:
    ValueError: a malformed ``"answers"`` field, or a conversation without an assistant turn.
  """
  answers = answer_list(sample)
  if answers is not None:
    return answers
  for turn in reversed(sample.get("conversations") or []):
    if ROLE_ALIASES.get(str(turn.get("from", "")).lower()) == "gpt":
      return [turn["value"]]
  raise ValueError(f"sample {sample.get('id')!r} has no assistant turn to score against")


def place_image_tokens(turns: list[dict[str, str]], num_images: int) -> list[dict[str, str]]:
  """Checks the ``<image>`` placeholders; adds one per image to the first human turn if none."""
  count = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
  if count == 0 and num_images:
    first = dict(turns[0], value=(IMAGE_PLACEHOLDER + "\n") * num_images + turns[0]["value"])
    return [first] + turns[1:]
  if count != num_images:
    raise SampleError("image_token_mismatch",
                      f"{count} '{IMAGE_PLACEHOLDER}' placeholders for {num_images} images")
  return turns


def _describe(path: str, record: Record) -> str:
  sample_id = record.value.get("id") if isinstance(record.value, dict) else None
  return (f"{path}: {record.unit} {record.number}"
          + (f" (id {sample_id!r})" if sample_id is not None else ""))


def load_samples(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 task: str | None = None, on_missing_image: str = "error") -> LoadedSplit:
  """Reads, validates and normalises the samples of a LLaVA JSON / JSONL file.

  Args:
    path: a ``.json`` file holding a list of samples, or a ``.jsonl`` file (one per line).
    image_root: directory image paths are relative to (default: the file's directory).
    task: task of samples without a ``"task"`` field (default: inferred from the file name).
    on_missing_image: "error" (raise) or "skip" (count under ``missing_image``).

  Returns:
    A :class:`LoadedSplit`. Each sample is a copy with normalised ``conversations`` and added
    ``task``, ``id`` (``"<file stem>-<n>"`` if absent), ``image_paths`` and ``image_path``.

  Raises:
    ValueError: malformed JSON, a sample whose task cannot be determined, or a missing image.
  """
  if on_missing_image not in ("error", "skip"):
    raise ValueError(f"on_missing_image must be 'error' or 'skip', got {on_missing_image!r}")
  path = os.path.abspath(os.fspath(path))
  root = os.path.abspath(os.fspath(image_root)) if image_root is not None else os.path.dirname(path)
  file_task = task if task is not None else task_from_filename(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  samples: list[dict[str, Any]] = []
  skipped: collections.Counter[str] = collections.Counter()
  for raw in read_records(path):
    where, record = _describe(path, raw), raw.value
    if not isinstance(record, dict):
      skipped["not_an_object"] += 1
      continue
    sample_task = record.get("task", file_task)
    if not isinstance(sample_task, str) or not sample_task:
      raise ValueError(f"{where}: no 'task' field, and no task was given or could be inferred "
                       f"from the file name")
    try:
      relative = image_list(record)
      answer_list(record)  # a bad "answers" is skipped and counted here, not raised at scoring
      turns = place_image_tokens(normalize_conversations(record.get("conversations")),
                                 len(relative))
    except SampleError as e:
      skipped[e.reason] += 1
      continue
    image_paths = [os.path.normpath(os.path.join(root, p)) for p in relative]
    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
      if on_missing_image == "skip":
        skipped["missing_image"] += 1
        continue
      raise ValueError(f"{where}: image not found: {missing[0]}")
    sample = dict(record)
    sample.update(
        id=str(record.get("id", f"{stem}-{raw.number}")), task=sample_task, conversations=turns,
        image_paths=image_paths, image_path=image_paths[0] if image_paths else None)
    samples.append(sample)
  return LoadedSplit(samples=samples, skipped=dict(skipped), path=path)


def load_split(root: str | os.PathLike, split: str, **kwargs: Any) -> LoadedSplit:
  """Loads ``<root>/<split>.json`` (the shapes benchmark layout)."""
  return load_samples(os.path.join(os.fspath(root), f"{split}.json"), **kwargs)
