"""B9: every method of the comparison on the demo benchmark, over several seeds.

  python benchmarks/b9_methods_seeds.py [--seeds 0 1 2] [--baselines ew tla stl imgrad]
      [--workdir runs/b9] [--out benchmarks/results/b9.json]

Runs the demo pipeline once per seed (data, initial model and every random choice follow the seed)
with the chosen baselines (default: every one) then aggregates report/comparison.json and
lambda.json: per seed, λ with its bootstrap interval and each method's ΔI% and ΔE%; over seeds,
mean ± std of ΔI%, ΔE% and the step time relative to EW, the paired per-seed difference
VisATB − EW, and the rank stability of λ across seeds (Spearman's ρ of every pair of seeds).
Seeds already finished are reused (the pipeline resumes; stages that another config made are
redone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("ew", "tla", "stl", "rlw", "dwa", "igb", "imgrad", "cagrad", "pcgrad", "mgda", "nash")


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--baselines", nargs="+", default=list(BASELINES))
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "b9"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "b9.json"))
  args = parser.parse_args(argv)
  per_seed, walls = {}, {}
  for seed in args.seeds:
    _run_seed(seed, args, per_seed, walls)
    _write(args, per_seed, walls)  # after every seed: a long run leaves partial figures behind
  _print(per_seed)
  return 0


def _run_seed(seed, args, per_seed, walls):
  """Runs (or resumes) the pipeline of one seed and reads its comparison and λ."""
  workdir = os.path.join(args.workdir, f"seed{seed}")
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "visatb_jax.launch", "--config", "configs/demo.py",
                  "--workdir", workdir, f"--config.seed={seed}", f"--config.model.init_seed={seed}",
                  f"--config.baselines={tuple(args.baselines)!r}",
                  # Its own run directories: stages made by another config (an older demo, other
                  # baselines) are redone, and the log says which and why.
                  "--overwrite"], cwd=REPO, check=True)
  walls[seed] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "report", "comparison.json")) as f:
    per_seed[seed] = json.load(f)
  with open(os.path.join(workdir, "lambda.json")) as f:
    balance = json.load(f)
  per_seed[seed]["lambda"] = {t: {"value": v, "interval": balance["intervals"]["lambda"][t]}
                              for t, v in balance["lambda"].items()}
  per_seed[seed]["gain"] = {u: {"value": v, "interval": balance["intervals"]["gain"][u]}
                            for u, v in balance["gain"].items()}
  per_seed[seed]["noisy"] = balance["noisy"]
  per_seed[seed]["temperature"] = balance["temperature"]


def _methods(per_seed):
  seen = {m for r in per_seed.values() for m, v in r.items() if isinstance(v, dict) and "delta_i" in v}
  return ["visatb"] + sorted(seen - {"visatb"})


def _summary(per_seed):
  return {m: {k: _mean_std([r.get(m, {}).get(k) for r in per_seed.values()])
              for k in ("delta_i", "delta_e", "step_time_vs_ew")} for m in _methods(per_seed)}


def _ranks(values):
  order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
  return order.astype(float)


def _spearman(per_seed):
  """Spearman's ρ between the balanced tasks' λ of every pair of seeds (no ties expected)."""
  seeds = sorted(per_seed)
  tasks = [t for t, v in per_seed[seeds[0]]["lambda"].items()
           if v["interval"][0] != v["interval"][1]]  # fixed tasks have a zero-width interval
  out = {}
  for i, a in enumerate(seeds):
    for b in seeds[i + 1:]:
      ra = _ranks([per_seed[a]["lambda"][t]["value"] for t in tasks])
      rb = _ranks([per_seed[b]["lambda"][t]["value"] for t in tasks])
      out[f"{a}-{b}"] = float(np.corrcoef(ra, rb)[0, 1])
  return out


def _paired(per_seed, method="visatb", reference="ew"):
  diffs = {k: [r[method][k] - r[reference][k] for r in per_seed.values()
               if "delta_i" in r.get(method, {}) and "delta_i" in r.get(reference, {})]
           for k in ("delta_i", "delta_e")}
  return {k: {"per_seed": v, **(_mean_std(v) or {})} for k, v in diffs.items()}


def _write(args, per_seed, walls):
  result = {"seeds": sorted(per_seed), "wall_s": walls, "summary": _summary(per_seed),
            "visatb_minus_ew": _paired(per_seed),
            "lambda_spearman": _spearman(per_seed) if len(per_seed) > 1 else {},
            "per_seed": per_seed, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


def _print(per_seed):
  def fmt(x):
    return "n/a" if x is None else f"{x['mean']:+.1f} ± {x['std']:.1f}"
  summary = _summary(per_seed)
  print(f"B9 over seeds {sorted(per_seed)}:")
  for m in _methods(per_seed):
    s = summary[m]
    t = s["step_time_vs_ew"]
    print(f"  {m:7s} ΔI% {fmt(s['delta_i']):>14s}  ΔE% {fmt(s['delta_e']):>14s}  "
          f"step {'n/a' if t is None else format(t['mean'], '.2f') + '×'}")
  for seed, r in sorted(per_seed.items()):
    lam = ", ".join(f"{k} {v['value']:.2f} [{v['interval'][0]:.2f}, {v['interval'][1]:.2f}]"
                    for k, v in r["lambda"].items())
    print(f"  seed {seed}: λ {lam}; noisy gains: {r['noisy'] or 'none'}")
  paired = _paired(per_seed)["delta_i"]
  print(f"  VisATB − EW, ΔI%: {paired.get('per_seed')} (mean {paired.get('mean')})")
  if len(per_seed) > 1:
    print(f"  λ rank agreement (Spearman ρ per seed pair): {_spearman(per_seed)}")


if __name__ == "__main__":
  sys.exit(main())
