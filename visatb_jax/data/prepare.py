"""Prepare a task mixture once as array_record files (a tfds dataset); read it back without TF.

What is stored: **raw samples**, one record per sample, in the order given::

    {"id": str, "task": str, "conversations": JSON text of the normalised turns,
     "images": [the image files' bytes, as they are on disk], "image_paths": [their paths]}

Raw rather than tokenised, because the tokenizer (trained by the ``data`` stage, or a checkpoint's),
the chat template, ``max_len`` and ``num_image_tokens`` and the image size all change without the
data changing: a prepared mixture serves every model and template, and the tokenizer can even be
trained after it. What it costs: every epoch tokenises and decodes every sample again (in the
loader's worker processes, see ``loader.py``), and the files are the size of the compressed images
(PNG / JPEG bytes, not decoded pixels), with no saving from pre-resizing. Storing the image bytes
rather than paths makes a prepared directory self-contained: it can be copied to other hosts or a
bucket and read with no access to the original image tree.

How: a small ``tfds.core.GeneratorBasedBuilder`` (:class:`VisatbMixture`) whose
``download_and_prepare(file_format="array_record")`` writes the files; tfds serialises records with
its own copy of the ``tf.train.Example`` protos and writes array_record with the ``array_record``
package, so **no TensorFlow is needed** to write or read. (``tfds.dataset_builders.
store_as_tfds_dataset`` / ``AdhocBuilder`` cannot be used: they test ``isinstance(ds,
tf.data.Dataset)``, which imports TensorFlow.) ``disable_shuffling=True`` keeps record ``i`` equal to
sample ``i``, so subsets can be chosen by index (``loader.py``'s ``record_indices``). Reading is
``tfds.builder_from_directory(directory).as_data_source(split)``, a random-access source for grain.

Idempotence: ``directory/prepare.json`` (written last) records a fingerprint of the samples (ids,
tasks, conversations, image paths with a digest of their bytes, see ``image_digest.py``); a
directory with the same fingerprint is reused as it is, anything else (another mixture, a run
killed half way) is rebuilt. The build happens in a scratch directory next to ``directory`` and is
renamed into place whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from visatb_jax.data import image_digest
from visatb_jax.runtime import fileio

FORMAT_VERSION = "1.0.0"
MARKER = "prepare.json"
FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "task": tfds.features.Text(),
    "conversations": tfds.features.Text(),
    # Scalar strings are arbitrary bytes: the image files as they are, whatever their format.
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "image_paths": tfds.features.Sequence(tfds.features.Text()),
})


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """What ``prepare.json`` records of one split."""
  num_records: int
  tasks: tuple[str, ...]  # the split's task names, sorted
  record_task: np.ndarray  # int32 [num_records], index into ``tasks`` of each record

  def task_counts(self) -> dict[str, int]:
    counts = np.bincount(self.record_task, minlength=len(self.tasks))
    return {t: int(c) for t, c in zip(self.tasks, counts)}

  def indices_of(self, task: str) -> np.ndarray:
    """Record indices of ``task`` (empty when the split has none)."""
    if task not in self.tasks:
      return np.zeros(0, np.int64)
    return np.flatnonzero(self.record_task == self.tasks.index(task))


@dataclasses.dataclass(frozen=True)
class PreparedMixture:
  """A finished preparation: a tfds dataset directory of array_record files."""
  directory: str
  fingerprint: str
  splits: dict[str, SplitInfo]

  def data_source(self, split: str) -> Any:
    """The random-access tfds source of ``split`` (records as :func:`decode_record` takes them)."""
    if split not in self.splits:
      raise ValueError(f"{self.directory} has no split {split!r}; it has {sorted(self.splits)}")
    return tfds.builder_from_directory(self.directory).as_data_source(split)


class VisatbMixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder over in-memory validated samples (``sources.load_samples``), split by name."""

  VERSION = tfds.core.Version(FORMAT_VERSION)

  # tfds 4.9.10's own `code_path` touches `importlib_resources`, a package it only declares for
  # Python < 3.9 (tensorflow/datasets#11212); this file is where the builder lives in any case.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, splits: Mapping[str, Sequence[dict[str, Any]]], **kwargs: Any):
    self._samples = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=FEATURES, disable_shuffling=True,
                                 description="A visatb_jax task mixture (raw LLaVA samples).")

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager
    return {name: self._generate_examples(samples) for name, samples in self._samples.items()}

  def _generate_examples(self, samples: Sequence[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
    for i, sample in enumerate(samples):
      yield i, encode_record(sample)


def _image_paths(sample: dict[str, Any]) -> list[str]:
  paths = sample.get("image_paths")
  if paths is None:
    paths = [sample["image_path"]] if sample.get("image_path") else []
  return list(paths)


def _check_sample(sample: Any, split: str, index: int) -> None:
  where = f"split {split!r} sample {index}"
  if not isinstance(sample, dict):
    raise TypeError(f"{where}: expected a dict from sources.load_samples, got {type(sample)}")
  where += f" (id {sample.get('id')!r})"
  if not isinstance(sample.get("task"), str) or not sample["task"]:
    raise ValueError(f"{where}: no 'task'")
  if not isinstance(sample.get("conversations"), list) or not sample["conversations"]:
    raise ValueError(f"{where}: no 'conversations'")
  for path in _image_paths(sample):
    if not os.path.isfile(path):
      raise ValueError(f"{where}: image not found: {path}")


def encode_record(sample: dict[str, Any]) -> dict[str, Any]:
  """The stored record of a validated sample (reads its image files)."""
  images = []
  for path in _image_paths(sample):
    with open(path, "rb") as f:
      images.append(f.read())
  return {"id": str(sample.get("id", "")), "task": sample["task"],
          "conversations": json.dumps(sample["conversations"], ensure_ascii=False),
          "images": images, "image_paths": _image_paths(sample)}


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record read from :meth:`PreparedMixture.data_source`, as Python values.

  Returns:
    ``{"id", "task", "conversations" (list of turns), "images" (list of bytes), "image_paths"}``.
  """
  return {"id": _text(record["id"]), "task": _text(record["task"]),
          "conversations": json.loads(_text(record["conversations"])),
          "images": [bytes(b) for b in record["images"]],
          "image_paths": [_text(p) for p in record["image_paths"]]}


def mixture_fingerprint(splits: Mapping[str, Sequence[dict[str, Any]]]) -> str:
  """sha256 of the format version, the samples and their image files' (path, content digest).

  The images' digests come from `image_digest.file_digests`: hashed once, then a stat each.
  """
  digests = image_digest.file_digests(
      {p for samples in splits.values() for sample in samples for p in _image_paths(sample)})
  h = hashlib.sha256(FORMAT_VERSION.encode())
  for split in sorted(splits):
    h.update(json.dumps(["split", split]).encode())
    for sample in splits[split]:
      files = [(p, digests[p]) for p in _image_paths(sample)]
      h.update(json.dumps([sample.get("id"), sample["task"], sample["conversations"], files],
                          ensure_ascii=False).encode())
  return h.hexdigest()


def _split_info(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  tasks = sorted({s["task"] for s in samples})
  index = {t: i for i, t in enumerate(tasks)}
  return {"num_records": len(samples), "tasks": tasks,
          "record_task": [index[s["task"]] for s in samples]}


def open_prepared(directory: str | os.PathLike) -> PreparedMixture:
  """A finished preparation in ``directory``.

  Raises:
    ValueError: ``directory`` holds no finished preparation.
  """
  directory = os.path.abspath(os.fspath(directory))
  marker = os.path.join(directory, MARKER)
  if not os.path.exists(marker) or not os.path.exists(os.path.join(directory, "dataset_info.json")):
    raise ValueError(f"{directory} holds no finished preparation (no {MARKER}); run "
                     "prepare_mixture first")
  info = fileio.read_json(marker)
  if info.get("format") != FORMAT_VERSION:
    raise ValueError(f"{marker} has format {info.get('format')!r}, expected {FORMAT_VERSION!r}")
  splits = {name: SplitInfo(num_records=int(s["num_records"]), tasks=tuple(s["tasks"]),
                            record_task=np.asarray(s["record_task"], np.int32))
            for name, s in info["splits"].items()}
  return PreparedMixture(directory=directory, fingerprint=info["fingerprint"], splits=splits)


@contextlib.contextmanager
def _progress_bar(enable: bool) -> Iterator[None]:
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  before = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enable)
  try:
    yield
  finally:
    tfds.display_progress_bar(before)


def prepare_mixture(splits: Mapping[str, Sequence[dict[str, Any]]], directory: str | os.PathLike,
                    *, num_shards: int | None = None, progress: bool = False) -> PreparedMixture:
  """Writes ``splits`` (split name -> samples) as array_record files in ``directory``, once.

  Args:
    splits: e.g. ``{"train": sources.load_samples(path).samples}``; each sample needs ``task``,
      ``conversations`` and (optional) ``image_paths``/``image_path`` of existing files.
    directory: the dataset directory (created; its parent must be writable).
    num_shards: array_record files per split (default: tfds's choice by size).
    progress: show tfds's progress bars.

  Returns:
    The :class:`PreparedMixture`; the existing one when ``directory`` already holds this mixture.

  Raises:
    ValueError: no split, an empty split, or a sample without task / conversations / image file
      (naming the split, the sample and the file).
    TypeError: a sample that is not a dict.
  """
  if not splits:
    raise ValueError("prepare_mixture needs at least one split")
  for split, samples in splits.items():
    if not samples:
      raise ValueError(f"split {split!r} has no samples")
    for i, sample in enumerate(samples):
      _check_sample(sample, split, i)
  directory = os.path.abspath(os.fspath(directory))
  fingerprint = mixture_fingerprint(splits)
  try:
    prepared = open_prepared(directory)
    if prepared.fingerprint == fingerprint:
      return prepared
  except ValueError:
    pass
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  prefix = f".tmp-{os.path.basename(directory)}-"
  for stale in os.listdir(parent):  # left by a killed preparation
    if stale.startswith(prefix):
      shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
  scratch = tempfile.mkdtemp(dir=parent, prefix=prefix)
  try:
    builder = VisatbMixture(splits=splits, data_dir=scratch, file_format="array_record")
    config = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards)
    with _progress_bar(progress):
      builder.download_and_prepare(download_config=config)
    built = os.fspath(builder.data_path)
    fileio.atomic_write_json(os.path.join(built, MARKER), {
        "format": FORMAT_VERSION, "fingerprint": fingerprint,
        "splits": {name: _split_info(samples) for name, samples in splits.items()}})
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(built, directory)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return open_prepared(directory)
