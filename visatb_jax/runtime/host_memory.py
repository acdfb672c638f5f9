"""Transparent huge pages for XLA:CPU's per-step temporaries: glibc's malloc tunable, set by
re-executing the command once at its start.

Why: XLA:CPU allocates each execution's temporaries as one block (the demo model's train step:
92 MB). glibc serves a block over 32 MB with mmap and unmaps it when freed, so every step faults
its whole working set in again, 4 KiB at a time: 22,400 page faults and 31 ms of kernel time in
a 130 ms step (B1 tiny, one core, BENCHMARKS.md). With the `glibc.malloc.hugetlb=1` tunable glibc
marks such blocks for transparent huge pages: 467 faults, 12 ms. XLA:CPU has no allocator option,
and glibc reads its tunables only when a process starts, hence the re-exec. Torch's CPU step gets
faster under it too (B1 runs both sides in one process, so under the same setting).

Set `VISATB_HUGE_PAGES=0` to run without it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "VISATB_HUGE_PAGES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def thp_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def huge_page_env(environ: Mapping[str, str], libc: tuple[str, str] | None = None,
                  mode: str | None = None) -> dict[str, str] | None:
  """`environ` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES, or None where it would
  change nothing: not glibc >= 2.35, the kernel's huge pages off ("never") or unknown, the
  tunable already set (by the user or an earlier re-exec), or `VISATB_HUGE_PAGES=0`.

  `libc` (name, version) and `mode` default to this machine's (`platform.libc_ver()`,
  `thp_mode()`).
  """
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  name, version = platform.libc_ver() if libc is None else libc
  try:
    numbers = tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None
  if name != "glibc" or numbers < _MIN_GLIBC:
    return None
  if (thp_mode() if mode is None else mode) not in ("always", "madvise"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command (`sys.orig_argv`) under `huge_page_env`; returns
  without doing anything where that is None. Call it first thing in a command's entry point,
  before any work whose effects would be lost: the process image is replaced (same PID, same
  open standard streams)."""
  env = huge_page_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
