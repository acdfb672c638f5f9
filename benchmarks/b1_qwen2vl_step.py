"""B1 for Qwen2-VL: train-step time, JAX (this project) vs PyTorch transformers, fp32 CPU.

  python benchmarks/b1_qwen2vl_step.py [--runs 5] [--reps 7] [--warmup 2]
                                       [--torch-threads N] [--cores N]
                                       [--out benchmarks/results/b1_qwen2vl.json]

A tiny random `transformers.Qwen2VLForConditionalGeneration` (2-block ViT of width 64, 3-layer
Qwen2 decoder of width 96, vocab 512) is saved and loaded into our model with
`qwen2vl_io.load_pretrained`, so both sides hold the same weights. A full step on each side, as
b1_train_step.py: forward, the VITW loss (λ per task, one division), backward, global-norm
clipping at 1.0 and AdamW (weight decay 0); the vision tower is frozen on both sides except its
`merger` (the projector: `train.split_model(freeze_vision_tower=True)`, requires_grad=False in
torch). JAX runs `train.make_train_step` (the compiled step, donated state) on the Batch the
pipeline makes for Qwen2-VL: `images` [B, M=2, P=64, patch_dim] (each slot's patches first, zeros
after), `image_grid` [B, 2, 3] and M-RoPE `positions` [B, 3, L] from `get_rope_index`. Torch runs
the same loss by hand with `clip_grad_norm_`, `torch.optim.AdamW` (the fastest CPU variant) and
SDPA attention, on the processor's form: all images' patches concatenated (`pixel_values`
[N, patch_dim]), `image_grid_thw` and `mm_token_type_ids`; it computes the M-RoPE positions
itself. Batch: 8 rows x 256 tokens, one sample per row, two images per row of grids (1, 8, 8) and
(1, 4, 8) (16 + 8 image tokens, each block wrapped in vision_start / vision_end), random text
elsewhere, loss on the answer text after the images' prompt.

Within a run, the two sides alternate step by step after a warm-up (compilation, allocator), so a
load on the shared box hits both alike; a run reports each side's median seconds per step and the
first step's loss and gradient norm on both sides (same weights and batch: they must agree).
`--runs N` starts N fresh processes of this script (`--single-run`), the side that steps first
alternating between them, and reports the median and min-max over runs of each side's s/step and
of the ratio JAX/torch in steps/s.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import torch
import transformers

from visatb_jax.data import qwen2vl_image
from visatb_jax.model import qwen2vl_io

import b1_train_step as b1  # noqa: E402  (benchmarks/, next to this script: interleaving, λ, lr)
import common  # noqa: E402

IMG, VIDEO, V_START, V_END = 3, 4, 5, 6
FIRST_TEXT_ID = 7
PATCH, MERGE, TEMPORAL = 14, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
ROWS, LENGTH = 8, 256
GRIDS = ((1, 8, 8), (1, 4, 8))  # Per row, in order: 16 and 8 image tokens.
SLOT_PATCHES = max(t * h * w for t, h, w in GRIDS)  # P: the larger image's 64 patches.
PROMPT_TEXT = (4, 4, 8)  # Text tokens before image 1, between the images, after image 2.
TASKS = b1.TASKS

HF_CONFIG = dict(
    vision_config=dict(depth=2, embed_dim=64, hidden_size=96, num_heads=4, mlp_ratio=2,
                       patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL),
    # head_dim 24: 12 rotary frequencies, split (t, h, w) = (4, 4, 4).
    text_config=dict(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                     max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "mrope_section": [4, 4, 4]}),
    image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=V_START,
    vision_end_token_id=V_END, tie_word_embeddings=False)


def build_pair(*, seed: int = 0, attn: str = "sdpa"):
  """(our model, the transformers model) with identical random weights."""
  torch.manual_seed(seed)
  config = transformers.Qwen2VLConfig(**HF_CONFIG, attn_implementation=attn)
  hf = transformers.Qwen2VLForConditionalGeneration(config)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours = qwen2vl_io.load_pretrained(tmp)
  return ours, hf


def count_params(hf) -> dict[str, int]:
  named = list(hf.named_parameters())
  total = sum(p.numel() for _, p in named)
  frozen = sum(p.numel() for n, p in named if ".visual." in f".{n}" and "merger" not in n)
  return {"total": total, "vision_tower_frozen": frozen, "trainable": total - frozen}


def make_batch(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(our Batch, torch pixel_values [N, patch_dim], image_grid_thw [n_images, 3]).

  Each row: text, <vision_start> image 1 <vision_end>, text, <vision_start> image 2
  <vision_end>, text (the prompt), then the answer up to the end of the row, which the loss
  covers.
  """
  rng = np.random.default_rng(seed)
  vocab = HF_CONFIG["text_config"]["vocab_size"]
  ids = rng.integers(FIRST_TEXT_ID, vocab, (ROWS, LENGTH)).astype(np.int32)
  at = 0
  for text, grid in zip(PROMPT_TEXT, GRIDS):
    at += text
    tokens = int(np.prod(grid)) // MERGE**2
    ids[:, at] = V_START
    ids[:, at + 1:at + 1 + tokens] = IMG
    ids[:, at + 1 + tokens] = V_END
    at += tokens + 2
  answer = at + PROMPT_TEXT[-1]  # First answer token.
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  mask = np.zeros((ROWS, LENGTH), np.float32)
  mask[:, answer - 1:-1] = 1.0  # Position t predicts token t + 1: the answer's tokens.
  task_ids = np.where(mask > 0, rng.integers(0, TASKS, (ROWS, 1)), -1).astype(np.int32)

  images = np.zeros((ROWS, len(GRIDS), SLOT_PATCHES, PATCH_DIM), np.float32)
  image_grid = np.zeros((ROWS, len(GRIDS), 3), np.int32)
  pixels, grid_thw = [], []
  for r in range(ROWS):
    for m, grid in enumerate(GRIDS):
      n = int(np.prod(grid))
      patches = rng.normal(size=(n, PATCH_DIM)).astype(np.float32)
      images[r, m, :n] = patches  # NativeImages.fill's layout: patches first, zeros after.
      image_grid[r, m] = grid
      pixels.append(patches)
      grid_thw.append(grid)
  grid_thw = np.asarray(grid_thw, np.int64)
  positions, _ = qwen2vl_image.get_rope_index(ids, grid_thw, image_token_id=IMG,
                                              spatial_merge_size=MERGE)
  batch = {"input_ids": ids, "targets": targets, "loss_mask": mask, "task_ids": task_ids,
           "positions": positions.astype(np.int32),
           "segment_ids": np.ones((ROWS, LENGTH), np.int32),
           "images": images, "image_grid": image_grid}
  return batch, np.concatenate(pixels), grid_thw


def torch_step_fn(hf, batch, pixel_values, grid_thw):
  """One transformers train step as B1's (`b1.torch_vitw_step`); the tower frozen but its merger,
  on the processor's packed patches."""
  for name, p in hf.model.visual.named_parameters():
    p.requires_grad_(name.startswith("merger."))
  ids = torch.from_numpy(batch["input_ids"]).long()
  mm_types = (ids == IMG).long()
  pixels, grids = torch.from_numpy(pixel_values), torch.from_numpy(grid_thw)
  return b1.torch_vitw_step(hf, batch, lambda: hf(
      input_ids=ids, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=mm_types,
      use_cache=False).logits)


def machine() -> dict[str, Any]:
  return {"cpu_count": os.cpu_count() or 1, "cores_used": len(os.sched_getaffinity(0)),
          "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "jax_devices": [str(d) for d in jax.devices()],
          "loadavg_1_5_15": list(os.getloadavg())}


def single_run(*, warmup: int, reps: int, first: str) -> dict[str, Any]:
  """One measurement in this process; `first` is the side that steps first in every round."""
  ours, hf = build_pair()
  batch, pixel_values, grid_thw = make_batch()
  jax_run = b1.jax_step_fn(ours, batch)
  torch_run = torch_step_fn(hf, batch, pixel_values, grid_thw)
  t0 = time.perf_counter()
  jax_loss, jax_norm = jax_run()  # Also the compilation.
  compile_s = time.perf_counter() - t0
  torch_loss, torch_norm = torch_run()
  fns = {"jax": jax_run, "torch": torch_run}
  order = [first] + [k for k in fns if k != first]
  times = b1.interleaved({k: fns[k] for k in order}, warmup=warmup, reps=reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
      "machine": machine(), "first_side": first, "warmup": warmup, "reps": reps,
      "params": count_params(hf),
      "first_step": {"jax_loss": jax_loss, "torch_loss": torch_loss,
                     "rel_loss_diff": abs(jax_loss - torch_loss) / abs(torch_loss),
                     "jax_grad_norm": jax_norm, "torch_grad_norm": torch_norm,
                     "rel_grad_norm_diff": abs(jax_norm - torch_norm) / abs(torch_norm)},
      "jax_compile_s": compile_s,
      "seconds_per_step": {k: {"median": med[k], "all": v} for k, v in times.items()},
      "ratio_jax_over_torch": med["torch"] / med["jax"],
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "b1_qwen2vl.json"))
  common.add_run_options(parser)
  args = parser.parse_args(argv)

  if args.single_run:
    if args.cores:
      os.sched_setaffinity(0, set(range(args.cores)))
    torch.set_num_threads(min(args.torch_threads, args.cores or args.torch_threads))
    result = single_run(warmup=args.warmup, reps=args.reps, first=args.first)
    common.write_json(args.out, result)
    return 0

  def progress(i, r):
    s, fs = r["seconds_per_step"], r["first_step"]
    print(f"{common.run_prefix(i, args.runs, r)}: jax {s['jax']['median']:.4f} s/step, "
          f"torch {s['torch']['median']:.4f} s/step, ratio jax/torch "
          f"{r['ratio_jax_over_torch']:.2f}x; first step loss {fs['jax_loss']:.6f} / "
          f"{fs['torch_loss']:.6f} (rel {fs['rel_loss_diff']:.1e}), grad norm "
          f"{fs['jax_grad_norm']:.6f} / {fs['torch_grad_norm']:.6f} "
          f"(rel {fs['rel_grad_norm_diff']:.1e}); compile {r['jax_compile_s']:.1f} s", flush=True)

  wall0 = time.perf_counter()
  child = ["--warmup", str(args.warmup), "--reps", str(args.reps),
           "--torch-threads", str(args.torch_threads), "--cores", str(args.cores)]
  runs = common.launch_runs(__file__, child, args.runs, on_run=progress,
                            wait_quiet_s=args.wait_quiet)

  summary = {
      "jax_s_per_step": common.spread([r["seconds_per_step"]["jax"]["median"] for r in runs]),
      "torch_s_per_step": common.spread([r["seconds_per_step"]["torch"]["median"] for r in runs]),
      "ratio_jax_over_torch": common.spread([r["ratio_jax_over_torch"] for r in runs]),
      "max_rel_loss_diff": max(r["first_step"]["rel_loss_diff"] for r in runs),
      "max_rel_grad_norm_diff": max(r["first_step"]["rel_grad_norm_diff"] for r in runs),
  }
  first = runs[0]
  results = {"config": {"hf": HF_CONFIG, "rows": ROWS, "length": LENGTH,
                        "grids_per_row": [list(g) for g in GRIDS], "slot_patches": SLOT_PATCHES,
                        "image_tokens_per_row": sum(int(np.prod(g)) // MERGE**2 for g in GRIDS)},
             "params": first["params"], "runs": args.runs, "warmup": args.warmup,
             "reps": args.reps, "torch_threads": args.torch_threads, "cores": args.cores,
             "wall_s": time.perf_counter() - wall0, "summary": summary, "per_run": runs}

  print(f"B1 qwen2vl over {args.runs} runs x {args.reps} reps: "
        f"jax {common.fmt_spread(summary['jax_s_per_step'], ' s/step')}, "
        f"torch {common.fmt_spread(summary['torch_s_per_step'], ' s/step')}, "
        f"ratio jax/torch (steps/s) {common.fmt_spread(summary['ratio_jax_over_torch'], 'x', 2)}; "
        f"first step max rel diff: loss {summary['max_rel_loss_diff']:.1e}, "
        f"grad norm {summary['max_rel_grad_norm_diff']:.1e}", flush=True)
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
