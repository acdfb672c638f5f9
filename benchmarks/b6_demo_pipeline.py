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
PREVIOUS_DEMO = ["--config.pretrain.enabled=false",
                 "--config.task_order=('caption','vqa','count','grounding','chat')",
                 "--config.data.shapes.count_scope=any", "--config.data.shapes.sizes.val=128",
                 "--config.data.shapes.sizes.test=128", "--config.balance.temperature=0.5"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "b6"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "b6.json"))
  parser.add_argument("--previous-demo", action="store_true",
                      help="the demo as it was before the pretrain stage (5 tasks, 128 validation "
                      "samples, T = 0.5): the same job as earlier B6 figures, on today's code")
  args = parser.parse_args(argv)
  overrides = PREVIOUS_DEMO if args.previous_demo else []
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "visatb_jax.launch", "--config", "configs/demo.py",
                  "--workdir", args.workdir, *overrides], cwd=REPO, check=True)
  wall = time.time() - t0
  with open(os.path.join(args.workdir, "manifest.json")) as f:
    recorded = json.load(f)["stages"]
  order = ("data", "pretrain", "prep", "validate", "lambda", "final", "test", "report")
  stages = {k: recorded[k]["seconds"] for k in order if k in recorded}
  with open(os.path.join(args.workdir, "scores", "test.json")) as f:
    test = json.load(f)
  with open(os.path.join(args.workdir, "lambda.json")) as f:
    lam = json.load(f)["lambda"]
  result = {"wall_s": round(wall, 1), "stages_s": stages, "lambda": lam, "test": test,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}"}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"B6 demo pipeline: {wall / 60:.1f} min wall on {os.cpu_count()} cores; stages "
        + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
