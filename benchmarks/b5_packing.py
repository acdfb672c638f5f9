"""B5: packing efficiency (non-pad fraction of packed rows) on the shapes mix and a LLaVA-like mix.

  python benchmarks/b5_packing.py [--workdir runs/b5] [--out benchmarks/results/b5_packing.json]

Shapes: the demo's real training set (data stage of configs/demo.py, run in --workdir), packed
whole (seeded shuffle, best fill, seq_len 256, <= 6 images per row); training packs each step's
samples apart, a little less tightly (`PackedDataset`, docs/architecture.md, "Batch size in
samples"). LLaVA-like: 100k synthetic sample lengths shaped like the LLaVA-1.5 665k mix at
seq_len 2048 with 576 image tokens per image — short-answer VQA (one image, 1-3 rounds of 15-40
tokens), multi-round VQA/OCR (one image, 5-15 rounds), captions and grounding (one image, 40-120
tokens), LLaVA-Instruct conversations (one image, 150-700 tokens) and text-only ShareGPT
(200-2048 tokens) — packed as PackedDataset packs (`pack_rows_best_fill` after a seeded
shuffle), and, for comparison, first-fit decreasing (`pack_rows` after a stable sort by
decreasing length: PackedDataset's packer before best fill) and first-fit in arrival order; best
fill and first-fit decreasing again in rows of 4096 with <= 16 images. Each figure's `seconds` is
the time its packer takes for the 100k samples; the lower bound is total tokens / 2048 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from visatb_jax.data import packing  # noqa: E402

IMAGE_TOKENS = 576
# (share of samples, images, text-token range) of each kind in the LLaVA-like mix.
LLAVA_LIKE = {
    "short_vqa": (0.45, 1, (40, 160)),
    "multi_round_vqa": (0.15, 1, (150, 600)),
    "caption_grounding": (0.15, 1, (60, 180)),
    "conversation": (0.15, 1, (200, 900)),
    "sharegpt_text": (0.10, 0, (200, 2048)),
}


def llava_like_lengths(n: int, seed: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  kinds = list(LLAVA_LIKE)
  shares = np.array([LLAVA_LIKE[k][0] for k in kinds])
  which = rng.choice(len(kinds), size=n, p=shares / shares.sum())
  lengths, images = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for i, k in enumerate(which):
    _, imgs, (lo, hi) = LLAVA_LIKE[kinds[k]]
    # Log-uniform text lengths: many short samples, a long tail.
    text = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    lengths[i] = min(seq_len, text + imgs * IMAGE_TOKENS)
    images[i] = imgs
  return lengths, images


def efficiency(lengths, images, seq_len, max_images, seed, packer) -> dict:
  """Rows of a seeded shuffle packed by ``packer``: "best_fill" (PackedDataset's),
  "first_fit_decreasing" or "first_fit" (arrival order)."""
  order = np.random.default_rng([seed, 0]).permutation(len(lengths))
  if packer == "first_fit_decreasing":
    order = order[np.argsort(-lengths[order], kind="stable")]
  pack = packing.pack_rows_best_fill if packer == "best_fill" else packing.pack_rows
  start = time.perf_counter()
  rows = pack(lengths[order].tolist(), images[order].tolist(), seq_len, max_images)
  seconds = time.perf_counter() - start
  return {"packer": packer, "samples": int(len(lengths)), "rows": len(rows), "seq_len": seq_len,
          "non_pad": float(lengths.sum() / (len(rows) * seq_len)), "seconds": round(seconds, 2)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "b5"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "b5_packing.json"))
  args = parser.parse_args(argv)
  from visatb_jax.cli import launch
  from visatb_jax.pipeline import config as config_lib
  from visatb_jax.pipeline.workspace import Workspace
  config = launch.load_config(os.path.join(REPO, "configs", "demo.py"))
  ws = Workspace(config_lib.build(config), args.workdir)
  ws.data.prepare()
  examples = ws.data.task_examples(ws.config.tasks.names)
  shapes = efficiency(np.asarray([len(e) for e in examples]),
                      np.asarray([e.num_images for e in examples]), int(config.data.seq_len),
                      int(config.data.max_images), seed=0, packer="best_fill")
  lengths, images = llava_like_lengths(100_000, seed=0, seq_len=2048)
  llava = efficiency(lengths, images, 2048, 8, seed=0, packer="best_fill")
  ffd = efficiency(lengths, images, 2048, 8, seed=0, packer="first_fit_decreasing")
  arrival = efficiency(lengths, images, 2048, 8, seed=0, packer="first_fit")
  # Rows twice the longest sample leave less room unfilled at the end of each row.
  llava_4k = efficiency(lengths, images, 4096, 16, seed=0, packer="best_fill")
  ffd_4k = efficiency(lengths, images, 4096, 16, seed=0, packer="first_fit_decreasing")
  result = {"shapes": shapes, "llava_like": llava, "llava_like_first_fit_decreasing": ffd,
            "llava_like_arrival_order": arrival, "llava_like_rows_4096": llava_4k,
            "llava_like_rows_4096_first_fit_decreasing": ffd_4k,
            "llava_like_lower_bound_rows": float(lengths.sum() / 2048)}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"B5 packing: shapes {shapes['non_pad']:.1%} non-pad ({shapes['samples']} samples, "
        f"{shapes['rows']} rows of {shapes['seq_len']}); LLaVA-like {llava['non_pad']:.1%} "
        f"({llava['samples']} samples, {llava['rows']} rows of {llava['seq_len']}, packed in "
        f"{llava['seconds']:.1f} s; {ffd['non_pad']:.1%} first-fit decreasing, "
        f"{arrival['non_pad']:.1%} in arrival order; {llava_4k['non_pad']:.1%} in rows of 4096, "
        f"{ffd_4k['non_pad']:.1%} first-fit decreasing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
