"""B9: every method of the comparison on the demo benchmark, over several seeds.

  python benchmarks/b9_methods_seeds.py [--seeds 0 1 2 3 4] [--baselines ew stl]
      [--workdir runs/b9] [--out benchmarks/results/b9.json] [--config.X=V ...]

Runs the demo pipeline once per seed (data, initial model and every random choice follow the seed)
with the chosen baselines (default: EW and STL), then aggregates report/comparison.json and
lambda.json: per seed, λ with its bootstrap interval and each method's ΔI% and ΔE%; over seeds,
mean ± std of ΔI%, ΔE% and the step time relative to EW, the paired per-seed difference
VisATB − EW with its mean and a 90 % t-interval over seeds, and the rank stability of λ across
seeds (Spearman's ρ of every pair of seeds). Any further `--config.X=V` is passed to every run
(e.g. `--config.balance.shrinkage=none` for the paper's λ).
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
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--baselines", nargs="+", default=["ew", "stl"],
                      help=f"any of {', '.join(BASELINES)}")
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "b9"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "b9.json"))
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}")
  args.overrides = overrides
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
                  "--overwrite", *args.overrides], cwd=REPO, check=True)
  walls[seed] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "report", "comparison.json")) as f:
    per_seed[seed] = json.load(f)
  with open(os.path.join(workdir, "lambda.json")) as f:
    balance = json.load(f)
  shares = (balance.get("variance") or {}).get("training_share", {}).get("lambda", {})
  per_seed[seed]["lambda"] = {t: {"value": v, "interval": balance["intervals"]["lambda"][t],
                                  "training_share": shares.get(t),
                                  "fixed": t in (balance.get("fixed") or {})}
                              for t, v in balance["lambda"].items()}
  with open(os.path.join(workdir, "scores", "test.json")) as f:
    per_seed[seed]["test"] = json.load(f)
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


def _spearman(per_seed):
  """Spearman's ρ between the balanced tasks' λ of every pair of seeds (ties get average ranks;
  None where one seed's λ are all equal, e.g. all 1 under the evidence rule: no ranking)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (the test extras have it)
  seeds = sorted(per_seed)
  tasks = [t for t, v in per_seed[seeds[0]]["lambda"].items() if not v.get("fixed")]
  out = {}
  for i, a in enumerate(seeds):
    for b in seeds[i + 1:]:
      la = [per_seed[a]["lambda"][t]["value"] for t in tasks]
      lb = [per_seed[b]["lambda"][t]["value"] for t in tasks]
      if np.ptp(la) == 0 or np.ptp(lb) == 0:
        out[f"{a}-{b}"] = None
        continue
      out[f"{a}-{b}"] = float(stats.spearmanr(la, lb).statistic)
  return out


def _t_interval(values, level=0.9):
  """The mean's two-sided t-interval over seeds (None for fewer than 2 values)."""
  if len(values) < 2:
    return None
  from scipy import stats  # pylint: disable=g-import-not-at-top  (the test extras have it)
  half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(
      len(values))
  return [float(np.mean(values) - half), float(np.mean(values) + half)]


def _paired(per_seed, method="visatb", reference="ew"):
  diffs = {k: [r[method][k] - r[reference][k] for r in per_seed.values()
               if "delta_i" in r.get(method, {}) and "delta_i" in r.get(reference, {})]
           for k in ("delta_i", "delta_e")}
  return {k: {"per_seed": v, **(_mean_std(v) or {}), "interval_90": _t_interval(v)}
          for k, v in diffs.items()}


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
    gains = ", ".join(f"{u} {v['value']:+.3f} [{v['interval'][0]:+.3f}, {v['interval'][1]:+.3f}]"
                      for u, v in r["gain"].items())
    stl = (r.get("ew") or {}).get("stl_vs_ew") or {}
    print(f"    own-data gains: {gains}; STL − EW: "
          + ", ".join(f"{t} {d['difference']:+.3f} [{d['interval'][0]:+.3f}, "
                      f"{d['interval'][1]:+.3f}]" for t, d in stl.items())
          + f"; under-trained by EW: {(r.get('ew') or {}).get('under_trained') or 'none'}")
  for key, label in (("delta_i", "ΔI%"), ("delta_e", "ΔE%")):
    paired = _paired(per_seed)[key]
    values = ", ".join(f"{v:+.2f}" for v in paired["per_seed"])
    interval = paired.get("interval_90")
    mean = "n/a" if paired.get("mean") is None else f"{paired['mean']:+.2f}"
    print(f"  VisATB − EW, {label}: {values} (mean {mean}, 90 % t-interval "
          + ("n/a" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]") + ")")
  if len(per_seed) > 1:
    print(f"  λ rank agreement (Spearman ρ per seed pair): {_spearman(per_seed)}")


if __name__ == "__main__":
  sys.exit(main())
