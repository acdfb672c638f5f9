"""Tests of prepare.py: array_record round trip without TensorFlow, reuse, rebuild, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from visatb_jax.data import image_digest, prepare, sources


@pytest.fixture(autouse=True)
def _image_digest_cache(tmp_path, monkeypatch):
  """A cache of image digests private to the test (never the user's); subprocesses inherit it."""
  monkeypatch.setenv(image_digest.ENV_CACHE_DIR, str(tmp_path / "cache"))


def _write_mixture(root, n=9, weird_bytes=False):
  """A LLaVA JSON file of `n` samples over tasks a/b/c; every third sample has an image."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  samples = []
  for i in range(n):
    sample = {"id": f"s{i}", "task": "abc"[i % 3],
              "conversations": [{"from": "human", "value": f"q{i}"},
                                {"from": "gpt", "value": "é" * (i % 4 + 1)}]}
    if i % 3 == 0:
      path = os.path.join(root, "img", f"{i}.png")
      Image.new("RGB", (4 + i, 6), (10 * i, 0, 0)).save(path)
      sample["image"] = f"img/{i}.png"
    samples.append(sample)
  if weird_bytes:  # trailing NUL bytes must survive (numpy "S" strings would strip them)
    with open(os.path.join(root, "img", "raw.bin"), "wb") as f:
      f.write(b"ab\x00\x00")
    samples.append({"id": "raw", "task": "a", "image": "img/raw.bin",
                    "conversations": [{"from": "human", "value": "<image>\nx"},
                                      {"from": "gpt", "value": "y"}]})
  path = os.path.join(root, "mix.json")
  with open(path, "w") as f:
    json.dump(samples, f)
  return sources.load_samples(path).samples


def test_round_trip(tmp_path):
  samples = _write_mixture(tmp_path / "src", weird_bytes=True)
  prepared = prepare.prepare_mixture({"train": samples, "val": samples[:2]}, tmp_path / "prep")
  assert sorted(prepared.splits) == ["train", "val"]
  info = prepared.splits["train"]
  assert info.num_records == 10 and info.task_counts() == {"a": 4, "b": 3, "c": 3}
  np.testing.assert_array_equal(info.indices_of("b"), [1, 4, 7])
  assert len(info.indices_of("zzz")) == 0
  source = prepared.data_source("train")
  assert len(source) == 10 and len(prepared.data_source("val")) == 2
  for i, sample in enumerate(samples):  # record i is sample i: no shuffling at write time
    record = prepare.decode_record(source[i])
    assert record["id"] == sample["id"] and record["task"] == sample["task"]
    assert record["conversations"] == sample["conversations"]
    assert record["image_paths"] == sample["image_paths"]
    files = []
    for p in sample["image_paths"]:
      with open(p, "rb") as f:
        files.append(f.read())
    assert record["images"] == files
  assert prepare.decode_record(source[9])["images"] == [b"ab\x00\x00"]
  with pytest.raises(ValueError, match="no split 'test'"):
    prepared.data_source("test")
  assert os.path.exists(tmp_path / "prep" / "dataset_info.json")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_works_without_tensorflow(tmp_path):
  _write_mixture(tmp_path / "src")
  script = f"""
import sys
try:
  import tensorflow
  sys.exit("tensorflow is installed")
except ImportError:
  pass
from visatb_jax.data import prepare, sources
samples = sources.load_samples({str(tmp_path / "src" / "mix.json")!r}).samples
prepared = prepare.prepare_mixture({{"train": samples}}, {str(tmp_path / "prep")!r})
record = prepare.decode_record(prepared.data_source("train")[3])
assert record["id"] == "s3" and len(record["images"]) == 1
assert "tensorflow" not in sys.modules, "tensorflow was imported"
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


def test_finished_preparation_is_reused(tmp_path, monkeypatch):
  samples = _write_mixture(tmp_path / "src")
  first = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  marker = tmp_path / "prep" / prepare.MARKER
  mtime = os.stat(marker).st_mtime_ns

  def no_build(*args, **kwargs):
    raise AssertionError("rebuilt a finished preparation")

  monkeypatch.setattr(prepare.VisatbMixture, "download_and_prepare", no_build)
  again = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  assert again.fingerprint == first.fingerprint and os.stat(marker).st_mtime_ns == mtime
  assert prepare.open_prepared(tmp_path / "prep").splits["train"].num_records == 9


def test_other_mixture_or_partial_preparation_is_rebuilt(tmp_path):
  samples = _write_mixture(tmp_path / "src")
  first = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  # Another mixture in the same directory: rebuilt, not reused.
  smaller = prepare.prepare_mixture({"train": samples[:4]}, tmp_path / "prep")
  assert smaller.fingerprint != first.fingerprint
  assert len(smaller.data_source("train")) == 4
  # A preparation killed before its marker was written: redone.
  os.remove(tmp_path / "prep" / prepare.MARKER)
  with pytest.raises(ValueError, match="no finished preparation"):
    prepare.open_prepared(tmp_path / "prep")
  os.makedirs(tmp_path / ".tmp-prep-killed")  # scratch of a killed run
  redone = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  assert redone.fingerprint == first.fingerprint and len(redone.data_source("train")) == 9
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_fingerprint_follows_content_and_image_files(tmp_path):
  samples = _write_mixture(tmp_path / "src")
  base = prepare.mixture_fingerprint({"train": samples})
  assert prepare.mixture_fingerprint({"train": list(samples)}) == base
  assert prepare.mixture_fingerprint({"val": samples}) != base
  edited = [dict(samples[0], task="z")] + samples[1:]
  assert prepare.mixture_fingerprint({"train": edited}) != base
  Image.new("RGB", (9, 9)).save(samples[0]["image_paths"][0])
  assert prepare.mixture_fingerprint({"train": samples}) != base


def test_an_image_edited_in_place_with_its_mtime_restored_changes_the_fingerprint(tmp_path):
  samples = _write_mixture(tmp_path / "src")
  base = prepare.mixture_fingerprint({"train": samples})
  path = samples[3]["image_paths"][0]
  st = os.stat(path)
  with open(path, "r+b") as f:  # one byte of the pixel data flipped, in place
    f.seek(st.st_size // 2)
    byte = f.read(1)
    f.seek(st.st_size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
  assert prepare.mixture_fingerprint({"train": samples}) != base


def test_a_finished_preparation_is_reused_without_reading_an_image(tmp_path, monkeypatch):
  samples = _write_mixture(tmp_path / "src")
  # Images written a moment ago are hashed again on every call (image_digest._RACY_NS); these
  # stand for a data set written long before the run.
  monkeypatch.setattr(image_digest, "_RACY_NS", 0)
  first = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  images = {p for s in samples for p in s.get("image_paths", [])}
  opened = []
  real = open

  def counting(file, *args, **kwargs):
    opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else str(file))
    return real(file, *args, **kwargs)

  monkeypatch.setattr("builtins.open", counting)
  again = prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  assert again.fingerprint == first.fingerprint
  assert opened and not images & set(opened), opened  # the marker is read, no image is


def test_bad_input_names_the_sample(tmp_path):
  samples = _write_mixture(tmp_path / "src")
  with pytest.raises(ValueError, match="at least one split"):
    prepare.prepare_mixture({}, tmp_path / "prep")
  with pytest.raises(ValueError, match="split 'train' has no samples"):
    prepare.prepare_mixture({"train": []}, tmp_path / "prep")
  with pytest.raises(ValueError, match=r"sample 1 \(id 's1'\): no 'task'"):
    prepare.prepare_mixture({"train": [samples[0], dict(samples[1], task="")]}, tmp_path / "prep")
  os.remove(samples[3]["image_paths"][0])
  with pytest.raises(ValueError, match=r"sample 3 \(id 's3'\): image not found: .*3\.png"):
    prepare.prepare_mixture({"train": samples}, tmp_path / "prep")
  assert not os.path.exists(tmp_path / "prep")
