"""B4: greedy generation with a KV cache, JAX (this project) vs transformers `generate`, CPU fp32.

  python benchmarks/b4_generate.py [--sizes tiny,100m] [--runs 5] [--new-tokens 32] [--reps 5]
                                   [--warmup 1] [--torch-threads N] [--cores N] [--wait-quiet S]
                                   [--out benchmarks/results/b4.json]

The same models as B1 (`b1_train_step.SIZES`: the demo's tiny LLaVA and a 128.8M-param one), the
same weights on both sides (saved by transformers, loaded by `hf_io.load_pretrained`). A batch of
8 left-padded prompts of different lengths, each with one image; exactly `--new-tokens` tokens per
row on both sides (no EOS: ours gets eos_id −1, transformers eos_token_id None). JAX runs
`generate.greedy_generate` (prefill + a compiled while-loop of cached decode steps); torch runs
`LlavaForConditionalGeneration.generate(do_sample=False)` with its default dynamic KV cache and
SDPA attention, under `torch.inference_mode`. Both timings are whole calls (prefill, image tower
and decoding, host transfer included; JAX's compilation is done in the warm-up), alternating call
by call so that the shared box's load hits both alike. A run reports: median seconds per call,
generated tokens/s of each side, the ratio JAX/torch, whether the tokens are equal, and the cores
this process and the rest of the box used while the calls ran.

`--runs N` (default 5): N fresh processes, the side called first alternating between them;
median and min-max over runs, over all runs and over quiet and contended ones apart (as B1: on
the 2-core box XLA decodes on both cores, torch on its thread(s), so another job holding a core
slows the JAX side only).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import b1_train_step as b1

from visatb_jax.model.generate import greedy_generate

import common  # noqa: E402  (benchmarks/common.py, next to this script)

PROMPTS = 8


def make_prompts(cfg, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids int64 [B, L] left-padded, mask [B, L], images float32 [B, 1, H, W, 3]).

  Each prompt: a few text tokens, one image block, then 8 to 40 text tokens.
  """
  rng = np.random.default_rng(seed)
  p, vocab = cfg.num_image_tokens, cfg.text.vocab_size
  rows = []
  for i in range(PROMPTS):
    tail = 8 + (i * 32) // (PROMPTS - 1)
    rows.append(list(rng.integers(5, vocab, 3)) + [b1.IMAGE_TOKEN_ID] * p
                + list(rng.integers(5, vocab, tail)))
  length = max(map(len, rows))
  ids = np.zeros((PROMPTS, length), np.int64)
  mask = np.zeros((PROMPTS, length), np.int64)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  v = cfg.vision
  images = rng.normal(size=(PROMPTS, 1, v.image_size, v.image_size, 3)).astype(np.float32)
  return ids, mask, images


def bench_size(name: str, *, new_tokens: int, warmup: int, reps: int,
               first: str = "jax") -> dict[str, Any]:
  size = b1.SIZES[name]
  cfg, ours, hf = b1.build_pair(size)
  hf.eval()
  ids, mask, images = make_prompts(cfg)
  t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
  pixels = b1.torch_pixels(images)

  def run_jax():
    return greedy_generate(ours, ids, mask, images, max_new_tokens=new_tokens, eos_id=-1,
                           pad_id=0)

  def run_torch():
    with torch.inference_mode():
      out = hf.generate(input_ids=t_ids, attention_mask=t_mask, pixel_values=pixels,
                        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()

  t0 = time.perf_counter()
  jax_tokens = run_jax()  # Also the compilation.
  compile_s = time.perf_counter() - t0
  torch_tokens = run_torch()
  if torch_tokens.shape != (PROMPTS, new_tokens):
    raise RuntimeError(f"transformers generated {torch_tokens.shape}, expected "
                       f"{(PROMPTS, new_tokens)}")
  share = common.CpuShare()
  times = b1.interleaved(common.side_order({"jax": run_jax, "torch": run_torch}, first),
                         warmup=warmup, reps=reps)
  cpu = share.stop()
  med = {k: statistics.median(v) for k, v in times.items()}
  equal = jax_tokens == torch_tokens
  # The first disagreeing column of each row (new_tokens where the row agrees entirely).
  first_diff = [int(np.argmin(r)) if not r.all() else new_tokens for r in equal]
  return {
      "config": {"vision": size.vision, "text": size.text, "image_token_id": b1.IMAGE_TOKEN_ID,
                 "prompts": PROMPTS, "prompt_columns": int(ids.shape[1]),
                 "prompt_lengths": mask.sum(1).tolist(), "new_tokens": new_tokens},
      "params": b1.count_params(hf),
      "tokens_equal": bool(equal.all()),
      "fraction_equal": float(equal.mean()),
      "first_diff_per_row": first_diff,
      "distinct_tokens": len(set(torch_tokens.ravel().tolist())),
      "jax_compile_s": compile_s,
      "seconds_per_call": {k: {"median": med[k], "all": v} for k, v in times.items()},
      "tokens_per_s": {k: PROMPTS * new_tokens / med[k] for k in med},
      "ratio_jax_over_torch": med["torch"] / med["jax"],
      # Cores used by this process and by everything else while the calls ran.
      "cpu_share": cpu,
  }


def single_run(args) -> dict[str, Any]:
  """Every size of `args.sizes` measured in this process."""
  if args.cores:
    os.sched_setaffinity(0, set(range(args.cores)))
  torch.set_num_threads(min(args.torch_threads, args.cores or args.torch_threads))
  results = {"machine": b1.machine(), "first_side": args.first, "warmup": args.warmup,
             "reps": args.reps, "interleaved": True, "sizes": {}}
  for name in args.sizes.split(","):
    r = bench_size(name, new_tokens=args.new_tokens, warmup=args.warmup, reps=args.reps,
                   first=args.first)
    results["sizes"][name] = r
    tps = r["tokens_per_s"]
    print(f"B4 {name} ({args.first} first): jax {tps['jax']:.1f} tok/s, torch {tps['torch']:.1f} "
          f"tok/s, ratio jax/torch {r['ratio_jax_over_torch']:.2f}x; tokens equal: "
          f"{r['tokens_equal']} ({r['fraction_equal']:.3f}), {r['distinct_tokens']} distinct; "
          f"cores used by others {r['cpu_share']['others_cores']:.2f}", flush=True)
  return results


METRICS = {"jax_tokens_per_s": lambda r: r["tokens_per_s"]["jax"],
           "torch_tokens_per_s": lambda r: r["tokens_per_s"]["torch"],
           "jax_s_per_call": lambda r: r["seconds_per_call"]["jax"]["median"],
           "torch_s_per_call": lambda r: r["seconds_per_call"]["torch"]["median"],
           "ratio_jax_over_torch": lambda r: r["ratio_jax_over_torch"]}


def summarize(runs: list[dict[str, Any]], sizes: list[str]) -> dict[str, Any]:
  """Per size: median and min-max over runs of each side's tokens/s and s/call and of the ratio
  (all runs, quiet ones, contended ones: `common.spreads`), and whether every run's tokens agreed.
  """
  return common.summarize_sizes(
      runs, sizes, METRICS,
      tokens_equal_every_run=lambda rs: all(r["tokens_equal"] for r in rs))


def describe(s: dict[str, Any]) -> str:
  """'jax ... tok/s (min-max), torch ..., ratio ...' of one `common.spreads` (sub)set."""
  return (f"jax {common.fmt_spread(s['jax_tokens_per_s'], ' tok/s', 1)}, "
          f"torch {common.fmt_spread(s['torch_tokens_per_s'], ' tok/s', 1)}, "
          f"ratio jax/torch {common.fmt_spread(s['ratio_jax_over_torch'], 'x', 2)}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,100m")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "b4.json"))
  common.add_run_options(parser)
  args = parser.parse_args(argv)
  sizes = args.sizes.split(",")

  if args.single_run:
    common.write_json(args.out, single_run(args))
    return 0

  def progress(i, r):
    line = "; ".join(f"{n}: jax {r['sizes'][n]['tokens_per_s']['jax']:.1f} tok/s, torch "
                     f"{r['sizes'][n]['tokens_per_s']['torch']:.1f} tok/s, "
                     f"{r['sizes'][n]['ratio_jax_over_torch']:.2f}x, equal "
                     f"{r['sizes'][n]['tokens_equal']}, others used "
                     f"{r['sizes'][n]['cpu_share']['others_cores']:.2f} cores" for n in sizes)
    print(f"{common.run_prefix(i, args.runs, r)}: {line}", flush=True)

  t0 = time.perf_counter()
  child = ["--sizes", args.sizes, "--new-tokens", str(args.new_tokens), "--warmup",
           str(args.warmup), "--reps", str(args.reps), "--torch-threads", str(args.torch_threads),
           "--cores", str(args.cores)]
  runs = common.launch_runs(__file__, child, args.runs, on_run=progress,
                            wait_quiet_s=args.wait_quiet)
  summary = summarize(runs, sizes)
  command = ["python", "benchmarks/b4_generate.py"] + list(sys.argv[1:] if argv is None else argv)
  results = common.run_record(args, command, t0, runs, summary, new_tokens=args.new_tokens)
  load = results["load"]
  for name in sizes:
    s = summary[name]
    print(f"B4 {name} over {args.runs} runs x {args.reps} calls (median, min-max): {describe(s)}; "
          f"tokens equal in every run: {s['tokens_equal_every_run']}; load "
          f"{load['loadavg_1min_min']:.2f}-{load['loadavg_1min_max']:.2f}, cores used by others "
          f"{common.fmt_spread(s['others_cores'], '', 2)}", flush=True)
    common.print_subsets(s, args.runs, describe)
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
