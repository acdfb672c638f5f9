"""B5 (loader): samples/s of the grain loader (decode, template, tokenize, pack, batch), 0 and 2 workers.

  python benchmarks/b5_loader_throughput.py [--per-task 768] [--seconds 20] \
      [--out benchmarks/results/b5_loader.json]

The demo's shapes benchmark (``configs/demo.py`` sizes and shapes: 48-pixel images, 9 image tokens,
``max_len`` 128, rows of 256 tokens with up to 6 images, 96 samples per step padded to 24 rows
(the demo's steps need ~18), a 512-token tokenizer
trained as ``experiment.py`` trains it) is prepared as array_record once (``prepare.py``); the
loader then runs for ``--seconds`` after its first batch (the first batch, which includes starting
the worker processes, is timed apart). A sample counts once it is packed into a returned batch.
For reference, the in-memory path used today (every sample encoded and its image decoded up front,
then ``packing.PackedDataset.batch_at``) is timed on the same data: its up-front encoding time and
its batches/s. Packing efficiency (non-pad fraction) of both is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

from visatb_jax.runtime import fileio
from visatb_jax.data import images as images_lib
from visatb_jax.data import loader, packing, prepare, shapes, sources, template
from visatb_jax.data import tokenizer as tk

SEQ_LEN, MAX_LEN, MAX_IMAGES, IMAGE_SIZE, N_IMG, BATCH, VOCAB = 256, 128, 6, 48, 9, 96, 512
ROWS = 24  # rows a step of BATCH samples is padded to


def _tokenizer(samples):
  roles = {"human": "USER:", "gpt": "ASSISTANT:"}
  texts = [" ".join([template.SYSTEM_PROMPT] + [f"{roles[t['from']]} {t['value']}"
                                                 for t in s["conversations"]]) for s in samples]
  return tk.train_tokenizer(texts, vocab_size=VOCAB, save_dir=None)


def _run_loader(source, tok, tasks, workers: int, seconds: float) -> dict:
  config = loader.LoaderConfig(
      tasks=tasks, seq_len=SEQ_LEN, max_images=MAX_IMAGES, image_size=IMAGE_SIZE,
      num_image_tokens=N_IMG, max_len=MAX_LEN, batch_size=BATCH, seed=0, worker_count=workers,
      rows_per_step=ROWS)
  start = time.perf_counter()
  with loader.Loader(source, tok, config, process_index=0, process_count=1) as it:
    next(it)
    first = time.perf_counter() - start
    samples = batches = tokens = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      b = next(it)
      batches += 1
      samples += int(b["segment_ids"].max(axis=1).sum())
      tokens += int((b["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - t0
  return {"workers": workers, "first_batch_s": round(first, 2), "batches": batches,
          "seconds": round(elapsed, 2), "samples_per_s": round(samples / elapsed, 1),
          "batches_per_s": round(batches / elapsed, 2),
          "packing_efficiency": round(tokens / (batches * ROWS * SEQ_LEN), 4)}


def _run_in_memory(samples, tok, tasks, seconds: float) -> dict:
  t0 = time.perf_counter()
  examples = []
  for s in samples:
    enc = template.encode_conversation(s["conversations"], tok, num_image_tokens=N_IMG,
                                       max_len=MAX_LEN)
    if enc is None:
      continue
    imgs = images_lib.load_images(s["image_paths"], IMAGE_SIZE)
    examples.append(packing.Example(enc.input_ids, enc.label_mask, tasks.index(s["task"]), imgs))
  ds = packing.PackedDataset(examples, seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                             pad_id=tok.pad_token_id, seed=0, batch_size=BATCH)
  encode_s = time.perf_counter() - t0
  samples_n = batches = tokens = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = ds.batch_at(batches, ROWS)
    batches += 1
    samples_n += int(b["segment_ids"].max(axis=1).sum())
    tokens += int((b["segment_ids"] > 0).sum())
  elapsed = time.perf_counter() - t0
  return {"encode_all_s": round(encode_s, 2), "encode_all_samples_per_s":
          round(len(samples) / encode_s, 1), "batch_at_samples_per_s": round(samples_n / elapsed, 1),
          "batch_at_batches_per_s": round(batches / elapsed, 2),
          "packing_efficiency": round(tokens / (batches * ROWS * SEQ_LEN), 4)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per-task", type=int, default=768)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "b5_loader.json"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="b5-") as work:
    t0 = time.perf_counter()
    shapes.generate_benchmark(os.path.join(work, "shapes"), seed=0, sizes={"train": args.per_task})
    samples = sources.load_split(os.path.join(work, "shapes"), "train").samples
    tok = _tokenizer(samples)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = prepare.prepare_mixture({"train": samples}, os.path.join(work, "prep"))
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare.prepare_mixture({"train": samples}, os.path.join(work, "prep"))
    reuse_s = time.perf_counter() - t0
    tasks = tuple(shapes.TASKS)
    source = prepared.data_source("train")
    runs = [_run_loader(source, tok, tasks, w, args.seconds) for w in args.workers]
    for r in runs:
      print(r, flush=True)
    in_memory = _run_in_memory(samples, tok, list(tasks), args.seconds)
    print(in_memory, flush=True)
    result = {
        "benchmark": "B5 loader throughput (shapes, demo shapes)",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "note": "shared CPU box"},
        "data": {"samples": len(samples), "tasks": list(tasks), "seq_len": SEQ_LEN,
                 "max_len": MAX_LEN, "max_images": MAX_IMAGES, "image_size": IMAGE_SIZE,
                 "rows_per_batch": BATCH},
        "generate_and_tokenizer_s": round(generate_s, 2), "prepare_s": round(prepare_s, 2),
        "prepare_reuse_s": round(reuse_s, 3),
        "prepared_bytes": sum(os.path.getsize(os.path.join(prepared.directory, f))
                              for f in os.listdir(prepared.directory)),
        "loader": runs, "in_memory_packed_dataset": in_memory}
  fileio.atomic_write_json(args.out, result, sort_keys=False)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
