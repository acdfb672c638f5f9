"""Tests of image_digest.py: content digests cached by (size, mtime, ctime, inode)."""

import builtins
import hashlib
import json
import logging
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.data import image_digest


@pytest.fixture
def images(tmp_path):
  """Three small image files in one directory, and a private cache directory."""
  root = tmp_path / "img"
  root.mkdir()
  paths = []
  for i in range(3):
    path = root / f"{i}.jpg"
    path.write_bytes(bytes([i]) * 1000 + b"tail")
    paths.append(str(path))
  return paths, str(tmp_path / "cache")


@pytest.fixture
def trusted(monkeypatch):
  """Files written a moment ago are cached as if they were old (see image_digest._RACY_NS)."""
  monkeypatch.setattr(image_digest, "_RACY_NS", 0)


@pytest.fixture
def opened(monkeypatch):
  """Every path opened through `open` from now on."""
  seen = []
  real = builtins.open

  def counting(file, *args, **kwargs):
    seen.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
    return real(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", counting)
  return seen


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _edit_in_place_keeping_size_and_mtime(path):
  """New bytes of the same length, the mtime put back; waits until the ctime has moved on (file
  times are coarse: a second change within one tick keeps the ctime)."""
  st = os.stat(path)
  with open(path, "r+b") as f:
    data = f.read()
    f.seek(0)
    f.write(bytes(b ^ 0xFF for b in data[:8]) + data[8:])
  for _ in range(300):
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # also sets ctime to now
    after = os.stat(path)
    if after.st_ctime_ns != st.st_ctime_ns:
      break
    time.sleep(0.01)
  assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
  assert after.st_ctime_ns != st.st_ctime_ns


def test_digests_are_the_bytes_sha256_and_none_for_a_missing_file(images):
  paths, cache = images
  missing = os.path.join(os.path.dirname(paths[0]), "gone.jpg")
  out = image_digest.file_digests([*paths, missing], cache)
  assert out == {**{p: _sha256(p) for p in paths}, missing: None}


def test_an_unchanged_file_is_not_read_again(images, trusted, opened):
  paths, cache = images
  first = image_digest.file_digests(paths, cache)
  assert set(paths) <= set(opened)  # hashed once
  opened.clear()
  assert image_digest.file_digests(paths, cache) == first
  assert not set(paths) & set(opened), opened
  # The cache file is read from memory while it is unchanged; in a fresh process it is read once.
  image_digest._LOADED.clear()  # pylint: disable=protected-access
  opened.clear()
  assert image_digest.file_digests(paths, cache) == first
  assert not set(paths) & set(opened) and len(opened) == 1 and opened[0].startswith(cache)


def test_an_edit_in_place_with_the_mtime_restored_is_seen_through_the_cache(images, trusted):
  paths, cache = images
  before = image_digest.file_digests(paths, cache)
  _edit_in_place_keeping_size_and_mtime(paths[1])
  after = image_digest.file_digests(paths, cache)
  assert after[paths[1]] == _sha256(paths[1]) != before[paths[1]]
  assert [after[p] for p in (paths[0], paths[2])] == [before[p] for p in (paths[0], paths[2])]


def test_a_file_changed_just_before_it_was_hashed_is_not_cached(images, opened):
  """Within the racy window an entry could hide a second edit in the same clock tick."""
  paths, cache = images
  image_digest.file_digests(paths, cache)
  assert not os.path.exists(cache) or not any(
      json.loads(open(os.path.join(cache, f)).read())["files"] for f in os.listdir(cache))
  opened.clear()
  image_digest.file_digests(paths, cache)
  assert set(paths) <= set(opened)  # read again


def _cache_files(cache):
  return [os.path.join(cache, f) for f in os.listdir(cache)]


@pytest.mark.parametrize("damage", [
    b"", b'{"format": 1, "directory"', b"\xff\xfe garbage", b"[]",
    b'{"format": 1, "directory": "/elsewhere", "files": {}}'])
def test_a_damaged_cache_file_is_ignored_and_rebuilt(images, trusted, opened, caplog, damage):
  paths, cache = images
  want = image_digest.file_digests(paths, cache)
  (path,) = _cache_files(cache)
  with open(path, "wb") as f:
    f.write(damage)
  os.utime(path, ns=(0, 0))  # never mistaken for the copy held in memory
  opened.clear()
  with caplog.at_level(logging.WARNING, logger=image_digest.__name__):
    assert image_digest.file_digests(paths, cache) == want
  assert set(paths) <= set(opened)  # hashed again
  assert [r.getMessage() for r in caplog.records] == [
      f"image digest cache {path} is damaged; ignoring it and rebuilding it"]
  rebuilt = json.loads(open(path).read())
  assert rebuilt["directory"] == os.path.dirname(paths[0])
  assert sorted(rebuilt["files"]) == ["0.jpg", "1.jpg", "2.jpg"]
  opened.clear()
  assert image_digest.file_digests(paths, cache) == want
  assert not set(paths) & set(opened)


def test_a_bad_entry_is_hashed_again_and_the_others_kept(images, trusted, opened):
  paths, cache = images
  want = image_digest.file_digests(paths, cache)
  (path,) = _cache_files(cache)
  data = json.loads(open(path).read())
  data["files"]["1.jpg"][4] = "not a digest"
  with open(path, "w") as f:
    json.dump(data, f)
  opened.clear()
  assert image_digest.file_digests(paths, cache) == want
  assert [p for p in opened if p in paths] == [paths[1]]


def test_an_unwritable_cache_directory_warns_once_and_still_digests(images, trusted, caplog):
  paths, cache = images
  with open(cache, "w") as f:  # a file where the directory should be
    f.write("")
  with caplog.at_level(logging.WARNING, logger=image_digest.__name__):
    assert image_digest.file_digests(paths, cache) == {p: _sha256(p) for p in paths}
    assert image_digest.file_digests(paths, cache) == {p: _sha256(p) for p in paths}
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1 and messages[0].startswith(
      f"cannot write the image digest cache in {cache} (")
  assert messages[0].endswith(f"set {image_digest.ENV_CACHE_DIR} to a writable directory")


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(image_digest.ENV_CACHE_DIR, str(tmp_path / "c"))
  assert image_digest.cache_dir() == str(tmp_path / "c" / "image_digests")
  monkeypatch.delenv(image_digest.ENV_CACHE_DIR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert image_digest.cache_dir() == str(tmp_path / "xdg" / "visatb_jax" / "image_digests")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12).map(lambda v: json.dumps({"format": 1, "directory": "/d", "files": v}
                                            if isinstance(v, dict) else v).encode())))
def test_parsing_never_raises_and_keeps_only_whole_entries(raw):
  # pylint: disable=protected-access
  entries = image_digest._parse(raw, "/d")
  assert entries is None or all(image_digest._valid(e) for e in entries.values())
