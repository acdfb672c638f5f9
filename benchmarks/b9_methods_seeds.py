"""B9: every method of the comparison on the demo benchmark, over several seeds.

  python benchmarks/b9_methods_seeds.py [--seeds 0 1 2] [--workdir runs/b9] [--out benchmarks/results/b9.json]

Runs the demo pipeline once per seed (data, initial model and every random choice follow the seed)
with every baseline — EW, TLA, STL, RLW, DWA, IGBv1 and the gradient methods IMGrad, CAGrad,
PCGrad, MGDA, Nash-MTL — then aggregates report/comparison.json: mean ± std over seeds of ΔI%,
ΔE% and the step time relative to EW. Seeds already finished are reused (the pipeline resumes).
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
                  f"--config.baselines={BASELINES!r}"], cwd=REPO, check=True)
  walls[seed] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "report", "comparison.json")) as f:
    per_seed[seed] = json.load(f)
  with open(os.path.join(workdir, "lambda.json")) as f:
    per_seed[seed]["lambda"] = json.load(f)["lambda"]


METHODS = ["visatb"] + [m for m in BASELINES if m != "stl"]


def _summary(per_seed):
  return {m: {k: _mean_std([r.get(m, {}).get(k) for r in per_seed.values()])
              for k in ("delta_i", "delta_e", "step_time_vs_ew")} for m in METHODS}


def _write(args, per_seed, walls):
  result = {"seeds": sorted(per_seed), "wall_s": walls, "summary": _summary(per_seed),
            "per_seed": per_seed, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


def _print(per_seed):
  def fmt(x):
    return "n/a" if x is None else f"{x['mean']:+.1f} ± {x['std']:.1f}"
  summary = _summary(per_seed)
  print(f"B9 over seeds {sorted(per_seed)}:")
  for m in METHODS:
    s = summary[m]
    t = s["step_time_vs_ew"]
    print(f"  {m:7s} ΔI% {fmt(s['delta_i']):>14s}  ΔE% {fmt(s['delta_e']):>14s}  "
          f"step {'n/a' if t is None else format(t['mean'], '.2f') + '×'}")


if __name__ == "__main__":
  sys.exit(main())
