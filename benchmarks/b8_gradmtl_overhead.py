"""B8: per-step time of the gradient-method train steps vs the EW step, demo-sized model.

  python benchmarks/b8_gradmtl_overhead.py [--steps 5] [--out benchmarks/results/b8.json]

The LLaVA of configs/demo.py (vision tower frozen, as the trainer does), one packed batch of
16 rows × 256 tokens over the demo's 5 tasks, the demo optimizer (clip + AdamW). For the EW step
(`train.make_train_step`) and for each method of `gradmtl_step.make_gradmtl_train_step` (default
options): compile time, then the median wall time of `--steps` steps (each waited for). Reported:
those times and the ratio of each method's median step time to the EW step's. Runs on whatever
single device JAX gives (CPU when none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from visatb_jax import train
from visatb_jax.runtime import sharding
from visatb_jax.core import gradmtl
from visatb_jax.train import gradmtl_step

import common  # noqa: E402  (benchmarks/common.py, next to this script)

ROWS, LENGTH, IMAGES, TASKS, VOCAB = 16, 256, 2, 5, 512


def _model():
  return common.demo_llava(VOCAB)


def _batch(num_image_tokens: int) -> dict[str, np.ndarray]:
  """Two samples per row, each starting with an image block; about half the tokens carry loss."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (ROWS, LENGTH)).astype(np.int32)
  half = LENGTH // 2
  seg = np.where(np.arange(LENGTH) < half, 1, 2)[None].repeat(ROWS, 0).astype(np.int32)
  pos = np.where(np.arange(LENGTH) < half, np.arange(LENGTH), np.arange(LENGTH) - half)
  ids[:, 1:1 + num_image_tokens] = 4
  ids[:, half + 1:half + 1 + num_image_tokens] = 4
  targets = np.roll(ids, -1, axis=1)
  mask = (np.arange(LENGTH) % half > half // 2).astype(np.float32)[None].repeat(ROWS, 0)
  mask[:, half - 1] = mask[:, -1] = 0  # no target across the segment boundary or past the end
  task_of_segment = rng.integers(0, TASKS, (ROWS, 2))
  task_ids = np.where(mask > 0, np.where(seg == 1, task_of_segment[:, :1], task_of_segment[:, 1:]),
                      -1).astype(np.int32)
  images = rng.normal(size=(ROWS, IMAGES, 48, 48, 3)).astype(np.float32)
  return {"input_ids": ids, "targets": targets.astype(np.int32), "loss_mask": mask,
          "task_ids": task_ids, "positions": pos[None].repeat(ROWS, 0).astype(np.int32),
          "segment_ids": seg, "images": images}


def _time(step, args, steps: int) -> tuple[float, list[float]]:
  """(compile + first call seconds, per-step seconds of `steps` further calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(step(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - t0)
  return first, times


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--methods", default=",".join(sorted(gradmtl.METHODS)))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "b8.json"))
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = _model()
  tx = train.make_optimizer({"steps": 100, "lr": 1e-3})
  graphdef, params, frozen = train.split_model(model)
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  # The same step state every call (no donation), so every step does the same work.
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  frozen = sharding.replicate(frozen, mesh)
  batch = sharding.shard_batch(_batch(model.num_image_tokens), mesh)
  lam, lr = np.ones(TASKS, np.float32), np.float32(1e-3)

  ew_first, ew_times = _time(train.make_train_step(graphdef, tx, mesh=mesh),
                             (state, frozen, batch, lam, lr), args.steps)
  ew = statistics.median(ew_times)
  results = {"device": str(jax.devices()[0].device_kind), "rows": ROWS, "length": LENGTH,
             "tasks": TASKS, "trainable_params": num_params, "G_bytes": TASKS * num_params * 4,
             "steps": args.steps,
             "ew": {"first_call_s": ew_first, "median_step_s": ew, "step_s": ew_times}}
  print(f"B8 {jax.devices()[0].device_kind}, {num_params} trainable params, T={TASKS}: "
        f"EW {ew * 1e3:.0f} ms/step (first call {ew_first:.1f} s)")
  for method in args.methods.split(","):
    step = gradmtl_step.make_gradmtl_train_step(graphdef, tx, mesh=mesh, method=method)
    mtl = sharding.replicate(gradmtl_step.init_mtl_state(method, TASKS), mesh)
    first, times = _time(step, (state, frozen, batch, lam, lr, mtl), args.steps)
    median = statistics.median(times)
    results[method] = {"first_call_s": first, "median_step_s": median, "step_s": times,
                       "ratio_to_ew": median / ew}
    print(f"B8 {method:>7}: {median * 1e3:.0f} ms/step, {median / ew:.2f}× EW "
          f"(first call {first:.1f} s)")
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
