"""Pack encoded samples into fixed-length rows: the Batch contract of ``docs/architecture.md``.

Per packed sample (segment) of tokens ``x[0..n-1]`` with label mask ``m[0..n-1]``:

* ``targets[t] = x[t+1]`` and ``loss_mask[t] = m[t+1]`` for ``t < n-1``; the last token of every
  segment has target 0 and loss 0, so nothing is ever predicted across a segment boundary;
* ``task_ids[t]`` is the sample's task where ``loss_mask[t]`` is 1 and -1 elsewhere;
* ``positions`` restart at 0 and ``segment_ids`` count 1, 2, ... per row; padding has
  ``input_ids = pad_id``, segment 0, position 0, target 0, loss 0, task -1;
* ``images[b, k]`` is the k-th image of row b in order of appearance (zeros for unused slots),
  which is the order of the image-token blocks in ``input_ids``.

The image arrays and the positions follow the batch's image format (``image_format.py``): LLaVA's
:class:`~visatb_jax.data.image_format.SquareImages` (the default) gives CLIP-normalised pixels
``images`` [B, M, S, S, 3] and ``positions`` [B, L]; Qwen2-VL's
:class:`~visatb_jax.data.image_format.NativeImages` gives per-slot patches ``images``
[B, M, P, patch_dim], their grids ``image_grid`` [B, M, 3] and M-RoPE ``positions`` [B, 3, L],
which restart at 0 in every segment too. Packing itself only sees token lengths and image counts:
an image's token count is already part of its sample's length.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from visatb_jax.data.image_format import SquareImages


@dataclasses.dataclass(frozen=True)
class Example:
  """One encoded sample ready for packing.

  ``images`` is a uint8 array ``[k, H, W, 3]`` (``k`` may be 0; the shape still tells H and W), or
  a sequence of ``k`` items, each a uint8 array ``[h, w, 3]`` as the image format loads it (sizes
  may differ: native resolution) or an image file path, loaded by the image format when a batch
  is built (then an ``image_format`` or ``image_size`` is needed).
  """
  input_ids: np.ndarray  # int32 [n]
  label_mask: np.ndarray  # bool [n]
  task_id: int
  images: np.ndarray | Sequence[np.ndarray | str | os.PathLike]
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


def _checked_items(lengths: Sequence[int], image_counts: Sequence[int], seq_len: int,
                   max_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Lengths and image counts as int64 arrays; ValueError for the first example that cannot fit."""
  if len(lengths) != len(image_counts):
    raise ValueError(f"{len(lengths)} lengths but {len(image_counts)} image counts")
  n = np.asarray(lengths, np.int64).reshape(-1)
  k = np.asarray(image_counts, np.int64).reshape(-1)
  bad_tokens = (n <= 0) | (n > seq_len)
  bad = np.flatnonzero(bad_tokens | (k < 0) | (k > max_images))
  if bad.size:
    i = int(bad[0])
    if bad_tokens[i]:
      raise ValueError(f"example {i} has {n[i]} tokens; expected 1..seq_len={seq_len}")
    raise ValueError(f"example {i} has {k[i]} images; expected at most max_images={max_images}")
  return n, k


def pack_rows(lengths: Sequence[int], image_counts: Sequence[int], seq_len: int,
              max_images: int) -> list[list[int]]:
  """Greedy first-fit in the given order: indices of the examples in each row.

  Each example goes to the first row with at least its length in free tokens and its image count
  in free image slots; a new row is opened when none has room.

  Raises:
    ValueError: an example longer than ``seq_len`` or with more than ``max_images`` images.
  """
  _checked_items(lengths, image_counts, seq_len, max_images)
  tree = _FirstFitTree(len(lengths), seq_len, max_images)
  rows: list[list[int]] = []
  for i, (n, k) in enumerate(zip(lengths, image_counts)):
    row = tree.find(int(n), int(k))
    tree.take(row, int(n), int(k))
    if row == len(rows):
      rows.append([])
    rows[row].append(i)
  return rows


class _BestFill:
  """The state of :func:`pack_rows_best_fill`: the items left, bucketed by (image class, length).

  Image class ``c`` holds the items with ``image_values[c]`` images (only counts that occur, in
  increasing order). ``order`` lists the item indices sorted by (images, length, index), so bucket
  ``(c, L)`` is ``order[start[c, L]:start[c, L] + total]`` and its items left are those from
  ``taken[c, L]`` on, earliest index first. ``count[c, L]`` is how many are left,
  ``prev[c, L]`` the largest length <= L with items left in class c (-seq_len - 1 when none)
  and ``avail[c]`` the sorted lengths with items left. A row is planned on "virtual" takes (a
  dict ``(c, L) -> items``) and only the chosen plan is committed. The opener and the greedy fill
  give equal lengths to the highest image class with one left (the most images), and a bucket
  gives its earliest index.
  """

  def __init__(self, lengths: np.ndarray, images: np.ndarray, seq_len: int, max_images: int):
    self.seq_len, self.max_images, self.n = seq_len, max_images, len(lengths)
    self.image_values, cls = np.unique(images, return_inverse=True)
    self.order = np.lexsort((np.arange(self.n), lengths, cls))
    shape = (len(self.image_values), seq_len + 1)
    self.count = np.zeros(shape, np.int64)
    np.add.at(self.count, (cls, lengths), 1)
    self.start = (np.cumsum(self.count.ravel()) - self.count.ravel()).reshape(shape)
    self.taken = np.zeros(shape, np.int64)
    # "None" is so negative that a pair sum with it is negative too.
    arange = np.arange(seq_len + 1)
    self.prev = np.maximum.accumulate(np.where(self.count > 0, arange, -seq_len - 1), axis=1)
    self.avail = [np.flatnonzero(row) for row in self.count]
    self.left = self.count.sum(axis=1)
    self.live = list(range(len(self.image_values)))  # classes with items left

  def _longest(self, c: int, r: int, virtual: dict) -> int:
    """The longest length <= r with items left in class c after the virtual takes (0: none)."""
    length = int(self.prev[c, r])
    while length > 0 and self.count[c, length] - virtual.get((c, length), 0) <= 0:
      length = int(self.prev[c, length - 1])
    return max(length, 0)

  def fill(self, r: int, m: int, virtual: dict) -> tuple[list, int]:
    """Greedy fill of r free tokens and m image slots: the takes ``(c, L, items)`` and free left."""
    takes = []
    while r > 0:
      best_len, best_c = 0, -1
      for c in self.live:
        if self.image_values[c] > m:
          break
        length = self._longest(c, r, virtual)
        # Classes come in increasing image count, so ">=" gives equal lengths to the most images.
        if length and length >= best_len:
          best_len, best_c = length, c
      if best_c < 0:
        break
      k = int(self.image_values[best_c])
      key = (best_c, best_len)
      # The same bucket would win again until it runs out or the row is full: take those at once.
      t = min(int(self.count[key]) - virtual.get(key, 0), r // best_len)
      if k:
        t = min(t, m // k)
      virtual[key] = virtual.get(key, 0) + t
      takes.append((best_c, best_len, t))
      r, m = r - t * best_len, m - t * k
    return takes, r

  def best_pair(self, r: int, m: int) -> tuple[int, int, int, int] | None:
    """``(ca, a, cb, b)``: two items left, of most tokens together within (r, m); ties: earliest
    indices (the smallest (earlier, later) index pair)."""
    best_sum, ties = 0, []  # ties: (ca, a, cb, b), the earliest of each class pair
    live, prev, values = self.live, self.prev, self.image_values
    for ia, ca in enumerate(live):
      ka = int(values[ca])
      if 2 * ka > m:
        break
      longest_a = int(prev[ca, r - 1])
      if longest_a <= 0:
        continue
      a = self.avail[ca]
      a = a[:np.searchsorted(a, longest_a, side="right")]
      for cb in live[ia:]:
        kb = int(values[cb])
        if ka + kb > m:
          break
        if longest_a + int(prev[cb, r - 1]) < best_sum:
          continue
        # The longest partner of every candidate a: the largest length <= r - a left in cb
        # (a negative sum where there is none).
        b = prev[cb].take(r - a)
        if cb == ca:  # The partner may be a itself only when its bucket holds two items.
          same = np.flatnonzero(b == a)
          if same.size:
            alone = same[self.count[ca].take(a.take(same)) == 1]
            b[alone] = prev[cb].take(a.take(alone) - 1)
        sums = a + b
        s = int(sums.max())
        if s <= 0 or s < best_sum:
          continue
        if s > best_sum:
          best_sum, ties = s, []
        hit = np.flatnonzero(sums == s)
        if hit.size > 1:  # The earliest of this class pair, then (below) of all class pairs.
          ha, hb = a.take(hit), b.take(hit)
          i = self.order[self.start[ca].take(ha) + self.taken[ca].take(ha)]
          j = self.order[self.start[cb].take(hb) + self.taken[cb].take(hb)
                         + ((ca == cb) & (ha == hb))]
          hit = hit[[int((np.minimum(i, j) * self.n + np.maximum(i, j)).argmin())]]
        ties.append((ca, int(a[hit[0]]), cb, int(b[hit[0]])))
    if len(ties) <= 1:
      return ties[0] if ties else None

    def earliest(pair):
      ca, a, cb, b = pair
      i = int(self.order[self.start[ca, a] + self.taken[ca, a]])
      j = int(self.order[self.start[cb, b] + self.taken[cb, b] + (ca == cb and a == b)])
      return min(i, j), max(i, j)
    return min(ties, key=earliest)

  def commit(self, takes: list) -> list[int]:
    """Removes the takes from the items left; their indices."""
    indices, emptied = [], []
    for c, length, t in takes:
      first = int(self.start[c, length] + self.taken[c, length])
      indices.extend(self.order[first:first + t].tolist())
      self.taken[c, length] += t
      self.count[c, length] -= t
      self.left[c] -= t
      if not self.count[c, length]:
        emptied.append((c, length))
    for c, length in emptied:
      avail = self.avail[c]
      pos = int(np.searchsorted(avail, length))
      end = int(avail[pos + 1]) if pos + 1 < len(avail) else self.seq_len + 1
      self.prev[c, length:end] = self.prev[c, length - 1]
      self.avail[c] = np.delete(avail, pos)
    if emptied:
      self.live = [c for c in self.live if self.left[c]]
    return indices

  def next_row(self) -> list[int]:
    # The longest item left opens the row (ties: most images, earliest index).
    length, c = max((int(self.prev[c, self.seq_len]), c) for c in self.live)
    row = self.commit([(c, length, 1)])
    r, m = self.seq_len - length, self.max_images - int(self.image_values[c])
    takes, free = self.fill(r, m, {})
    if free and len(takes) and (pair := self.best_pair(r, m)) is not None:
      ca, a, cb, b = pair
      first = [(ca, a, 1), (cb, b, 1)]
      a_first = [takes[0][:2]] * min(takes[0][2], 2) + [t[:2] for t in takes[1:2]]
      if sorted(a_first[:2]) != sorted([(ca, a), (cb, b)]):  # Else B is A: same greedy fill.
        virtual = dict(collections.Counter([(ca, a), (cb, b)]))
        rest, pair_free = self.fill(r - a - b, m - int(self.image_values[ca])
                                    - int(self.image_values[cb]), virtual)
        if pair_free < free:
          takes = first + rest
    return sorted(row + self.commit(takes))


def pack_rows_best_fill(lengths: Sequence[int], image_counts: Sequence[int], seq_len: int,
                        max_images: int) -> list[list[int]]:
  """Rows built one at a time, each as full as a greedy fill or a best pair makes it.

  Each row opens with the longest item left (ties: the most images, then the earliest index),
  leaving r free tokens and m free image slots. Plan A fills them greedily: the longest item left
  that fits (same ties), again and again. Plan B first takes the best pair (the two items left with
  the most tokens together within r and m; ties: the smallest (earlier, later) index pair), then
  fills greedily as A. The row takes whichever plan leaves fewer free tokens (a tie: A). Items of
  equal length and image count are always taken earliest index first, so the rows are a pure
  function of the inputs. Every row lists its indices in increasing order; rows come in the order
  they are built (longest opener first).

  Plan A alone is first-fit decreasing (FFD) over the items ordered by (length down, images down,
  index): an item goes to the first row with room exactly when it is the longest item left that
  fits that row. Plan B is why best fill beats FFD on LLaVA-like mixes. 90 % of the samples
  there are one image (576 tokens) plus text, 616-1475 tokens, two thirds of them within 70
  tokens of a third of a 2048-token row. FFD gives a row the longest samples that still fit, one
  at a time, so the last one is chosen regardless of the gap it leaves; that gap is then shorter
  than any image sample, and only the few text-only samples can fill it. The pair that best
  complements the opener closes most rows with three samples and almost no gap (B5: 99.0 %
  non-pad tokens where FFD reaches 94.2 %).

  Equal lengths go to the most images first, so the image-heavy items are placed while rows
  still have image slots and the text-only ones are kept for the gaps the cap leaves later. It is
  still a heuristic: a fuller row now can leave items that pack worse later, so it can need one
  row more than FFD (sorted by length, then index) now and then, on text-only items or where the
  image cap binds (tests/data/test_packing.py has an example of each). Of random cases where the
  cap binds, it needed more in 0.1-0.4 % of 5,000 small ones (4-30 items, rows of 8-32 tokens and 1-3
  images) and 0.4 % of 1,000 larger ones (30-300 items, rows of 32-256 tokens and 1-6 images),
  never by more than one row, and it needed fewer rows in 27 % and 83 %. Fewest images first, the
  earlier tie rule, used the text-only items up early and left the image-heavy ones to the end,
  where the cap keeps them apart: it needed more rows in 28 % and 84 % of the same cases, by up
  to 4 and 33 rows.

  Bucketing by (images, length) keeps the work per row to a few numpy calls on arrays of at most
  seq_len per pair of image counts, plus a few per image count for every distinct length a fill
  takes, so time grows linearly with the number of items (100k LLaVA-like samples: ~2.5 s).

  Raises:
    ValueError: an example longer than ``seq_len`` or with more than ``max_images`` images.
  """
  n, k = _checked_items(lengths, image_counts, seq_len, max_images)
  if not n.size:
    return []
  state = _BestFill(n, k, seq_len, max_images)
  rows = []
  while state.live:
    rows.append(state.next_row())
  return rows


def _image_size(examples: Sequence[Example]) -> int:
  """H = W of the examples' image arrays (the default square format's size)."""
  for ex in examples:
    arrays = [ex.images] if isinstance(ex.images, np.ndarray) else [
        im for im in ex.images if isinstance(im, np.ndarray)][:1]
    for a in arrays:
      height, width = a.shape[-3:-1]
      if height != width:
        raise ValueError(f"images of shape {a.shape[-3:]} are not square; pass an image_format")
      return int(height)
  raise ValueError("image_size is required when no example holds an image array")


def resolve_image_format(image_format: Any, image_size: int | None,
                         examples: Sequence[Example] = ()) -> Any:
  """The batch's image format: ``image_format``, else LLaVA's square images of ``image_size``
  (default: the size of the examples' image arrays).

  The square format's token count plays no part in building a batch (the samples are encoded
  already), so it is left 0 here.
  """
  if image_format is not None:
    if image_size is not None:
      raise ValueError("give image_format or image_size, not both")
    return image_format
  return SquareImages(_image_size(examples) if image_size is None else image_size, 0)


def _example_images(ex: Example, image_format: Any) -> list[np.ndarray]:
  """The example's images as the format loads them, in order."""
  return [im if isinstance(im, np.ndarray) else image_format.load(im) for im in ex.images]


def rows_to_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], *, seq_len: int,
                  max_images: int, pad_id: int, image_size: int | None = None,
                  image_format: Any = None) -> dict[str, np.ndarray]:
  """The Batch arrays for ``rows`` (indices into ``examples``), one batch row per entry.

  ``image_format`` (``image_format.py``) decides the image arrays and the positions; None is
  ``SquareImages`` of ``image_size`` (default: H = W of the examples' image arrays).
  """
  fmt = resolve_image_format(image_format, image_size, examples)
  b = len(rows)
  batch = {
      "input_ids": np.full((b, seq_len), pad_id, np.int32),
      "targets": np.zeros((b, seq_len), np.int32),
      "loss_mask": np.zeros((b, seq_len), np.float32),
      "task_ids": np.full((b, seq_len), -1, np.int32),
      "positions": np.zeros(fmt.positions_shape(b, seq_len), np.int32),
      "segment_ids": np.zeros((b, seq_len), np.int32),
  }
  for name, (shape, dtype) in fmt.batch_shapes(b, max_images).items():
    batch[name] = np.zeros(shape, dtype)
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
      batch["segment_ids"][r, span] = segment
      images = _example_images(ex, fmt) if k else []
      batch["positions"][r, ..., span] = fmt.positions(ids, images)
      for j, image in enumerate(images):
        fmt.fill(batch, r, slot + j, image)
      start, slot = start + n, slot + k
  return batch


def pack(examples: Sequence[Example], *, seq_len: int, max_images: int, pad_id: int,
         image_size: int | None = None, image_format: Any = None) -> dict[str, np.ndarray]:
  """All examples packed greedily (first-fit, given order) into as many rows as needed."""
  rows = pack_rows([len(ex) for ex in examples], [ex.num_images for ex in examples], seq_len,
                   max_images)
  return rows_to_batch(examples, rows, seq_len=seq_len, max_images=max_images, pad_id=pad_id,
                       image_size=image_size, image_format=image_format)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
  """Optimizer steps of one epoch of ``num_samples`` in steps of ``batch_size`` samples: the last
  one takes the remainder, as a PyTorch DataLoader without ``drop_last`` (the paper's runs)."""
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
  return -(-num_samples // batch_size)


def num_steps(num_samples: int, batch_size: int, epochs: float) -> int:
  """Optimizer steps of ``epochs`` epochs (at least 1): ``ceil(epochs * steps_per_epoch)``, so
  one epoch is ``ceil(num_samples / batch_size)`` steps."""
  return max(1, math.ceil(float(epochs) * steps_per_epoch(num_samples, batch_size) - 1e-9))


def round_up(value: int, multiple: int) -> int:
  """The least multiple of ``multiple`` that is >= ``value`` (and >= ``multiple``)."""
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  return max(1, -(-int(value) // multiple)) * multiple


def rows_for_samples(samples: int, samples_per_row: float, multiple: int = 1) -> int:
  """Rows of a step of ``samples`` samples at ``samples_per_row``, rounded up to ``multiple``: a
  planning figure where the data is not at hand (the dry run); training packs the data."""
  if not samples_per_row > 0:
    raise ValueError(f"samples_per_row must be > 0, got {samples_per_row}")
  return round_up(math.ceil(samples / samples_per_row - 1e-9), multiple)


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int, where: str = "step") -> list[list[int]]:
  """``rows`` followed by empty rows (all padding: no loss) up to ``num_rows``.

  Raises:
    ValueError: ``rows`` are more than ``num_rows`` (naming ``where``).
  """
  if len(rows) > num_rows:
    raise ValueError(f"{where} packs into {len(rows)} rows, more than rows_per_step={num_rows}")
  return [list(r) for r in rows] + [[] for _ in range(num_rows - len(rows))]


class PackedDataset:
  """Steps of ``batch_size`` samples, each packed into rows; batch ``step`` is a pure function of
  ``(seed, step)``, so a resumed run only needs the step number.

  ``batch_size`` counts samples, as the paper's 128 does. Epoch e visits the samples in its own
  seeded permutation (``(seed, e)``); its steps take them ``batch_size`` at a time, the last
  step of the epoch the remainder, so an epoch is ``ceil(samples / batch_size)`` steps and holds
  every sample exactly once (:func:`steps_per_epoch`; a run of E epochs:
  :func:`num_steps`). A step's samples are packed by :func:`pack_rows_best_fill` (the longest
  opens a row, which takes the greedy fill or the best complementary pair, whichever fills it
  more: 96 % non-pad tokens for 128 LLaVA-like samples in rows of 2048, ~2.55 samples a row).

  Static shapes under jit: :meth:`batch_at` pads a step's rows with empty rows (segment 0, no
  loss) to a fixed ``rows``. :meth:`rows_per_step` gives it: the most rows any step of the run
  needs, rounded up to a multiple of the batch shards x micro-batches, computed once from the
  data (every step packed once, ~2 ms per 128 samples). :meth:`padding` says what the padding
  costs. ``image_format`` / ``image_size`` as in :func:`rows_to_batch`.
  """

  def __init__(self, examples: Sequence[Example], *, seq_len: int, max_images: int, pad_id: int,
               seed: int, batch_size: int, image_size: int | None = None,
               image_format: Any = None):
    if not examples:
      raise ValueError("PackedDataset needs at least one example")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1 (samples per step), got {batch_size}")
    self.examples = list(examples)
    self.seq_len, self.max_images, self.pad_id = seq_len, max_images, pad_id
    self.seed, self.batch_size = seed, int(batch_size)
    self.image_size, self.image_format = image_size, image_format
    self._lengths = np.asarray([len(ex) for ex in self.examples], np.int64)
    self._images = np.asarray([ex.num_images for ex in self.examples], np.int64)
    # Fail now, naming the example, not at the step that holds it.
    _checked_items(self._lengths, self._images, seq_len, max_images)
    self._permutations: dict[int, np.ndarray] = {}
    self._rows_needed = np.zeros(0, np.int64)  # rows of steps 0, 1, ... packed so far

  @property
  def num_samples(self) -> int:
    return len(self.examples)

  @property
  def steps_per_epoch(self) -> int:
    return steps_per_epoch(self.num_samples, self.batch_size)

  def num_steps(self, epochs: float) -> int:
    """Optimizer steps of ``epochs`` epochs (:func:`num_steps`)."""
    return num_steps(self.num_samples, self.batch_size, epochs)

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """Sample order of one epoch (seeded by ``(seed, epoch)``)."""
    if epoch not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(
          self.num_samples)
    return self._permutations[epoch]

  def sample_indices(self, step: int) -> np.ndarray:
    """Indices into ``self.examples`` of the samples of step ``step``, in epoch order."""
    if step < 0:
      raise ValueError(f"need step >= 0, got {step}")
    epoch, k = divmod(int(step), self.steps_per_epoch)
    return self.epoch_permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

  def step_rows(self, step: int) -> list[list[int]]:
    """The packed rows of step ``step``: indices into ``self.examples``, one list per row."""
    idx = self.sample_indices(step)
    rows = pack_rows_best_fill(self._lengths[idx], self._images[idx], self.seq_len,
                               self.max_images)
    return [[int(idx[i]) for i in row] for row in rows]

  def rows_needed(self, steps: int) -> np.ndarray:
    """Rows each of steps ``0 .. steps - 1`` packs into, int64 [steps] (packed once, kept)."""
    done = len(self._rows_needed)
    if steps > done:
      more = [len(self.step_rows(s)) for s in range(done, steps)]
      self._rows_needed = np.concatenate([self._rows_needed, np.asarray(more, np.int64)])
    return self._rows_needed[:steps]

  def rows_per_step(self, steps: int, multiple: int = 1) -> int:
    """The rows of every batch of a run of ``steps`` steps: the most any of them needs, rounded
    up to a multiple of ``multiple`` (the batch shards of the mesh x the micro-batches)."""
    return round_up(int(self.rows_needed(max(1, steps)).max()), multiple)

  def padding(self, steps: int, rows: int) -> dict[str, float]:
    """What a run of ``steps`` steps of ``rows`` rows spends on padding: ``empty_rows`` (the
    fraction of rows with no sample) and ``non_pad`` (the fraction of non-pad tokens), and
    ``samples_per_row`` (samples per non-empty row)."""
    needed = self.rows_needed(max(1, steps))
    tokens = samples = 0
    for s in range(len(needed)):  # one lookup of each step's samples serves both counts
      idx = self.sample_indices(s)
      tokens += int(self._lengths[idx].sum())
      samples += len(idx)
    total = len(needed) * rows
    return {"empty_rows": float(1.0 - needed.sum() / total),
            "non_pad": float(tokens / (total * self.seq_len)),
            "samples_per_row": float(samples / needed.sum())}

  def epoch_of(self, step: int) -> float:
    """Fractional epoch reached at the end of batch ``step``."""
    return (step + 1) / self.steps_per_epoch

  def batch_at(self, step: int, rows: int) -> dict[str, np.ndarray]:
    """The Batch arrays of training step ``step``: its packed rows, then empty rows up to
    ``rows`` (:meth:`rows_per_step`).

    Raises:
      ValueError: the step packs into more than ``rows`` rows.
    """
    packed = pad_rows(self.step_rows(step), rows, where=f"step {step}")
    return rows_to_batch(self.examples, packed, seq_len=self.seq_len, max_images=self.max_images,
                         pad_id=self.pad_id, image_size=self.image_size,
                         image_format=self.image_format)
