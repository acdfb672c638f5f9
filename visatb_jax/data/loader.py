"""Grain loader over a prepared mixture: shuffle, shard per host, encode, pack, batch; exact resume.

The pipeline of one host (``make_dataset``)::

  tfds array_record source (prepare.py), or the records ``record_indices`` of it
    -> [process_index::process_count]   per-host shard: disjoint, their union is every record
    -> shuffle(seed).repeat(num_epochs) a new permutation every epoch (grain folds the epoch in)
    -> map(EncodeRecord)                image bytes -> uint8 (the image format), chat template +
                                        tokenizer with each image's token count; a sample too
                                        long for ``max_len`` becomes None (dropped)
    -> to_iter_dataset(read threads)
    -> PackStepsIterDataset             each step: the next ``batch_size / process_count``
                                        samples, best-fill packed (``packing.pack_rows_best_fill``)
                                        and padded with empty rows to
                                        ``rows_per_step / process_count`` rows
                                        (``packing.rows_to_batch``: the Batch contract, image
                                        arrays and positions from the image format)
    -> mp_prefetch(worker_count)        optional worker processes, each running all of the above
                                        on its own slice of the shuffled stream

``batch_size`` counts samples, as the paper's batch does; ``rows_per_step`` is the static number
of rows a step is padded to (None: one row a sample, which always fits). A step's samples run
through epoch boundaries (a stream), so a run of E epochs of N samples is ceil(E N / batch_size)
steps. :func:`rows_per_step` computes the least rows that fit every step of a run from the
samples' lengths, by replaying grain's order of the records (``stream_steps``), without reading
them; a step that needs more rows than ``rows_per_step`` raises, naming it.

Exact resume: a step consumes exactly its samples, so the packer's state is its input iterator's
state after the last step: a fresh iterator continues from it and packs the next step exactly as
an uninterrupted one. Every state is made of dicts, lists and ints (JSON); :class:`Loader` adds the
settings that must not change across a resume (seed, batch, rows, workers, shard, ...), and
``set_state`` refuses a state saved under other settings. With worker processes the batch order
depends on ``worker_count`` (each worker packs its own slice of the stream, and the steps come from
the workers in turn), so it is one of those settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Self

import grain
import numpy as np

from visatb_jax.data import image_format as image_format_lib
from visatb_jax.data import packing, prepare
from visatb_jax.data import template as template_lib

# 2: steps of batch_size samples padded to rows_per_step rows (1: batch_size packed rows).
STATE_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """Settings of a loader; all but ``worker_buffer_size`` and ``read_threads`` shape the batches.

  ``image_format`` (``image_format.py``) says how the model sees images; None is LLaVA's
  ``SquareImages(image_size, num_image_tokens)``, and with a format given those two are unused.
  """
  tasks: tuple[str, ...]  # task id = position in this tuple (config.task_order)
  seq_len: int
  max_images: int
  image_size: int
  num_image_tokens: int
  max_len: int  # longest encoded sample (truncation rule of template.py)
  batch_size: int  # global samples per step, over all hosts
  seed: int
  template: str = template_lib.DEFAULT_TEMPLATE
  system: str | None = None  # None: the template's default system prompt
  # Global rows every step is padded to (static shapes under jit); None: batch_size, one row a
  # sample, which always fits. `rows_per_step()` gives the least that fits a run.
  rows_per_step: int | None = None
  num_epochs: int | None = None  # None: repeat for ever
  worker_count: int = 0  # worker processes (0: everything in this process)
  worker_buffer_size: int = 2  # batches each worker prepares ahead
  read_threads: int = 2  # threads reading + encoding records in each process
  image_format: Any = None  # None: SquareImages(image_size, num_image_tokens)

  def __post_init__(self):
    if self.max_len > self.seq_len:
      raise ValueError(f"max_len={self.max_len} exceeds seq_len={self.seq_len}")
    if self.batch_size < 1 or self.rows < 1:
      raise ValueError(f"batch_size={self.batch_size} and rows_per_step={self.rows_per_step} "
                       "must be >= 1")
    if not self.tasks:
      raise ValueError("LoaderConfig needs at least one task")
    template_lib.get_template(self.template)

  @property
  def rows(self) -> int:
    """Global rows of every step: ``rows_per_step``, or ``batch_size`` when unset."""
    return self.batch_size if self.rows_per_step is None else int(self.rows_per_step)

  @property
  def resolved_image_format(self) -> Any:
    """``image_format``, or the square format of ``image_size`` and ``num_image_tokens``."""
    if self.image_format is not None:
      return self.image_format
    return image_format_lib.SquareImages(self.image_size, self.num_image_tokens)


def decode_image(data: bytes, size: int, *, name: str = "image") -> np.ndarray:
  """Image file bytes -> uint8 ``[size, size, 3]``, exactly as ``images.load_image`` does it."""
  return image_format_lib.SquareImages(size, 0).decode(data, name=name)


class EncodeRecord(grain.transforms.Map):
  """A prepared record -> :class:`packing.Example`, or None when it does not fit ``max_len``."""

  def __init__(self, tok: Any, config: LoaderConfig):
    self.tok, self.config = tok, config
    self.image_format = config.resolved_image_format
    self.task_ids = {t: i for i, t in enumerate(config.tasks)}

  def map(self, record: Any) -> packing.Example | None:
    sample = prepare.decode_record(record)
    cfg = self.config
    task = self.task_ids.get(sample["task"])
    if task is None:
      raise ValueError(f"sample {sample['id']!r} has task {sample['task']!r}, which is not one "
                       f"of the loader's tasks {list(cfg.tasks)}")
    # Images first: under a native-resolution format each one's token count follows its size.
    fmt = self.image_format
    images = [fmt.decode(data, name=f"{path} (sample {sample['id']!r})")
              for data, path in zip(sample["images"], sample["image_paths"])]
    enc = template_lib.encode_conversation(
        sample["conversations"], self.tok, num_image_tokens=[fmt.num_tokens(im) for im in images],
        max_len=cfg.max_len, system=cfg.system, template=cfg.template)
    if enc is None:
      return None
    if enc.num_images != len(images):
      raise ValueError(f"sample {sample['id']!r} has {enc.num_images} image placeholders for "
                       f"{len(images)} images")
    return packing.Example(enc.input_ids, enc.label_mask, task, images)


class _PackStepsIterator(grain.DatasetIterator):
  """Steps of ``batch_size`` samples packed into ``rows`` rows; see the module docstring."""

  def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, rows: int, seq_len: int,
               max_images: int, pad_id: int, image_format: Any = None,
               image_size: int | None = None):
    super().__init__(parent)
    self._batch_size, self._rows, self._seq_len = batch_size, rows, seq_len
    self._max_images, self._pad_id = max_images, pad_id
    self._image_format = packing.resolve_image_format(image_format, image_size)
    self._steps = 0  # steps given since the start or the last set_state (for messages)

  def __next__(self) -> dict[str, np.ndarray]:
    examples = list(itertools.islice(self._parent, self._batch_size))
    if not examples:  # the end of a finite stream; its last step may hold fewer samples
      raise StopIteration
    rows = packing.pack_rows_best_fill([len(ex) for ex in examples],
                                       [ex.num_images for ex in examples], self._seq_len,
                                       self._max_images)
    self._steps += 1
    rows = packing.pad_rows(rows, self._rows, where=(
        f"a step of {len(examples)} samples (this host's step {self._steps} since the start or "
        "the resume)"))
    return packing.rows_to_batch(examples, rows, seq_len=self._seq_len,
                                 max_images=self._max_images, pad_id=self._pad_id,
                                 image_format=self._image_format)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._steps = 0


class PackStepsIterDataset(grain.IterDataset):
  """:class:`packing.Example` stream -> Batch dicts: ``batch_size`` samples a step, packed into
  ``rows`` rows (empty rows pad a step that needs fewer).

  ``image_format`` (or the square format of ``image_size``) builds the image arrays and positions.
  """

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, rows: int, seq_len: int,
               max_images: int, pad_id: int, image_format: Any = None,
               image_size: int | None = None):
    super().__init__(parent)
    self._kwargs = {"batch_size": batch_size, "rows": rows, "seq_len": seq_len,
                    "max_images": max_images, "pad_id": pad_id, "image_format": image_format,
                    "image_size": image_size}

  def __iter__(self) -> _PackStepsIterator:
    return _PackStepsIterator(self._parent.__iter__(), **self._kwargs)


class _Subset:
  """The records ``indices`` of a random-access source, as a random-access source."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    if self.indices.ndim != 1 or not len(self.indices):
      raise ValueError("record_indices must be a non-empty list of record indices")
    if self.indices.min() < 0 or self.indices.max() >= len(source):
      raise ValueError(f"record_indices must lie in [0, {len(source)}), got "
                       f"[{self.indices.min()}, {self.indices.max()}]")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]


def host_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """``(index, count)`` of this host; defaults from ``jax.process_index()/process_count()``."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def _mark_absl_flags_parsed() -> None:
  """Lets grain's worker processes read their absl flags outside an absl app (tests, scripts).

  grain 0.2.18 reads ``--grain_enable_multiprocess_worker_profiling`` when it starts workers and
  raises ``UnparsedFlagAccessError`` unless ``absl.app.run`` (``launch.py``) parsed the flags; the
  defaults are what we want, so marking the flags parsed is enough.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _host_stream(ds: grain.MapDataset, config: LoaderConfig, process_index: int,
                 process_count: int) -> grain.MapDataset:
  """This host's records in the order it reads them: its shard, reshuffled every epoch."""
  ds = ds[process_index::process_count]
  return ds.shuffle(seed=config.seed).repeat(config.num_epochs)


def stream_steps(num_records: int, config: LoaderConfig, steps: int, *, process_index: int = 0,
                 process_count: int = 1) -> list[np.ndarray]:
  """Indices (into the source, or into ``record_indices``) of the samples of this host's first
  ``steps`` steps, in the order the loader reads them, computed from grain's order alone.

  Assumes no record is dropped (too long for ``max_len``). With worker processes, worker w reads
  the slice ``[w::worker_count]`` of the host's stream and the steps come from the workers in
  turn. Stops early at the end of a finite stream.
  """
  order = _host_stream(grain.MapDataset.range(num_records), config, process_index, process_count)
  workers = max(1, config.worker_count)
  size = config.batch_size // process_count
  out = []
  for k in range(steps):
    stream = order.slice(slice(k % workers, None, workers)) if workers > 1 else order
    start = (k // workers) * size
    idx = [int(stream[i]) for i in range(start, min(start + size, len(stream)))]
    if not idx:
      break
    out.append(np.asarray(idx, np.int64))
  return out


def rows_per_step(lengths: Sequence[int], image_counts: Sequence[int], config: LoaderConfig,
                  steps: int, *, process_count: int = 1, multiple: int = 1) -> int:
  """The least global ``rows_per_step`` that fits every one of a run's ``steps`` steps on every
  host, rounded up to a multiple of ``multiple`` (the batch shards x micro-batches) and of the
  hosts. ``lengths`` and ``image_counts`` are those of the encoded records, in source order (of
  ``record_indices`` when given); none may be dropped.
  """
  lengths = np.asarray(lengths, np.int64)
  image_counts = np.asarray(image_counts, np.int64)
  most = 1
  for p in range(process_count):
    for idx in stream_steps(len(lengths), config, steps, process_index=p,
                            process_count=process_count):
      most = max(most, len(packing.pack_rows_best_fill(lengths[idx], image_counts[idx],
                                                       config.seq_len, config.max_images)))
  return packing.round_up(most * process_count, math.lcm(multiple, process_count))


def make_dataset(source: Any, tok: Any, config: LoaderConfig, *, process_index: int,
                 process_count: int, record_indices: Sequence[int] | None = None
                 ) -> grain.IterDataset:
  """The grain pipeline of one host (see the module docstring); yields Batch dicts."""
  for name, value in (("batch_size", config.batch_size), ("rows_per_step", config.rows)):
    if value % process_count:
      raise ValueError(f"{name}={value} is not divisible by the {process_count} hosts")
  if record_indices is not None:
    source = _Subset(source, record_indices)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} records cannot be shared by {process_count} hosts")
  ds = _host_stream(grain.MapDataset.source(source), config, process_index, process_count)
  ds = ds.map(EncodeRecord(tok, config))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=max(1, 4 * config.read_threads)))
  ds = PackStepsIterDataset(
      ds, batch_size=config.batch_size // process_count, rows=config.rows // process_count,
      seq_len=config.seq_len, max_images=config.max_images, pad_id=int(tok.pad_token_id),
      image_format=config.resolved_image_format)
  if config.worker_count:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  return ds


class Loader:
  """Iterator of this host's Batch dicts with a JSON state for exact resumption.

  ``source`` is a random-access source of prepared records
  (``prepare.PreparedMixture.data_source(split)``); ``record_indices`` picks a subset of it (e.g.
  the mini subsets of a preparation run). Each batch holds the next
  ``config.batch_size // process_count`` samples of this host's stream, packed into
  ``config.rows // process_count`` rows. Call :meth:`close` (or use ``with``) to stop worker
  processes.
  """

  def __init__(self, source: Any, tok: Any, config: LoaderConfig, *,
               process_index: int | None = None, process_count: int | None = None,
               record_indices: Sequence[int] | None = None):
    self.config = config
    self.process_index, self.process_count = host_shard(process_index, process_count)
    self._dataset = make_dataset(source, tok, config, process_index=self.process_index,
                                 process_count=self.process_count, record_indices=record_indices)
    self._iterator: grain.DatasetIterator | None = None
    self._settings = {
        "tasks": list(config.tasks), "seq_len": config.seq_len, "max_images": config.max_images,
        "image_size": config.image_size, "num_image_tokens": config.num_image_tokens,
        "max_len": config.max_len, "batch_size": config.batch_size, "seed": config.seed,
        "rows_per_step": config.rows,
        "template": config.template, "system": config.system,
        "num_epochs": config.num_epochs, "worker_count": config.worker_count,
        "process_index": self.process_index, "process_count": self.process_count,
        "num_records": len(source) if record_indices is None else len(record_indices),
        "image_format": image_format_lib.describe(config.resolved_image_format)}

  @property
  def iterator(self) -> grain.DatasetIterator:
    if self._iterator is None:
      self._iterator = iter(self._dataset)
    return self._iterator

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned, as JSON-serialisable data."""
    return {"format": STATE_FORMAT, "settings": dict(self._settings),
            "iterator": self.iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state`` (from :meth:`get_state` of a loader with the same settings).

    Raises:
      ValueError: a state of another format or saved under other settings (naming them).
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a loader state of format {STATE_FORMAT}")
    saved = dict(state.get("settings", {}))
    # States saved before formats existed were all LLaVA's square images.
    saved.setdefault("image_format", {"class": "SquareImages",
                                      "image_size": saved.get("image_size"),
                                      "num_image_tokens": saved.get("num_image_tokens")})
    changed = sorted(k for k in set(saved) | set(self._settings)
                     if saved.get(k) != self._settings.get(k))
    if changed:
      raise ValueError("the loader state was saved with other settings: " + ", ".join(
          f"{k}={saved.get(k)!r} (now {self._settings.get(k)!r})" for k in changed))
    self.iterator.set_state(state["iterator"])

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
