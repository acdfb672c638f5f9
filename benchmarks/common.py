"""Shared by the benchmark scripts: JSON output, the demo model, runs in separate processes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def write_json(path: str, results: Any) -> None:
  """Writes `results` to `path` (creating its directory), indented for reading."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)


def demo_llava(vocab: int = 512):
  """A LLaVA of configs/demo.py's sizes (seed 0) with the given vocabulary, image token id 4."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import llava  # pylint: disable=g-import-not-at-top
  cfg = model_config.LlavaConfig.from_dict({
      "vision": {"image_size": 48, "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 3, "num_attention_heads": 4},
      "text": {"vocab_size": vocab, "hidden_size": 96, "intermediate_size": 256,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512},
      "image_token_id": 4})
  return llava.LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))


# --- Runs in separate processes ------------------------------------------------------------------
# One process per run, several runs per figure: B1's XLA step was 0.097 s in some runs and 0.155 s
# in others (issue 20), depending on whether another job held one of the box's 2 cores while the
# run lasted (b1_train_step.py's docstring), so a claim needs the spread over fresh processes and
# the box's load during each (`CpuShare`). Used by b1_train_step.py and b4_generate.py
# and b1_qwen2vl_step.py.

SIDES = ("jax", "torch")


def spread(values: list[float]) -> dict[str, float]:
  """Median, min and max of `values` (and how many)."""
  values = [float(v) for v in values]
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "n": len(values)}


def fmt_spread(d: dict[str, float], unit: str = "", digits: int = 4) -> str:
  """'0.1234 s (0.1200-0.1300)': median, then min-max."""
  return (f"{d['median']:.{digits}f}{unit} ({d['min']:.{digits}f}-{d['max']:.{digits}f})")


def loadavg() -> list[float]:
  """The box's 1, 5 and 15-minute load averages (what `uptime` prints)."""
  return [round(x, 2) for x in os.getloadavg()]


def side_order(fns: dict[str, Any], first: str) -> dict[str, Any]:
  """`fns` reordered so that `first` runs first in every interleaved round."""
  if first not in fns:
    raise ValueError(f"first side {first!r} is not one of {list(fns)}")
  return {first: fns[first], **{k: v for k, v in fns.items() if k != first}}


def box_busy_cores(seconds: float = 1.0) -> float:
  """Cores the whole box kept busy over the next `seconds` (from /proc/stat)."""
  share = CpuShare()
  time.sleep(seconds)
  r = share.stop()
  return r["others_cores"] + r["own_cores"]


def wait_for_quiet(max_wait_s: float, *, below: float = 0.25) -> dict[str, float]:
  """Waits (up to `max_wait_s`) until the box is idle: fewer than `below` busy cores over 1 s."""
  t0 = time.perf_counter()
  busy = box_busy_cores()
  while busy >= below and time.perf_counter() - t0 < max_wait_s:
    busy = box_busy_cores()
  return {"waited_s": time.perf_counter() - t0, "busy_cores_at_start": busy}


def add_run_options(parser: Any) -> None:
  """The options every side-by-side benchmark shares: --runs, --torch-threads, --cores,
  --wait-quiet and the internal --single-run / --first of `launch_runs`'s children."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser.add_argument("--runs", type=int, default=5)
  # Default: every core, as XLA's CPU client uses. On a loaded shared box torch's OpenMP threads
  # can slow down badly (spinning barriers), which `--torch-threads 1` shows.
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
  # Both sides confined to the first N cores (the process's CPU affinity, set before JAX starts
  # its thread pool), for a per-core comparison; torch then uses at most N threads.
  parser.add_argument("--cores", type=int, default=0)
  # Before each run, wait up to this many seconds for the box to be idle (other jobs using less
  # than a quarter core): runs then start on a quiet box, though a job may still start during one.
  parser.add_argument("--wait-quiet", type=float, default=0.0)
  # Internal: one measurement in this process, its JSON written to --out.
  parser.add_argument("--single-run", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--first", choices=SIDES, default="jax", help=argparse.SUPPRESS)


def run_prefix(i: int, runs: int, r: dict[str, Any]) -> str:
  """'run 2/5 (torch first, load 1.20 -> 1.10, 16 s)': the head of a progress line."""
  return (f"run {i + 1}/{runs} ({r['first_side']} first, load {r['loadavg_before'][0]:.2f}"
          f" -> {r['loadavg_after'][0]:.2f}, {r['process_wall_s']:.0f} s)")


def launch_runs(script: str, argv: list[str], runs: int, *, on_run: Any = None,
                env: dict[str, str] | None = None, wait_quiet_s: float = 0.0
                ) -> list[dict[str, Any]]:
  """Runs `python script argv --single-run --first SIDE --out TMP.json` `runs` times, each in a
  fresh process, SIDE alternating jax, torch, jax, ... between processes; returns each run's JSON.

  Each returned dict gains: `first_side`, `process_wall_s`, `loadavg_before` / `loadavg_after`
  (1, 5, 15 min), and with `wait_quiet_s` > 0 `quiet_wait` (`wait_for_quiet` before the run: how
  long it waited, the busy cores when it started). `on_run(i, result)` is called after each run
  (for a progress line). `env`: extra environment variables for the child processes. The
  children run under the environment the project's commands give themselves (huge pages for
  XLA:CPU's temporaries, `runtime/host_memory.py`; `VISATB_HUGE_PAGES=0` turns that off), both
  sides alike; each result records its `glibc_tunables`. A child that fails raises
  CalledProcessError.
  """
  from visatb_jax.runtime import host_memory  # pylint: disable=g-import-not-at-top
  child_env = dict(os.environ, **(env or {}))
  child_env = host_memory.huge_page_env(child_env) or child_env
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(runs):
      first = SIDES[i % 2]
      out = os.path.join(tmp, f"run{i}.json")
      cmd = [sys.executable, os.path.abspath(script), *argv, "--single-run", "--first", first,
             "--out", out]
      quiet = wait_for_quiet(wait_quiet_s) if wait_quiet_s > 0 else None
      before = loadavg()
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True, env=child_env)
      wall = time.perf_counter() - t0
      with open(out) as f:
        r = json.load(f)
      r.update(first_side=first, process_wall_s=wall, loadavg_before=before,
               loadavg_after=loadavg(), glibc_tunables=child_env.get("GLIBC_TUNABLES", ""))
      if quiet is not None:
        r["quiet_wait"] = quiet
      results.append(r)
      if on_run is not None:
        on_run(i, r)
  return results


# A run counts as quiet when the rest of the box used less than this many cores during its timed
# part (CpuShare's others_cores).
QUIET_OTHERS_CORES = 0.25


def load_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The 1-minute load average seen before and after the runs: min and max over them."""
  ones = [r[k][0] for r in runs for k in ("loadavg_before", "loadavg_after")]
  return {"loadavg_1min_min": min(ones), "loadavg_1min_max": max(ones)}


class CpuShare:
  """How many cores this process and everything else on the box used between start and `stop`.

  From /proc/stat (the box's busy time; steal excluded) and os.times() (this process, all its
  threads). `others_cores` near 0: the measurement had the box to itself; near 1 on a 2-core box:
  another job held a core, which halves what a 2-thread XLA step can use (B1's two modes).
  """

  def __init__(self):
    self._start = self._read()

  @staticmethod
  def _read() -> tuple[float, float, float]:
    with open("/proc/stat") as f:
      user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system

  def stop(self) -> dict[str, float]:
    (w0, b0, o0), (w1, b1, o1) = self._start, self._read()
    wall = max(w1 - w0, 1e-9)
    own = (o1 - o0) / wall
    return {"wall_s": wall, "own_cores": own, "others_cores": max((b1 - b0) / wall - own, 0.0)}


def spreads(rows: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
  """Spread over runs of each metric (`metrics`: name -> function of one run's result, which has
  `cpu_share`), over all runs and separately over the quiet and the contended ones (the rest of
  the box using fewer / at least QUIET_OTHERS_CORES cores): {name: spread, "others_cores":
  spread, "quiet": {"n", name: spread}, "contended": {...}}; a subset without runs is {"n": 0}.
  """
  def over(rs):
    return {name: spread([fn(r) for r in rs]) for name, fn in metrics.items()}

  quiet = [r for r in rows if r["cpu_share"]["others_cores"] < QUIET_OTHERS_CORES]
  contended = [r for r in rows if r["cpu_share"]["others_cores"] >= QUIET_OTHERS_CORES]
  return {**over(rows), "others_cores": spread([r["cpu_share"]["others_cores"] for r in rows]),
          "quiet": {"n": len(quiet), **(over(quiet) if quiet else {})},
          "contended": {"n": len(contended), **(over(contended) if contended else {})}}


def summarize_sizes(runs: list[dict[str, Any]], sizes: list[str], metrics: dict[str, Any],
                    **extras: Any) -> dict[str, Any]:
  """Per size of a `--runs` benchmark: `spreads` of `metrics` over the runs, the spread of the
  JAX compile time, and each `extras` entry (name -> function of that size's per-run results)."""
  out = {}
  for name in sizes:
    rs = [r["sizes"][name] for r in runs]
    out[name] = {**spreads(rs, metrics), **{k: fn(rs) for k, fn in extras.items()},
                 "jax_compile_s": spread([r["jax_compile_s"] for r in rs])}
  return out


def run_record(args: Any, command: list[str], t0: float, runs: list[dict[str, Any]],
               summary: Any, **extra: Any) -> dict[str, Any]:
  """The JSON a `--runs` benchmark writes: its command and settings, the load, every run."""
  import time  # pylint: disable=g-import-not-at-top
  return {"command": " ".join(command), "runs": args.runs, "warmup": args.warmup,
          "reps": args.reps, **extra, "torch_threads": args.torch_threads, "cores": args.cores,
          "wait_quiet_s": args.wait_quiet, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "wall_s": time.perf_counter() - t0, "load": load_summary(runs),
          "machine": runs[0]["machine"], "summary": summary, "per_run": runs}


def print_subsets(s: dict[str, Any], runs: int, describe: Any) -> None:
  """The quiet and the contended runs' own spreads, when the runs were of both kinds."""
  for subset in ("quiet", "contended"):
    if 0 < s[subset]["n"] < runs:
      print(f"  {subset} runs ({s[subset]['n']}): {describe(s[subset])}", flush=True)
