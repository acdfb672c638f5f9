"""Atomic file writes: a killed run never leaves a half-written output behind.

In a multi-process JAX run every process computes the same outputs, and the run directory is
shared: only process 0 writes (`is_primary`), and `sync` is the barrier after which the others may
read what it wrote. Without `jax.distributed` both are trivial, and jax is never imported here.
"""

from __future__ import annotations

import json
import os
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename; only on the primary process."""
  if not is_primary():
    return
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)
