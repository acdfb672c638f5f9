"""B6: the demo pipeline end to end (README's first command), wall time and per-stage times.

  python benchmarks/b6_demo_pipeline.py [--workdir runs/b6] [--out benchmarks/results/b6.json]

Runs `python -m visatb_jax.launch --config configs/demo.py` in a fresh run directory, then reads
the stage times from its manifest and the test scores from its outputs. Target: <= 10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "b6"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "b6.json"))
  args = parser.parse_args(argv)
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "visatb_jax.launch", "--config", "configs/demo.py",
                  "--workdir", args.workdir], cwd=REPO, check=True)
  wall = time.time() - t0
  with open(os.path.join(args.workdir, "manifest.json")) as f:
    recorded = json.load(f)["stages"]
  order = ("data", "pretrain", "prep", "validate", "lambda", "final", "test", "report")
  stages = {k: recorded[k]["seconds"] for k in order if k in recorded}
  with open(os.path.join(args.workdir, "scores", "test.json")) as f:
    test = json.load(f)
  with open(os.path.join(args.workdir, "lambda.json")) as f:
    balance = json.load(f)
  lam = {t: {"value": v, "interval": balance["intervals"]["lambda"][t],
             "training_share": balance["variance"]["training_share"]["lambda"][t]}
         for t, v in balance["lambda"].items()}
  result = {"wall_s": round(wall, 1), "stages_s": stages, "lambda": lam, "test": test,
            "noisy": balance["noisy"], "replicates": balance["bootstrap"]["replicates"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}"}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"B6 demo pipeline: {wall / 60:.1f} min wall on {os.cpu_count()} cores; stages "
        + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()))
  print("  λ " + ", ".join(
      f"{t} {v['value']:.3f} [{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]"
      + ("" if v["training_share"] is None else f" train {100 * v['training_share']:.0f} %")
      for t, v in lam.items()) + f"; noisy own-data gains: {balance['noisy'] or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
