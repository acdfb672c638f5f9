"""B7: a sharded, accumulated train step equals the single-device step (8 simulated CPU devices).

  python benchmarks/b7_sharded_equality.py [--out benchmarks/results/b7.json]

The demo-sized LLaVA, one packed batch of 16 rows; the step with plain SGD (update = −grad) on one
device and one micro-batch is the reference. Each mesh runs the same global batch in 4
micro-batches with parameters placed by the logical-axis rules. Reported: the normwise relative
error of the whole gradient, the largest per-parameter normwise relative error among parameters
whose gradient is not negligible (norm ≥ 1e-3 of the largest; the attention key biases have an
exactly zero gradient, so their "relative" error is rounding noise over zero), and the relative
loss error. Target ≤ 1e-5.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from visatb_jax import train
from visatb_jax.runtime import sharding  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)

MESHES = ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1},
          {"data": 2, "fsdp": 1, "tensor": 4})
ROWS, LENGTH, IMAGES, TASKS, VOCAB = 16, 128, 2, 5, 512


def _model():
  return common.demo_llava(VOCAB)


def _batch(num_image_tokens: int) -> dict[str, np.ndarray]:
  """Two samples per row, the first with an image block, uneven loss tokens per row."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (ROWS, LENGTH)).astype(np.int32)
  half = LENGTH // 2
  seg = np.where(np.arange(LENGTH) < half, 1, 2)[None].repeat(ROWS, 0).astype(np.int32)
  pos = np.where(np.arange(LENGTH) < half, np.arange(LENGTH), np.arange(LENGTH) - half)
  ids[:, 1:1 + num_image_tokens] = 4
  targets = np.roll(ids, -1, axis=1)
  mask = (rng.random((ROWS, LENGTH)) < rng.uniform(0.1, 0.9, (ROWS, 1))).astype(np.float32)
  mask[:, half - 1] = mask[:, -1] = 0  # no target across the segment boundary or past the end
  task_ids = np.where(mask > 0, rng.integers(0, TASKS, (ROWS, LENGTH)), -1).astype(np.int32)
  images = rng.normal(size=(ROWS, IMAGES, 48, 48, 3)).astype(np.float32)
  return {"input_ids": ids, "targets": targets.astype(np.int32), "loss_mask": mask,
          "task_ids": task_ids, "positions": pos[None].repeat(ROWS, 0).astype(np.int32),
          "segment_ids": seg, "images": images}


def _step(model, batch, mesh, accum):
  tx = optax.sgd(1.0)
  graphdef, params, frozen = train.split_model(model, freeze_vision_tower=False)
  state = train.init_train_state(params, tx)
  state_sh, frozen_sh = sharding.param_shardings(state, mesh), sharding.param_shardings(frozen, mesh)
  step = train.make_train_step(graphdef, tx, mesh=mesh, accum_steps=accum,
                               state_sharding=state_sh, frozen_sharding=frozen_sh)
  lam = np.linspace(0.5, 2.0, TASKS).astype(np.float32)
  new, metrics = step(jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh),
                      sharding.shard_batch(batch, mesh), lam, 1.0)
  grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       params, new.params)
  return grads, float(metrics["loss"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "b7.json"))
  args = parser.parse_args(argv)
  model = _model()
  batch = _batch(model.num_image_tokens)
  ref_grads, ref_loss = _step(model, batch, sharding.make_mesh(devices=jax.devices()[:1]), 1)
  results = {}
  for mesh_config in MESHES:
    grads, loss = _step(model, batch, sharding.make_mesh(mesh_config), 4)
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    diff = np.sqrt(sum(np.sum((g - r) ** 2) for g, r in pairs))
    total = np.sqrt(sum(np.sum(r ** 2) for _, r in pairs))
    largest = max(np.linalg.norm(r) for _, r in pairs)
    per_leaf = [np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in pairs
                if np.linalg.norm(r) >= 1e-3 * largest]
    name = "x".join(f"{k}{v}" for k, v in mesh_config.items())
    results[name] = {"rel_grad_err": float(diff / total), "max_rel_leaf_err": float(max(per_leaf)),
                     "rel_loss_err": abs(loss - ref_loss) / abs(ref_loss)}
    r = results[name]
    print(f"B7 {name:>22}, 4 micro-batches: rel grad err {r['rel_grad_err']:.1e}, max per-param "
          f"{r['max_rel_leaf_err']:.1e}, rel loss err {r['rel_loss_err']:.1e}")
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
