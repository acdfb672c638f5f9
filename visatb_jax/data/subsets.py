"""Mini and large subsets of every task (docs/method.md section 2).

One seeded permutation per task: the large subset is its first ceil(R_large * n) samples and the
mini subset its first ceil(R_mini * n), so mini is always inside large and both are fixed by the seed.
Replicate r of the preparation runs (docs/method.md §13) draws its subsets and its data order from
`replicate_seed(seed, r)`; replicate 0 keeps the run's seed, so one replicate is the paper's setup.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

# The paper's recommendations; below them the balancing still runs, with a warning.
MIN_MINI_SAMPLES = 1_000
MIN_LARGE_SAMPLES = 10_000


def replicate_seed(seed: int, replicate: int) -> int:
  """The data seed of preparation replicate `replicate` (0: `seed` itself)."""
  if replicate < 0:
    raise ValueError(f"replicate must be >= 0, got {replicate}")
  if replicate == 0:
    return int(seed)
  # A 31-bit draw keyed by (seed, replicate): never equal to another replicate's by construction
  # of the key, and a valid seed for every consumer (numpy, the packer, grain).
  return int(np.random.SeedSequence([int(seed), int(replicate)]).generate_state(1)[0] >> 1)


def subset_indices(n: int, rate: float, *, seed: int, task_index: int) -> np.ndarray:
  """Indices of the first ceil(rate * n) samples of the task's seeded permutation."""
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"subset rate must be in (0, 1], got {rate}")
  perm = np.random.default_rng([seed, task_index]).permutation(n)
  return np.sort(perm[: max(1, math.ceil(rate * n))])


def split_subsets(
    counts: Mapping[str, int],
    tasks: Sequence[str],
    *,
    r_large: float,
    r_mini: float,
    seed: int,
) -> dict[str, dict[str, np.ndarray]]:
  """{task: {"large": idx, "mini": idx}} with mini ⊂ large, indices into each task's samples."""
  if r_mini > r_large:
    raise ValueError(f"r_mini={r_mini} must not exceed r_large={r_large}")
  out = {}
  for k, task in enumerate(tasks):
    n = counts.get(task, 0)
    if n == 0:
      raise ValueError(f"task {task!r} has no training samples")
    out[task] = {
        "large": subset_indices(n, r_large, seed=seed, task_index=k),
        "mini": subset_indices(n, r_mini, seed=seed, task_index=k),
    }
  return out


def size_warnings(subsets: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
  """Human-readable warnings for subsets below the paper's recommended sizes."""
  msgs = []
  for task, s in subsets.items():
    if len(s["mini"]) < MIN_MINI_SAMPLES:
      msgs.append(f"task {task!r}: mini subset has {len(s['mini'])} samples "
                  f"(< {MIN_MINI_SAMPLES} recommended)")
    if len(s["large"]) < MIN_LARGE_SAMPLES:
      msgs.append(f"task {task!r}: large subset has {len(s['large'])} samples "
                  f"(< {MIN_LARGE_SAMPLES} recommended)")
  for m in msgs:
    warnings.warn(m, stacklevel=2)
  return msgs
