"""B3: chunked cross-entropy vs full logits, peak memory and agreement of loss + grad.

  python benchmarks/b3_chunked_ce.py [--hidden 1024] [--tokens 8192] [--chunk 1024]
                                     [--run-budget-gib 3] [--out benchmarks/results/b3.json]

For each vocabulary (32k, 152k): loss+grad (wrt the hidden states and the lm_head kernel) of the
VITW weighted sum over `tokens` tokens (4 rows), computed by `loss.token_loss` on the full
[tokens, V] logits and by `loss.chunked_token_loss`. Memory is XLA's own figure for the compiled
jitted loss+grad (`compiled.memory_analysis()`): the reported peak is temp + argument + output
bytes (temp alone, the part chunking changes, is reported too). Agreement: |Δloss| of the
normalised loss (weighted sum / weight sum) and the largest normwise relative error of the two
gradients. Targets: chunked ≤ 25 % of the full-logits memory, |Δloss| ≤ 1e-5.

Memory needs only compilation; agreement needs the full-logits version to run, which at 152k ×
8k tokens takes ~10 GiB of temporaries. On a shared box the agreement run is therefore done on
the first rows only (`run_tokens`, halved until the full version's temporaries fit in
`--run-budget-gib`); memory is always reported at `--tokens`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from visatb_jax.core import loss

import common  # noqa: E402  (benchmarks/common.py, next to this script)

VOCABS = (32_000, 152_064)  # LLaMA/Vicuna and Qwen2 vocabularies
ROWS, TASKS = 4, 5


def _inputs(tokens: int, hidden: int, vocab: int) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(0)
  length = tokens // ROWS
  h = rng.normal(size=(ROWS, length, hidden)).astype(np.float32)
  kernel = (rng.normal(size=(hidden, vocab)) / np.sqrt(hidden)).astype(np.float32)
  targets = rng.integers(0, vocab, (ROWS, length)).astype(np.int32)
  mask = (rng.random((ROWS, length)) < 0.6).astype(np.float32)
  task_ids = np.where(mask > 0, rng.integers(0, TASKS, (ROWS, length)), -1).astype(np.int32)
  lam = np.linspace(0.5, 2.0, TASKS).astype(np.float32)
  return tuple(map(jnp.asarray, (kernel, h, targets, mask, task_ids, lam)))


def _loss_and_grad(chunk: int | None):
  """jit((kernel, hidden, batch...) -> (loss, (d kernel, d hidden))); chunk None: full logits."""

  def weighted_sum(kernel, hidden, targets, mask, task_ids, lam):
    head = lambda h: jnp.dot(h, kernel, preferred_element_type=jnp.float32)
    if chunk is None:
      out = loss.token_loss(head(hidden), targets, mask, task_ids, lam)
    else:
      out = loss.chunked_token_loss(hidden, head, targets, mask, task_ids, lam, chunk_size=chunk)
    return out[0], out[1]

  def f(*args):
    (weighted, weight), grads = jax.value_and_grad(weighted_sum, argnums=(0, 1), has_aux=True)(
        *args)
    return weighted / weight, grads

  return jax.jit(f)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "peak_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes
                            + m.output_size_in_bytes)}


def _rel(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_vocab(vocab: int, tokens: int, hidden: int, chunk: int,
              run_budget: float) -> dict[str, float]:
  args = _inputs(tokens, hidden, vocab)
  out = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "chunk": chunk}
  for name, c in (("full", None), ("chunked", chunk)):
    out[name] = _memory(_loss_and_grad(c).lower(*args).compile())
  rows = ROWS
  while rows > 1 and out["full"]["temp_bytes"] * rows / ROWS > run_budget:
    rows //= 2
  out["run_tokens"] = tokens * rows // ROWS
  args = (args[0], *(a[:rows] for a in args[1:5]), args[5])
  results = {}
  for name, c in (("full", None), ("chunked", chunk)):
    compiled = _loss_and_grad(c).lower(*args).compile()
    start = time.perf_counter()
    value, grads = jax.block_until_ready(compiled(*args))
    out[name]["seconds"] = time.perf_counter() - start
    # Keep host copies only: the device buffers of the full version are gigabytes.
    results[name] = (float(value), *(np.asarray(g) for g in grads))
    del value, grads, compiled
  (full_loss, full_dk, full_dh), (ch_loss, ch_dk, ch_dh) = results["full"], results["chunked"]
  out["loss"] = full_loss
  out["abs_dloss"] = abs(ch_loss - full_loss)
  out["rel_grad_err_kernel"] = _rel(ch_dk, full_dk)
  out["rel_grad_err_hidden"] = _rel(ch_dh, full_dh)
  out["max_rel_grad_err"] = max(out["rel_grad_err_kernel"], out["rel_grad_err_hidden"])
  out["peak_ratio"] = out["chunked"]["peak_bytes"] / out["full"]["peak_bytes"]
  out["temp_ratio"] = out["chunked"]["temp_bytes"] / out["full"]["temp_bytes"]
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--chunk", type=int, default=1024)
  parser.add_argument("--run-budget-gib", type=float, default=3.0,
                      help="largest full-logits temporaries the agreement run may allocate")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "b3.json"))
  args = parser.parse_args(argv)
  results = {"device": jax.devices()[0].device_kind, "peak": "temp + argument + output bytes of "
             "the compiled loss+grad (XLA memory_analysis)", "vocabs": []}
  for vocab in VOCABS:
    r = run_vocab(vocab, args.tokens, args.hidden, args.chunk, args.run_budget_gib * 2.0 ** 30)
    results["vocabs"].append(r)
    gib = 2.0 ** 30
    print(f"B3 V={vocab}, {args.tokens} tokens, D={args.hidden}, chunk {args.chunk}: peak "
          f"{r['chunked']['peak_bytes'] / gib:.2f} vs {r['full']['peak_bytes'] / gib:.2f} GiB "
          f"({100 * r['peak_ratio']:.1f} %; temp {100 * r['temp_ratio']:.1f} %); on "
          f"{r['run_tokens']} tokens: |Δloss| {r['abs_dloss']:.1e}, max rel grad err {r['max_rel_grad_err']:.1e}, "
          f"time {r['chunked']['seconds']:.1f} vs {r['full']['seconds']:.1f} s")
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
