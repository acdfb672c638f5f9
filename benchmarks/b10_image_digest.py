"""B10 (image digests): what fingerprinting images by content costs, per 10k images.

  python benchmarks/b10_image_digest.py [--images 10000] [--runs 3] [--dir /tmp] \
      [--out benchmarks/results/b10_image_digest.json]

Writes `--images` 336×336 JPEGs (LLaVA-1.5's input size; a smooth picture with noise, about 34 KB
each at quality 85) into a temporary directory under `--dir` (its file system is the one
measured), waits until they are older than the cache's racy window (image_digest._RACY_NS: a
data set is written long before a run), then times `image_digest.file_digests`, the function
both fingerprint sites call, over all of them. Each run, in this order:

- **first run, cold**: an empty cache, and the images' pages dropped from the page cache
  (fsync, then posix_fadvise DONTNEED on each file, which needs no root): every byte is read from
  the disk and hashed, as on a data set not read since the machine started;
- **re-run**: the cache file that run wrote, read as a new process would (the in-process copy
  dropped): a stat per image, no image read;
- **first run, warm**: an empty cache again, the images now in the page cache: hashing without
  the disk, as right after the data were written or read.

For reference, the fingerprint before images were hashed (a stat per image, a digest of
name, size and mtime) is timed too. Each phase reports the box's load: the 1-minute load average
and the cores that other processes kept busy while it ran (`common.CpuShare`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from visatb_jax.data import image_digest

import common  # noqa: E402  (benchmarks/common.py, next to this script)

SIZE = 336


def _jpeg(rng: np.random.Generator) -> bytes:
  """A 336×336 JPEG of a smooth random pattern with noise: about 34 KB, like a photo's."""
  y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
  channels = []
  for _ in range(3):
    a, b, c, f = rng.uniform(-1, 1, 4)
    channels.append(128 + 90 * np.sin(f * 6 * x + a) * np.cos(3 * y * b + c))
  pixels = np.stack(channels, -1) + rng.normal(0, 14, (SIZE, SIZE, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
  return buf.getvalue()


def write_images(directory: str, n: int) -> list[str]:
  rng = np.random.default_rng(0)
  # 64 distinct pictures, each file made unique by 8 bytes after the JPEG's end marker (decoders
  # ignore them): encoding 10k JPEGs takes about 4 minutes here, far longer than what is measured,
  # and hashing costs the same whatever the bytes are.
  pictures = [_jpeg(rng) for _ in range(64)]
  paths = []
  for i in range(n):
    path = os.path.join(directory, f"{i:08d}.jpg")
    with open(path, "wb") as f:
      f.write(pictures[i % len(pictures)] + i.to_bytes(8, "little"))
    paths.append(path)
  return paths


def drop_from_page_cache(paths: list[str]) -> None:
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def old_fingerprint(paths: list[str]) -> str:
  """The fingerprint before images were hashed: name, size and mtime of each."""
  digest = hashlib.sha256()
  for p in paths:
    st = os.stat(p)
    digest.update(f"{os.path.basename(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def timed(fn) -> dict:
  load = common.loadavg()[0]
  share = common.CpuShare()
  t0 = time.perf_counter()
  value = fn()
  seconds = time.perf_counter() - t0
  cpu = share.stop()
  return {"seconds": seconds, "loadavg_1min": load, "others_cores": round(cpu["others_cores"], 2),
          "own_cores": round(cpu["own_cores"], 2), "value": value}


def one_run(paths: list[str], scratch: str, k: int) -> dict:
  def digests(cache):
    out = image_digest.file_digests(paths, cache)
    return hashlib.sha256("".join(out[p] or "-" for p in paths).encode()).hexdigest()

  cache = os.path.join(scratch, f"cache{k}")
  drop_from_page_cache(paths)
  image_digest._LOADED.clear()  # pylint: disable=protected-access
  cold = timed(lambda: digests(cache))
  image_digest._LOADED.clear()  # pylint: disable=protected-access  (as in a new process)
  rerun = timed(lambda: digests(cache))
  warm_cache = os.path.join(scratch, f"warm{k}")
  image_digest._LOADED.clear()  # pylint: disable=protected-access
  warm = timed(lambda: digests(warm_cache))
  old = timed(lambda: old_fingerprint(paths))
  assert cold["value"] == rerun["value"] == warm["value"], "digests differ between runs"
  cache_bytes = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
  return {"first_cold": cold, "rerun": rerun, "first_warm": warm, "old_stat_only": old,
          "cache_file_bytes": cache_bytes}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=10_000)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dir", default=tempfile.gettempdir(),
                      help="where the image tree is written (its file system is measured)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "b10_image_digest.json"))
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(dir=args.dir, prefix="b10-")
  try:
    images = os.path.join(scratch, "images")
    os.makedirs(images)
    t0 = time.perf_counter()
    paths = write_images(images, args.images)
    total = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} JPEGs of {total / len(paths) / 1e3:.1f} KB on average "
          f"({total / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    time.sleep(image_digest._RACY_NS / 1e9 + 0.5)  # pylint: disable=protected-access
    runs = []
    for k in range(args.runs):
      r = one_run(paths, scratch, k)
      runs.append(r)
      print(f"run {k + 1}/{args.runs}: " + ", ".join(
          f"{name} {r[name]['seconds']:.3f} s (load {r[name]['loadavg_1min']:.2f}, others "
          f"{r[name]['others_cores']:.2f} cores)"
          for name in ("first_cold", "rerun", "first_warm", "old_stat_only")), flush=True)
    per_10k = 10_000 / len(paths)
    summary = {name: common.spread([r[name]["seconds"] * per_10k for r in runs])
               for name in ("first_cold", "rerun", "first_warm", "old_stat_only")}
    result = {
        "images": len(paths), "mean_image_bytes": total / len(paths), "total_bytes": total,
        "seconds_per_10k_images": summary, "runs": runs,
        "cache_file_bytes": runs[-1]["cache_file_bytes"],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "directory": args.dir},
    }
    common.write_json(args.out, result)
    for name, s in summary.items():
      print(f"{name}: {common.fmt_spread(s, ' s', 3)} per 10k images")
    print(f"wrote {args.out}")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
