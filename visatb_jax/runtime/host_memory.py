"""Transparent huge pages for XLA:CPU's per-step temporaries: glibc's malloc tunable, set by
re-executing the command once at its start.

Why: XLA:CPU allocates each execution's temporaries as one block (the demo model's train step:
92 MB). glibc serves a block over 32 MB with mmap and unmaps it when freed, so every step faults
its whole working set in again, 4 KiB at a time: 22,400 page faults and 31 ms of kernel time in
a 130 ms step (B1 tiny, one core, BENCHMARKS.md). With the `glibc.malloc.hugetlb=1` tunable glibc
marks such blocks for transparent huge pages: 467 faults, 12 ms. XLA:CPU has no allocator option,
and glibc reads its tunables only when a process starts, hence the re-exec. Torch's CPU step gets
faster under it too (B1 runs both sides in one process, so under the same setting).

Only where XLA:CPU runs the step: with `JAX_PLATFORMS` naming an accelerator first, or (unset) on
a host with a GPU or TPU device node, the command is not restarted (its host allocations are not
the step's). A pipeline run says which in one line of its log (`status_line`). Set
`VISATB_HUGE_PAGES=0` to run without it.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "VISATB_HUGE_PAGES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable
# Device nodes of the accelerators JAX picks before the CPU when JAX_PLATFORMS is unset: NVIDIA
# GPUs, TPUs (v4 and later: /dev/accel*, /dev/vfio), AMD GPUs.
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def _opted_out(environ: Mapping[str, str]) -> bool:
  return environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


def xla_cpu_runs_the_step(environ: Mapping[str, str],
                          accelerator_nodes: Sequence[str] | None = None) -> bool:
  """Whether JAX will run on the CPU: `JAX_PLATFORMS` names "cpu" first, or it is unset and no
  accelerator device node exists (`accelerator_nodes`: paths found, default this machine's).
  Decided without importing jax, which the re-exec must come before."""
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  if accelerator_nodes is None:
    accelerator_nodes = [p for pattern in _ACCELERATOR_NODES for p in glob.glob(pattern)]
  return not accelerator_nodes


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
  tunable already set (by the user or an earlier re-exec), `VISATB_HUGE_PAGES=0`, or the step
  not on XLA:CPU (`xla_cpu_runs_the_step`).

  `libc` (name, version) and `mode` default to this machine's (`platform.libc_ver()`,
  `thp_mode()`).
  """
  if _opted_out(environ):
    return None
  if not xla_cpu_runs_the_step(environ):
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


def status_line(environ: Mapping[str, str] | None = None) -> str:
  """One log line: whether this process runs with the tunable, and how to change that."""
  environ = os.environ if environ is None else environ
  if f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", ""):
    return (f"host memory: {TUNABLE}=1, huge pages for XLA:CPU's per-step buffers "
            f"({OPT_OUT}=0 turns it off)")
  if _opted_out(environ):
    return f"host memory: glibc's defaults ({OPT_OUT}=0)"
  if not xla_cpu_runs_the_step(environ):
    return "host memory: glibc's defaults (an accelerator runs the step)"
  return "host memory: glibc's defaults (no glibc >= 2.35 with transparent huge pages here)"
