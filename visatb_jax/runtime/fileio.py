"""Atomic file writes: a killed run never leaves a half-written output behind.

In a multi-process JAX run every process computes the same outputs, and the run directory is
shared: only process 0 writes (`is_primary`), and `sync` is the barrier after which the others may
read what it wrote. Without `jax.distributed` both are trivial, and jax is never imported here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Any


def _jax():
  """jax if the program has imported it (a process that never did is a single-process run)."""
  return sys.modules.get("jax")


def is_primary() -> bool:
  """True on the process that writes shared outputs: process 0, or the only process."""
  jax = _jax()
  return jax is None or jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across the processes of a multi-process run (a no-op in a single process).

  Every process must reach the same sequence of `sync` names; after it, files written by process 0
  before its own call are visible to all (on a shared file system).
  """
  jax = _jax()
  if jax is not None and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)

_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary files of atomic writes: `.tmp-atomic-<8 random chars>.<target's name>`, next to their
# target so that the rename stays on one file system. The infix keeps the name apart from other
# scratch names (`.tmp-tokenizer-*` directories, a user's `.tmp-notes`).
TEMP_PREFIX = ".tmp-atomic-"
_TEMP_NAME = re.compile(r"\.tmp-atomic-[a-z0-9_]{8}\..+")
# The names this module used before TEMP_PREFIX: `.tmp-<8 random chars><target's name>`. Their
# leftovers are removed as well, but only when their target's name looks like a file's.
_LEGACY_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}[^/]*\.[A-Za-z0-9]+")


def is_temporary_name(name: str) -> bool:
  """True for the name of an atomic write's temporary file (this version's or an older one's)."""
  return bool(_TEMP_NAME.fullmatch(name) or _LEGACY_TEMP_NAME.fullmatch(name))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
  """Deletes the temporary files that killed atomic writes left under `directory`, recursively.

  Only regular files whose name is an atomic write's temporary name are removed; directories and
  symbolic links are never touched. Call it only when no write into `directory` is under way
  (before a run starts). A directory that does not exist holds nothing to remove.

  Returns:
    The paths removed.
  """
  removed = []
  for root, _, files in os.walk(os.fspath(directory)):
    for name in files:
      path = os.path.join(root, name)
      if is_temporary_name(name) and os.path.isfile(path) and not os.path.islink(path):
        os.unlink(path)
        removed.append(path)
  return removed


def _naming(path: str, error: OSError, reason: str | None = None) -> OSError:
  """`error` as an OSError of the same kind (errno) whose `filename` is `path`."""
  return OSError(error.errno, reason or error.strerror or str(error), path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename; only on the primary process.

  Raises:
    OSError: the write failed. Its `filename` is `path` (not the temporary file, and a failed
      write or fsync, e.g. no space left on the device, names no file at all) and its `strerror`
      says why.
  """
  if not is_primary():
    return
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise _naming(path, e, f"cannot create directory {e.filename}: {e.strerror}") from e
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX,
                               suffix="." + os.path.basename(path))
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise _naming(path, e) from e
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


class JSONFileError(json.JSONDecodeError):
  """A file that does not parse as JSON; unlike json's own error, its message names the file.

  A json.JSONDecodeError (hence a ValueError), so that code catching either still does.
  `path` is the file.
  """

  def __init__(self, path: str | os.PathLike, error: ValueError):
    if isinstance(error, json.JSONDecodeError):
      msg, doc, pos = error.msg, error.doc, error.pos
      what = ("is empty" if not doc.strip() else
              f"is not valid JSON ({msg}: line {error.lineno}, column {error.colno})")
    else:  # UnicodeDecodeError: a binary file
      msg, doc, pos = "not UTF-8 text", "", 0
      what = f"is not valid JSON (not UTF-8 text: {error.reason} at byte {error.start})"
    super().__init__(msg, doc, pos)
    self.path = os.fspath(path)
    self.args = (f"{self.path} {what}",)


def read_json(path: str | os.PathLike) -> Any:
  """The parsed JSON file at `path`.

  Raises:
    OSError: the file cannot be read.
    JSONFileError: it is not JSON (empty, cut short, binary); the message names the file.
  """
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise JSONFileError(path, e) from None
