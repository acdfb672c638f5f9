"""Content digests of image files, hashed once and cached, so that a re-run costs a stat per image.

The data stage's fingerprint and a prepared mixture's fingerprint both need to know whether an
image changed. A stat alone misses an edit in place at the same size whose mtime was restored
(`touch -r`, `os.utime`, a tool that preserves times); the bytes' sha256 does not, but reading
every image on every run costs minutes at hundreds of thousands of images. So each digest is
cached against the file's (size, mtime_ns, ctime_ns, inode) and the bytes are read again only
when one of them changed. ctime is in the key because it is the one time a user cannot set: an
edit that restores mtime still moves ctime (so do chmod and chown, which only cost a re-hash).

Where the cache lives: a user cache directory, `$VISATB_CACHE_DIR/image_digests/` (default
`$XDG_CACHE_HOME/visatb_jax/image_digests/`, i.e. `~/.cache/...`), not the run directory nor the
image tree. Images outlive runs and are shared by them: a sweep of N runs (an ablation per config)
hashes the tree once rather than N times, `--overwrite` does not throw the digests away, and a
shared data set's tree is often read-only. One JSON file per image directory (named by a digest of
its absolute path) keeps each file as large as one directory's listing, and lets runs over
different data sets never touch each other's files.

The cache is only an optimisation: a missing, unreadable or damaged cache file is ignored (with a
one-line warning when it exists but cannot be parsed) and rebuilt; a cache directory that cannot
be written means hashing again next time (one warning per process). Concurrent processes replace
a cache file atomically; one may drop the other's new entries, which costs a re-hash, never a
wrong digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping

_log = logging.getLogger(__name__)

ENV_CACHE_DIR = "VISATB_CACHE_DIR"
FORMAT = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")

# A file changed within this long before it was hashed is hashed again next time rather than
# trusted from the cache ("racy" entries, as git calls them): file times are coarse (a kernel
# tick, 1-2 s on FAT, NFS and some FUSE file systems), so a second edit within the same tick as
# the first would keep the recorded ctime. Costs a re-hash of files that were still being written.
_RACY_NS = 2_000_000_000

# {cache file: ((size, mtime_ns, inode) of the file when read, its entries)}: the data stage
# fingerprints every task file of every split, and their images mostly share directories.
_LOADED: dict[str, tuple[tuple[int, int, int], dict[str, list]]] = {}
_WARNED_UNWRITABLE: set[str] = set()


def cache_dir() -> str:
  """The directory of the digest cache files (see the module docstring)."""
  root = os.environ.get(ENV_CACHE_DIR)
  if not root:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "visatb_jax")
  return os.path.join(os.path.expanduser(root), "image_digests")


def sha256_of_file(path: str) -> str | None:
  """The bytes' sha256; None for a file that cannot be read (its reader names the problem)."""
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  except OSError:
    return None


def _cache_file(cache: str, directory: str) -> str:
  return os.path.join(cache, hashlib.sha256(directory.encode()).hexdigest()[:32] + ".json")


def _valid(entry: object) -> bool:
  """[size, mtime_ns, ctime_ns, inode, sha256 hex] (checked at every load: keep it cheap)."""
  # pylint: disable=unidiomatic-typecheck  (a bool or a float is not a stat field)
  if type(entry) is not list or len(entry) != 5:
    return False
  size, mtime, ctime, inode, digest = entry
  return (type(size) is int and type(mtime) is int and type(ctime) is int and type(inode) is int
          and type(digest) is str and _DIGEST.fullmatch(digest) is not None)


def _parse(raw: bytes, directory: str) -> dict[str, list] | None:
  """The entries of a cache file's bytes; None when they are not a cache file of `directory`."""
  try:
    data = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  if (not isinstance(data, dict) or data.get("format") != FORMAT
      or data.get("directory") != directory or not isinstance(data.get("files"), dict)):
    return None
  return {name: entry for name, entry in data["files"].items() if _valid(entry)}


def _load(path: str, directory: str) -> dict[str, list]:
  """The cached entries of `directory` ({} when there are none or the file is damaged)."""
  try:
    with open(path, "rb") as f:
      st = os.fstat(f.fileno())
      signature = (st.st_size, st.st_mtime_ns, st.st_ino)
      loaded = _LOADED.get(path)
      if loaded is not None and loaded[0] == signature:
        return loaded[1]
      raw = f.read()
  except OSError:
    return {}  # no cache yet (or unreadable): every image is hashed
  entries = _parse(raw, directory)
  if entries is None:
    _log.warning("image digest cache %s is damaged; ignoring it and rebuilding it", path)
    return {}
  _LOADED[path] = (signature, entries)
  return entries


def _store(path: str, directory: str, entries: Mapping[str, list]) -> None:
  """Replaces the cache file atomically; a failure only costs a re-hash next time."""
  raw = json.dumps({"format": FORMAT, "directory": directory, "files": entries},
                   separators=(",", ":")).encode()
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-",
                               suffix="." + os.path.basename(path))
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
    os.replace(tmp, path)
    tmp = None
    st = os.stat(path)
    _LOADED[path] = ((st.st_size, st.st_mtime_ns, st.st_ino), dict(entries))
  except OSError as e:
    cache = os.path.dirname(path)
    if cache not in _WARNED_UNWRITABLE:
      _WARNED_UNWRITABLE.add(cache)
      _log.warning("cannot write the image digest cache in %s (%s): images will be hashed again "
                   "on the next run; set %s to a writable directory", cache, e.strerror or e,
                   ENV_CACHE_DIR)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def _directory_digests(directory: str, files: Iterable[tuple[str, str]], cache: str
                       ) -> dict[str, str | None]:
  """{path: digest} of `files` ((path as given, name in `directory`)), through its cache file."""
  path = _cache_file(cache, directory)
  entries = _load(path, directory)
  started = time.time_ns()  # before any read: a file changed after it is seen as racy
  out, fresh = {}, {}
  for given, name in files:
    try:
      st = os.stat(os.path.join(directory, name))
    except OSError:
      out[given] = None
      continue
    key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    entry = entries.get(name)
    if entry is not None and entry[:4] == key:
      out[given] = entry[4]
      continue
    digest = sha256_of_file(os.path.join(directory, name))
    out[given] = digest
    if digest is not None and max(st.st_mtime_ns, st.st_ctime_ns) < started - _RACY_NS:
      fresh[name] = [*key, digest]
  if fresh:
    _store(path, directory, {**entries, **fresh})
  return out


def file_digests(paths: Iterable[str], cache: str | None = None) -> dict[str, str | None]:
  """{path: sha256 of its bytes, or None when it cannot be stat'ed or read}, for each path.

  A file whose (size, mtime_ns, ctime_ns, inode) match its cached entry is not read.

  Args:
    paths: the image files (relative paths are taken from the working directory).
    cache: the cache directory; default `cache_dir()`.
  """
  cache = cache_dir() if cache is None else cache
  by_directory: dict[str, list[tuple[str, str]]] = {}
  for p in paths:
    full = os.path.abspath(p)
    by_directory.setdefault(os.path.dirname(full), []).append((p, os.path.basename(full)))
  out: dict[str, str | None] = {}
  for directory, files in by_directory.items():
    out.update(_directory_digests(directory, files, cache))
  return out
