"""B2: step-time overhead of the VITW weighted loss over plain mean cross-entropy.

  python benchmarks/b2_vitw_overhead.py [--repeats 40] [--out benchmarks/results/b2.json]

The demo-sized LLaVA (configs/demo.py model sizes, frozen vision tower as in the demo) on one
random packed batch of the demo's shape (16 rows × 256 tokens, 6 images per row). Two jitted
forward+backward functions of the trainable parameters: `token_loss` (weighted sum / weight
sum, with the per-task sums the train step reports) and optax's masked-mean
`softmax_cross_entropy_with_integer_labels`. Calls alternate between the two (the order inside
each pair alternates too), warm-up excluded; the overhead is median(VITW) / median(mean CE) − 1,
with the median of the per-pair ratios alongside. Repeated at the demo vocabulary (512) and at a
LLaMA-sized one (32000), where the softmax dominates. Target ≤ 2 %.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from visatb_jax import train
from visatb_jax.core import loss

import common  # noqa: E402  (benchmarks/common.py, next to this script)

ROWS, LENGTH, IMAGES, TASKS = 16, 256, 6, 5
VOCABS = (512, 32_000)


def _model(vocab: int):
  return common.demo_llava(vocab)


def _batch(vocab: int, num_image_tokens: int) -> dict[str, jax.Array]:
  """Four packed samples per row, one image block each (the Batch contract of architecture.md)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab, (ROWS, LENGTH)).astype(np.int32)
  seg_len = LENGTH // 4
  seg = (np.arange(LENGTH) // seg_len + 1)[None].repeat(ROWS, 0).astype(np.int32)
  pos = (np.arange(LENGTH) % seg_len)[None].repeat(ROWS, 0).astype(np.int32)
  for s in range(4):
    ids[:, s * seg_len + 1:s * seg_len + 1 + num_image_tokens] = 4
  targets = np.roll(ids, -1, axis=1)
  mask = (rng.random((ROWS, LENGTH)) < 0.5).astype(np.float32)
  mask[:, seg_len - 1::seg_len] = 0  # no target across a segment boundary
  task_ids = np.where(mask > 0, rng.integers(0, TASKS, (ROWS, LENGTH)), -1).astype(np.int32)
  images = rng.normal(size=(ROWS, IMAGES, 48, 48, 3)).astype(np.float32)
  images[:, 4:] = 0  # unused slots
  return {k: jnp.asarray(v) for k, v in {
      "input_ids": ids, "targets": targets, "loss_mask": mask, "task_ids": task_ids,
      "positions": pos, "segment_ids": seg, "images": images}.items()}


def _grad_fns(graphdef, frozen):
  """Jitted (params, batch, lam) -> (loss, aux, grads) for VITW and for plain mean CE."""

  def logits(params, batch):
    model = nnx.merge(graphdef, params, frozen)
    return model(batch["input_ids"], images=batch["images"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])

  def vitw(params, batch, lam):
    weighted, weight, task_sum, task_count = loss.token_loss(
        logits(params, batch), batch["targets"], batch["loss_mask"], batch["task_ids"], lam)
    return weighted / weight, (task_sum, task_count)

  def mean_ce(params, batch, lam):
    del lam
    nll = optax.softmax_cross_entropy_with_integer_labels(logits(params, batch), batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.sum(mask), ()

  return {name: jax.jit(jax.value_and_grad(f, has_aux=True))
          for name, f in (("vitw", vitw), ("mean_ce", mean_ce))}


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run_vocab(vocab: int, repeats: int, warmup: int = 3) -> dict[str, float]:
  model = _model(vocab)
  graphdef, params, frozen = train.split_model(model, freeze_vision_tower=True)
  batch = _batch(vocab, model.num_image_tokens)
  lam = jnp.ones((TASKS,), jnp.float32)
  fns = _grad_fns(graphdef, frozen)
  (l_vitw, _), _ = fns["vitw"](params, batch, lam)
  (l_ce, _), _ = fns["mean_ce"](params, batch, lam)
  for _ in range(warmup):
    for fn in fns.values():
      _time(fn, params, batch, lam)
  times = {name: [] for name in fns}
  for i in range(repeats):
    order = ("vitw", "mean_ce") if i % 2 == 0 else ("mean_ce", "vitw")
    for name in order:
      times[name].append(_time(fns[name], params, batch, lam))
  med = {name: statistics.median(t) for name, t in times.items()}
  pair = statistics.median(v / c for v, c in zip(times["vitw"], times["mean_ce"]))
  return {"vocab": vocab, "rows": ROWS, "length": LENGTH, "repeats": repeats,
          "median_s_vitw": med["vitw"], "median_s_mean_ce": med["mean_ce"],
          "overhead": med["vitw"] / med["mean_ce"] - 1, "paired_overhead": pair - 1,
          "abs_dloss_lambda1": abs(float(l_vitw) - float(l_ce)),
          "times_s": {k: [round(x, 5) for x in v] for k, v in times.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "b2.json"))
  args = parser.parse_args(argv)
  results = {"device": jax.devices()[0].device_kind, "runs": []}
  for vocab in args.vocabs:
    r = run_vocab(vocab, args.repeats)
    results["runs"].append(r)
    print(f"B2 V={vocab}, {ROWS}x{LENGTH} tokens, fwd+bwd, {args.repeats} interleaved repeats: "
          f"VITW {1e3 * r['median_s_vitw']:.1f} ms vs mean CE {1e3 * r['median_s_mean_ce']:.1f} ms "
          f"median, overhead {100 * r['overhead']:+.2f} % (paired {100 * r['paired_overhead']:+.2f} "
          f"%), |Δloss| at λ=1 {r['abs_dloss_lambda1']:.1e}")
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
