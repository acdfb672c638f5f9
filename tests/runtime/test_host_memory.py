"""Tests for the huge-page re-exec of the command-line entry points."""

import os
import subprocess
import sys

import pytest

from visatb_jax.runtime import host_memory

GLIBC = ("glibc", "2.36")


def test_adds_the_tunable_and_keeps_the_rest():
  env = host_memory.huge_page_env({"PATH": "/bin"}, GLIBC, "madvise")
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host_memory.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, libc, mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise"),  # after the re-exec: no loop
    ({"VISATB_HUGE_PAGES": "0"}, GLIBC, "madvise"),                    # opted out
    ({}, ("glibc", "2.31"), "madvise"),                                 # no such tunable yet
    ({}, ("", ""), "madvise"),                                          # musl, macOS
    ({}, GLIBC, "never"),                                               # huge pages off
    ({}, GLIBC, ""),                                                    # unknown: not Linux
])
def test_no_change_where_it_would_do_nothing(environ, libc, mode):
  assert host_memory.huge_page_env(environ, libc, mode) is None


@pytest.mark.parametrize("environ, nodes, expected", [
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"], True),    # the user's choice beats the nodes
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),             # an accelerator first
    ({"JAX_PLATFORMS": " TPU "}, [], False),
    ({}, ["/dev/accel0"], False),                           # unset: JAX takes the TPU
    ({}, [], True),                                         # unset, nothing but the CPU
])
def test_xla_cpu_runs_the_step(environ, nodes, expected):
  assert host_memory.xla_cpu_runs_the_step(environ, nodes) is expected


def test_no_restart_where_an_accelerator_runs_the_step(monkeypatch):
  monkeypatch.setattr(host_memory, "xla_cpu_runs_the_step", lambda environ: False)
  assert host_memory.huge_page_env({}, GLIBC, "madvise") is None
  monkeypatch.setattr(host_memory, "xla_cpu_runs_the_step", lambda environ: True)
  assert host_memory.huge_page_env({}, GLIBC, "madvise") is not None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(f)) == "madvise"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("mode, expected", [
    ("madvise", ["start", "start", "glibc.malloc.hugetlb=1"]),  # restarted once, then no loop
    ("never", ["start", "None"]),                                # nothing to gain: no restart
])
def test_reexec_restarts_the_same_command_once_with_the_tunable(mode, expected):
  # The machine's glibc and THP mode are fixed inside the child, so both paths run on any host.
  code = ("import os, platform; from visatb_jax.runtime import host_memory; "
          "platform.libc_ver = lambda *a, **k: ('glibc', '2.39'); "
          f"host_memory.thp_mode = lambda *a, **k: {mode!r}; "
          "host_memory.xla_cpu_runs_the_step = lambda *a, **k: True; "
          "print('start', flush=True); host_memory.reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VISATB_HUGE_PAGES")}
  run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  assert run.stdout.split() == expected
  assert run.stderr == ""  # a command's --help and its one-line errors stay as they were


@pytest.mark.parametrize("environ, says", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "hugetlb=1, huge pages"),
    ({"VISATB_HUGE_PAGES": "0"}, "(VISATB_HUGE_PAGES=0)"),
    ({"JAX_PLATFORMS": "cuda"}, "an accelerator runs the step"),
])
def test_status_line_says_which_and_why(environ, says):
  line = host_memory.status_line(environ)
  assert line.startswith("host memory: ") and says in line and "\n" not in line
