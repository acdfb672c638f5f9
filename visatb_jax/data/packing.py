"""Pack encoded samples into fixed-length rows: the Batch contract of ``docs/architecture.md``.

Per packed sample (segment) of tokens ``x[0..n-1]`` with label mask ``m[0..n-1]``:

* ``targets[t] = x[t+1]`` and ``loss_mask[t] = m[t+1]`` for ``t < n-1``; the last token of every
  segment has target 0 and loss 0, so nothing is ever predicted across a segment boundary;
* ``task_ids[t]`` is the sample's task where ``loss_mask[t]`` is 1 and -1 elsewhere;
* ``positions`` restart at 0 and ``segment_ids`` count 1, 2, ... per row; padding has
  ``input_ids = pad_id``, segment 0, position 0, target 0, loss 0, task -1;
* ``images[b, k]`` is the k-th image of row b in order of appearance (CLIP-normalised, zeros
  for unused slots), which is the order of the image-token blocks in ``input_ids``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from visatb_jax.data.images import load_images, normalize


@dataclasses.dataclass(frozen=True)
class Example:
  """One encoded sample ready for packing.

  ``images`` is a uint8 array ``[k, H, W, 3]`` (``k`` may be 0; the shape still tells H and W), or
  a sequence of ``k`` image file paths loaded when a batch is built (then ``image_size`` is needed).
  """
  input_ids: np.ndarray  # int32 [n]
  label_mask: np.ndarray  # bool [n]
  task_id: int
  images: np.ndarray | Sequence[str | os.PathLike]
  record: int = -1  # index of the sample in its split (a prepared mixture's record), -1 unknown

  @property
  def num_images(self) -> int:
    return len(self.images)

  def __len__(self) -> int:
    return len(self.input_ids)


class _FirstFitTree:
  """Leftmost row with room for (tokens, images), in O(max_images * log rows) per query.

  There is one max-segment-tree per image demand j = 0..max_images, whose leaf for a row holds its
  free tokens if the row has at least j free image slots, else -1. Rows not yet opened are empty, so
  "the leftmost row that fits" is first-fit with new rows opened on demand.
  """

  def __init__(self, num_rows: int, seq_len: int, max_images: int):
    self.size = 1
    while self.size < max(1, num_rows):
      self.size *= 2
    self.free_tokens = [seq_len] * self.size
    self.free_images = [max_images] * self.size
    self.trees = [[seq_len] * (2 * self.size) for _ in range(max_images + 1)]

  def find(self, tokens: int, images: int) -> int:
    tree = self.trees[images]
    if tree[1] < tokens:
      return -1
    node = 1
    while node < self.size:
      node = 2 * node if tree[2 * node] >= tokens else 2 * node + 1
    return node - self.size

  def take(self, row: int, tokens: int, images: int) -> None:
    self.free_tokens[row] -= tokens
    self.free_images[row] -= images
    for j, tree in enumerate(self.trees):
      node = row + self.size
      tree[node] = self.free_tokens[row] if self.free_images[row] >= j else -1
      node //= 2
      while node:
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
        node //= 2


def pack_rows(lengths: Sequence[int], image_counts: Sequence[int], seq_len: int,
              max_images: int) -> list[list[int]]:
  """Greedy first-fit in the given order: indices of the examples in each row.

  Each example goes to the first row with at least its length in free tokens and its image count
  in free image slots; a new row is opened when none has room.

  Raises:
    ValueError: an example longer than ``seq_len`` or with more than ``max_images`` images.
  """
  if len(lengths) != len(image_counts):
    raise ValueError(f"{len(lengths)} lengths but {len(image_counts)} image counts")
  for i, (n, k) in enumerate(zip(lengths, image_counts)):
    if not 0 < n <= seq_len:
      raise ValueError(f"example {i} has {n} tokens; expected 1..seq_len={seq_len}")
    if not 0 <= k <= max_images:
      raise ValueError(f"example {i} has {k} images; expected at most max_images={max_images}")
  tree = _FirstFitTree(len(lengths), seq_len, max_images)
  rows: list[list[int]] = []
  for i, (n, k) in enumerate(zip(lengths, image_counts)):
    row = tree.find(int(n), int(k))
    tree.take(row, int(n), int(k))
    if row == len(rows):
      rows.append([])
    rows[row].append(i)
  return rows


def _image_shape(examples: Sequence[Example], image_size: int | None) -> tuple[int, int]:
  if image_size is not None:
    return image_size, image_size
  for ex in examples:
    if isinstance(ex.images, np.ndarray):
      return int(ex.images.shape[1]), int(ex.images.shape[2])
  raise ValueError("image_size is required when no example holds an image array")


def _example_images(ex: Example, shape: tuple[int, int]) -> np.ndarray:
  if isinstance(ex.images, np.ndarray):
    if ex.images.shape[1:] != (*shape, 3):
      raise ValueError(f"image shape {ex.images.shape[1:]} differs from {(*shape, 3)}")
    return ex.images
  if shape[0] != shape[1]:
    raise ValueError(f"image files are loaded square, but the batch image shape is {shape}")
  return load_images(ex.images, shape[0])


def rows_to_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], *, seq_len: int,
                  max_images: int, pad_id: int, image_size: int | None = None
                  ) -> dict[str, np.ndarray]:
  """The Batch arrays for ``rows`` (indices into ``examples``), one batch row per entry.

  ``image_size`` sets H = W of the ``images`` array (default: from the examples' image arrays).
  """
  height, width = _image_shape(examples, image_size)
  b = len(rows)
  batch = {
      "input_ids": np.full((b, seq_len), pad_id, np.int32),
      "targets": np.zeros((b, seq_len), np.int32),
      "loss_mask": np.zeros((b, seq_len), np.float32),
      "task_ids": np.full((b, seq_len), -1, np.int32),
      "positions": np.zeros((b, seq_len), np.int32),
      "segment_ids": np.zeros((b, seq_len), np.int32),
      "images": np.zeros((b, max_images, height, width, 3), np.float32),
  }
  for r, row in enumerate(rows):
    start, slot = 0, 0
    for segment, index in enumerate(row, start=1):
      ex = examples[index]
      n, k = len(ex.input_ids), ex.num_images
      if start + n > seq_len or slot + k > max_images:
        raise ValueError(f"row {r} overflows seq_len={seq_len} or max_images={max_images}")
      ids = np.asarray(ex.input_ids, np.int32)
      span = slice(start, start + n)
      batch["input_ids"][r, span] = ids
      # The shift stays inside the segment: the last token predicts nothing.
      batch["targets"][r, start:start + n - 1] = ids[1:]
      shifted = np.asarray(ex.label_mask, bool)[1:]
      batch["loss_mask"][r, start:start + n - 1] = shifted
      batch["task_ids"][r, start:start + n - 1] = np.where(shifted, ex.task_id, -1)
      batch["positions"][r, span] = np.arange(n, dtype=np.int32)
      batch["segment_ids"][r, span] = segment
      if k:
        batch["images"][r, slot:slot + k] = normalize(_example_images(ex, (height, width)))
      start, slot = start + n, slot + k
  return batch


def pack(examples: Sequence[Example], *, seq_len: int, max_images: int, pad_id: int,
         image_size: int | None = None) -> dict[str, np.ndarray]:
  """All examples packed greedily (first-fit, given order) into as many rows as needed."""
  rows = pack_rows([len(ex) for ex in examples], [ex.num_images for ex in examples], seq_len,
                   max_images)
  return rows_to_batch(examples, rows, seq_len=seq_len, max_images=max_images, pad_id=pad_id,
                       image_size=image_size)


class PackedDataset:
  """Rows packed once; batch ``step`` is a pure function of ``(seed, step, batch_size)``.

  The examples are shuffled with ``seed`` (so rows mix tasks even when the input is grouped by
  task), then packed first-fit in order of decreasing length (stable, so equal lengths keep the
  shuffled order): long samples open the rows and short ones fill their gaps, which on a
  LLaVA-like length mix gives 94 % non-pad tokens in rows of 2048 where first-fit in arrival
  order gives 90 % (BENCHMARKS.md, B5). Every epoch visits the rows in its own seeded permutation, so
  batches still mix lengths and tasks.
  Batch ``step`` holds rows ``[step * B, (step + 1) * B)`` of the concatenated epoch stream, so a
  resumed run only needs the step number.
  """

  def __init__(self, examples: Sequence[Example], *, seq_len: int, max_images: int, pad_id: int,
               seed: int, shuffle_examples: bool = True, image_size: int | None = None):
    if not examples:
      raise ValueError("PackedDataset needs at least one example")
    self.examples = list(examples)
    self.seq_len, self.max_images, self.pad_id = seq_len, max_images, pad_id
    self.seed, self.image_size = seed, image_size
    order = np.arange(len(self.examples))
    if shuffle_examples:
      order = np.random.default_rng([seed, 0]).permutation(len(self.examples))
    lengths = np.asarray([len(self.examples[i]) for i in order])
    order = order[np.argsort(-lengths, kind="stable")]
    rows = pack_rows([len(self.examples[i]) for i in order],
                     [self.examples[i].num_images for i in order], seq_len, max_images)
    self.rows = [[int(order[i]) for i in row] for row in rows]
    self._permutations: dict[int, np.ndarray] = {}

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  @property
  def tokens_per_row(self) -> np.ndarray:
    """Non-pad tokens of every row, int64 [num_rows]."""
    return np.asarray([sum(len(self.examples[i]) for i in row) for row in self.rows], np.int64)

  def packing_efficiency(self) -> float:
    """Fraction of non-pad tokens over all rows."""
    return float(self.tokens_per_row.sum() / (self.num_rows * self.seq_len))

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """Row order of one epoch (seeded by ``(seed, epoch)``)."""
    if epoch not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(
          self.num_rows)
    return self._permutations[epoch]

  def row_indices(self, step: int, batch_size: int) -> list[int]:
    """Indices into ``self.rows`` of batch ``step``."""
    if step < 0 or batch_size < 1:
      raise ValueError(f"need step >= 0 and batch_size >= 1, got {step}, {batch_size}")
    stream = range(step * batch_size, (step + 1) * batch_size)
    return [int(self.epoch_permutation(g // self.num_rows)[g % self.num_rows]) for g in stream]

  def epoch_of(self, step: int, batch_size: int) -> float:
    """Fractional epoch reached at the end of batch ``step``."""
    return (step + 1) * batch_size / self.num_rows

  def batch_at(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The Batch arrays of training step ``step``."""
    rows = [self.rows[i] for i in self.row_indices(step, batch_size)]
    return rows_to_batch(self.examples, rows, seq_len=self.seq_len, max_images=self.max_images,
                         pad_id=self.pad_id, image_size=self.image_size)
