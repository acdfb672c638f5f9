"""Tests of loader.py: exact batches, steps of samples, exact resume (through JSON), reshuffling,
host shards."""

import math

import collections
import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import images as images_lib
from visatb_jax.data import loader, prepare, sources, template
from visatb_jax.data import qwen2vl_image as qi
from visatb_jax.data import tokenizer as tk
from visatb_jax.data.image_format import NativeImages, describe

N = 40  # usable samples; sample N is too long for MAX_LEN
TASKS = ("a", "b", "c")
SIZE, N_IMG, SEQ_LEN, MAX_LEN = 8, 2, 128, 120


def _color(i):
  return (5 * i, 100, 200 - i)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(samples, prepared train source, tokenizer) of a synthetic mixture with unique questions."""
  root = tmp_path_factory.mktemp("mixture")
  os.makedirs(root / "img")
  raw = []
  for i in range(N + 1):
    answer = "long " * 200 if i == N else "word " * (i % 7) + "end"
    sample = {"id": f"s{i}", "task": TASKS[i % 3],
              "conversations": [{"from": "human", "value": f"item {i} ?"},
                                {"from": "gpt", "value": answer}]}
    if i % 3 == 0:
      Image.new("RGB", (SIZE, SIZE), _color(i)).save(root / "img" / f"{i}.png")
      sample["image"] = f"img/{i}.png"
    raw.append(sample)
  with open(root / "mix.json", "w") as f:
    json.dump(raw, f)
  samples = sources.load_samples(root / "mix.json").samples
  texts = [template.SYSTEM_PROMPT] + [t["value"] for s in samples[:N] for t in s["conversations"]]
  tok = tk.train_tokenizer(texts, vocab_size=300, save_dir=None)
  prepared = prepare.prepare_mixture({"train": samples}, root / "prep")
  return samples, prepared.data_source("train"), tok


def _config(**overrides):
  kwargs = {"tasks": TASKS, "seq_len": SEQ_LEN, "max_images": 3, "image_size": SIZE,
            "num_image_tokens": N_IMG, "max_len": MAX_LEN, "batch_size": 4, "seed": 0,
            "read_threads": 1}
  kwargs.update(overrides)
  return loader.LoaderConfig(**kwargs)


def _loader(data, process_index=0, process_count=1, **overrides):
  _, source, tok = data
  return loader.Loader(source, tok, _config(**overrides), process_index=process_index,
                       process_count=process_count)


def _segments(batch, tok):
  """[(sample number, row, start, length)] of every packed sample, in row order."""
  out = []
  for r, seg_row in enumerate(batch["segment_ids"]):
    for s in range(1, seg_row.max() + 1):
      where = np.flatnonzero(seg_row == s)
      text = tok.decode(batch["input_ids"][r, where])
      out.append((int(re.search(r"item (\d+) \?", text).group(1)), r, int(where[0]), len(where)))
  return out


def _ids(batches, tok):
  return [i for b in batches for i, *_ in _segments(b, tok)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_one_epoch_holds_every_sample_once_exactly_encoded(data):
  samples, _, tok = data
  batches = list(_loader(data, num_epochs=1))
  b = batches[0]
  assert {k: (v.dtype.name, v.shape) for k, v in b.items()} == {
      "input_ids": ("int32", (4, SEQ_LEN)), "targets": ("int32", (4, SEQ_LEN)),
      "loss_mask": ("float32", (4, SEQ_LEN)), "task_ids": ("int32", (4, SEQ_LEN)),
      "positions": ("int32", (4, SEQ_LEN)), "segment_ids": ("int32", (4, SEQ_LEN)),
      "images": ("float32", (4, 3, SIZE, SIZE, 3))}
  seen = []
  for b in batches:
    slots = collections.Counter()
    for i, r, start, n in _segments(b, tok):
      seen.append(i)
      enc = template.encode_conversation(samples[i]["conversations"], tok,
                                         num_image_tokens=N_IMG, max_len=MAX_LEN)
      span = slice(start, start + n)
      np.testing.assert_array_equal(b["input_ids"][r, span], enc.input_ids)
      np.testing.assert_array_equal(b["loss_mask"][r, start:start + n - 1], enc.label_mask[1:])
      np.testing.assert_array_equal(b["targets"][r, start:start + n - 1], enc.input_ids[1:])
      expected_task = np.where(enc.label_mask[1:], i % 3, -1)
      np.testing.assert_array_equal(b["task_ids"][r, start:start + n - 1], expected_task)
      np.testing.assert_array_equal(b["positions"][r, span], np.arange(n))
      if i % 3 == 0:  # its image fills the next slot of its row, CLIP-normalised
        pixels = np.full((SIZE, SIZE, 3), _color(i), np.uint8)
        np.testing.assert_allclose(b["images"][r, slots[r]], images_lib.normalize(pixels),
                                   atol=1e-6)
        slots[r] += 1
    for r in range(4):
      assert not b["images"][r, slots[r]:].any()
  assert sorted(seen) == list(range(N))  # each once; the too-long sample N is dropped
  # The last batch of a finite stream is padded with empty rows.
  assert (batches[-1]["segment_ids"] >= 0).all() and len(batches) >= 3


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_resume_after_k_batches_is_exact(data, k):
  reference = _loader(data)
  expected = [next(reference) for _ in range(k + 3)]
  first = _loader(data)
  for _ in range(k):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = _loader(data)
  resumed.set_state(state)
  assert resumed.get_state() == state
  for want in expected[k:]:
    _assert_batches_equal(next(resumed), want)
  # The interrupted iterator itself goes on identically too.
  _assert_batches_equal(next(first), expected[k])


def test_each_epoch_is_a_new_permutation_and_seeds_matter(data):
  _, tok = data[0], data[2]
  # Steps take the stream's samples in order: the first N are epoch 0, the next N epoch 1.
  batches = []
  it = _loader(data)
  while len(ids := _ids(batches, tok)) < 2 * N:
    batches.append(next(it))
  assert sorted(ids[:N]) == sorted(ids[N:2 * N]) == list(range(N))
  assert ids[:N] != ids[N:2 * N]
  same = next(_loader(data, seed=0))
  other = next(_loader(data, seed=1))
  _assert_batches_equal(same, next(_loader(data, seed=0)))
  assert _ids([same], tok) != _ids([other], tok)


@pytest.mark.parametrize("hosts", [2, 3])
def test_host_shards_are_disjoint_and_cover_everything(data, hosts):
  tok = data[2]
  shards = []
  for p in range(hosts):
    batches = list(_loader(data, process_index=p, process_count=hosts, batch_size=2 * hosts,
                           num_epochs=1))
    assert all(b["input_ids"].shape == (2, SEQ_LEN) for b in batches)
    shards.append(_ids(batches, tok))
  flat = [i for shard in shards for i in shard]
  assert sorted(flat) == list(range(N))  # disjoint (no repeats) and complete
  assert all(abs(len(s) - N / hosts) <= 1 for s in shards)


def test_record_subset_template_and_default_host(data):
  _, source, tok = data
  subset = loader.Loader(source, tok, _config(num_epochs=1), record_indices=list(range(10)))
  assert subset.process_index == 0 and subset.process_count == 1  # from jax
  assert sorted(_ids(list(subset), tok)) == list(range(10))
  plain = next(_loader(data, template="plain"))
  assert "USER" not in tok.decode(plain["input_ids"][0]) and plain["loss_mask"].any()


def test_mismatched_state_and_bad_settings_raise(data):
  _, source, tok = data
  state = _loader(data).get_state()
  with pytest.raises(ValueError, match=r"other settings: seed=0 \(now 1\)"):
    _loader(data, seed=1).set_state(state)
  with pytest.raises(ValueError, match="not a loader state"):
    _loader(data).set_state({"iterator": {}})
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    _loader(data, process_count=3, batch_size=4)
  with pytest.raises(ValueError, match="process_index=2 is not in"):
    _loader(data, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="max_len=200 exceeds seq_len=128"):
    _config(max_len=200)
  with pytest.raises(ValueError, match="unknown chat template"):
    _config(template="nope")
  with pytest.raises(ValueError, match=r"record_indices must lie in \[0, 41\)"):
    loader.Loader(source, tok, _config(), record_indices=[0, 41])
  with pytest.raises(ValueError, match="task 'c', which is not one of the loader's tasks"):
    next(loader.Loader(source, tok, _config(tasks=("a", "b")), process_index=0, process_count=1))


def test_decode_image_matches_load_image(tmp_path):
  path = tmp_path / "x.png"
  Image.fromarray(np.arange(5 * 9 * 3, dtype=np.uint8).reshape(5, 9, 3)).save(path)
  np.testing.assert_array_equal(loader.decode_image(path.read_bytes(), 7),
                                images_lib.load_image(path, 7))
  with pytest.raises(images_lib.ImageError, match="cannot decode bad.png"):
    loader.decode_image(b"not an image", 7, name="bad.png")


NATIVE_N = 12
NATIVE_MAX = 28 * 28 * 16  # P = 64 patches a slot
# (height, width): 4, 6, 8 and 16 LM tokens under NATIVE_MAX.
NATIVE_SIZES = [(8, 8), (40, 90), (70, 30), (100, 100)]


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
  """(samples, prepared train source, tokenizer): 0, 1 or 2 images of different sizes each."""
  root = tmp_path_factory.mktemp("native")
  os.makedirs(root / "img")
  rng = np.random.default_rng(0)
  raw = []
  for i in range(NATIVE_N):
    sample = {"id": f"n{i}", "task": TASKS[i % 3],
              "conversations": [{"from": "human", "value": f"item {i} ?"},
                                {"from": "gpt", "value": "word " * (i % 4) + "end"}]}
    names = []
    for j in range(i % 3):
      h, w = NATIVE_SIZES[(i + j) % len(NATIVE_SIZES)]
      names.append(f"img/{i}_{j}.png")
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / names[-1])
    if names:
      sample["image"] = names
    raw.append(sample)
  with open(root / "mix.json", "w") as f:
    json.dump(raw, f)
  samples = sources.load_samples(root / "mix.json").samples
  texts = [template.SYSTEM_PROMPT] + [t["value"] for s in samples for t in s["conversations"]]
  tok = tk.train_tokenizer(texts, vocab_size=300, save_dir=None)
  prepared = prepare.prepare_mixture({"train": samples}, root / "prep")
  return samples, prepared.data_source("train"), tok


def test_native_format_loader_shapes_and_exact_resume(native_data):
  samples, source, tok = native_data
  image_id = template.image_token_id(tok)
  fmt = NativeImages(image_id, max_pixels=NATIVE_MAX)

  def make(**overrides):
    return loader.Loader(source, tok, _config(image_format=fmt, **overrides), process_index=0,
                         process_count=1)

  batches = list(make(num_epochs=1))
  assert {k: (v.dtype.name, v.shape) for k, v in batches[0].items()} == {
      "input_ids": ("int32", (4, SEQ_LEN)), "targets": ("int32", (4, SEQ_LEN)),
      "loss_mask": ("float32", (4, SEQ_LEN)), "task_ids": ("int32", (4, SEQ_LEN)),
      "positions": ("int32", (4, 3, SEQ_LEN)), "segment_ids": ("int32", (4, SEQ_LEN)),
      "images": ("float32", (4, 3, 64, 3 * 2 * 14 * 14)), "image_grid": ("int32", (4, 3, 3))}
  seen = []
  for b in batches:
    slots, grids = collections.Counter(), []
    for i, r, start, n in _segments(b, tok):  # rows in order, each row's segments in order
      seen.append(i)
      want = [qi.load_image(p, max_pixels=NATIVE_MAX) for p in samples[i]["image_paths"]]
      enc = template.encode_conversation(
          samples[i]["conversations"], tok, max_len=MAX_LEN,
          num_image_tokens=[np.prod(grid) // 4 for _, grid in want])
      np.testing.assert_array_equal(b["input_ids"][r, start:start + n], enc.input_ids)
      for patches, grid in want:  # its images fill the next slots of its row, as the processor
        np.testing.assert_array_equal(b["image_grid"][r, slots[r]], grid)
        np.testing.assert_array_equal(b["images"][r, slots[r], :len(patches)], patches)
        assert not b["images"][r, slots[r], len(patches):].any()
        grids.append(grid)
        slots[r] += 1
    for r in range(4):
      assert not b["images"][r, slots[r]:].any() and not b["image_grid"][r, slots[r]:].any()
    # Every packed sample's M-RoPE positions start at 0, as get_rope_index with segment ids.
    positions, _ = qi.get_rope_index(b["input_ids"], grids or None, image_token_id=image_id,
                                          segment_ids=b["segment_ids"])
    np.testing.assert_array_equal(b["positions"], positions)
  assert sorted(seen) == list(range(NATIVE_N))
  assert len({tuple(g) for b in batches for g in b["image_grid"].reshape(-1, 3)}) == 5  # 4 + 0s

  # Exact resume through JSON, with the format among the settings.
  reference = make()
  expected = [next(reference) for _ in range(5)]
  first = make()
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state["settings"]["image_format"] == describe(fmt)
  resumed = make()
  resumed.set_state(state)
  for want in expected[2:]:
    _assert_batches_equal(next(resumed), want)
  _assert_batches_equal(next(first), expected[2])

  # A state of another format is refused; one saved before formats existed means square images.
  square = loader.Loader(source, tok, _config(), process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"other settings: image_format=\{'class': 'SquareImages'"):
    make().set_state(square.get_state())
  old = square.get_state()
  del old["settings"]["image_format"]
  loader.Loader(source, tok, _config(), process_index=0, process_count=1).set_state(old)
  with pytest.raises(ValueError, match="image_format="):
    make().set_state(old)


def _steps(batches, tok):
  return [sorted(i for i, *_ in _segments(b, tok)) for b in batches]


@pytest.mark.parametrize("batch_size", [4, 6])
def test_steps_take_batch_size_samples_padded_to_static_rows(data, batch_size):
  """One epoch is ceil(N / batch_size) steps of batch_size samples (the last one the rest),
  each packed into the rows `rows_per_step` computes from grain's order alone."""
  samples, source, tok = data
  lengths, images = [], []
  for s in samples[:N]:  # the records the loader reads, encoded as it encodes them
    enc = template.encode_conversation(s["conversations"], tok, num_image_tokens=N_IMG,
                                       max_len=MAX_LEN, system="Chat.")
    lengths.append(len(enc.input_ids))
    images.append(len(s["image_paths"]))
  # A short system prompt: several samples share a row.
  config = _config(batch_size=batch_size, num_epochs=2, system="Chat.")
  expected = loader.stream_steps(N, config, 100)
  assert len(expected) == math.ceil(2 * N / batch_size)  # a stream through the epoch boundary
  rows = loader.rows_per_step(lengths, images, config, len(expected))
  assert rows > 1 and rows < batch_size  # packing saves rows
  batches = list(loader.Loader(source, tok, dataclasses.replace(config, rows_per_step=rows),
                               process_index=0, process_count=1, record_indices=range(N)))
  assert _steps(batches, tok) == [sorted(x.tolist()) for x in expected]
  assert [len(x) for x in _steps(batches, tok)[:math.ceil(N / batch_size) - 1]] == [
      batch_size] * (math.ceil(N / batch_size) - 1)
  assert all(b["input_ids"].shape == (rows, SEQ_LEN) for b in batches)
  # rows_per_step is the least that fits: some step fills every row.
  assert max(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) == rows
  assert loader.rows_per_step(lengths, images, config, len(expected), multiple=4) == (
      packing_round_up(rows, 4))
  # Fewer rows than a step needs: an error naming it, not a silently dropped sample.
  small = loader.Loader(source, tok, dataclasses.replace(config, rows_per_step=1),
                        process_index=0, process_count=1, record_indices=range(N))
  with pytest.raises(ValueError, match=f"a step of {batch_size} samples .* packs into [2-9] rows, "
                                       "more than rows_per_step=1"):
    next(small)


def packing_round_up(value, multiple):
  return -(-value // multiple) * multiple


def test_rows_per_step_covers_every_host():
  config = _config(batch_size=6)
  lengths, images = [60] * 30 + [20] * 30, [0] * 60
  per_host = [loader.stream_steps(60, config, 10, process_index=p, process_count=3)
              for p in range(3)]
  assert sorted(np.concatenate([i for h in per_host for i in h]).tolist()) == list(range(60))
  assert all(len(step) == 2 for h in per_host for step in h)
  rows = loader.rows_per_step(lengths, images, config, 10, process_count=3)
  assert rows % 3 == 0 and rows <= 6
  with pytest.raises(ValueError, match="rows_per_step=4 is not divisible by the 3 hosts"):
    loader.make_dataset([], None, _config(batch_size=6, rows_per_step=4), process_index=0,
                        process_count=3)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_stream_steps_follow_worker_processes(data):
  """With workers, each packs its own slice of the stream and the steps come from them in turn:
  stream_steps (hence rows_per_step) replays that order too."""
  _, source, tok = data
  config = _config(batch_size=4, num_epochs=2, worker_count=2)
  expected = [sorted(x.tolist()) for x in loader.stream_steps(N, config, 100)]
  with loader.Loader(source, tok, config, process_index=0, process_count=1,
                     record_indices=range(N)) as it:
    assert _steps(list(it), tok) == expected
  one = [sorted(x.tolist()) for x in loader.stream_steps(N, _config(batch_size=4, num_epochs=2),
                                                         100)]
  assert sorted(map(tuple, one)) != sorted(map(tuple, expected))  # the workers change the steps
