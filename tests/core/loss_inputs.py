"""Random inputs of the chunked cross-entropy tests: an LM head, hidden states and the batch's
targets, loss mask (with a padded tail) and task ids (imported as `loss_inputs`: tests/core is on
sys.path under pytest)."""

import numpy as np

LAM = (2.0, 0.5, 1.0)  # one weight per task; len(LAM) tasks


def random_inputs(rng: np.random.Generator, rows: int, length: int, d: int, v: int):
  """((kernel [d, v], bias [v], hidden [rows, length, d]), (targets, mask, task ids, λ))."""
  tasks = len(LAM)
  hidden = rng.normal(size=(rows, length, d)).astype(np.float32)
  kernel = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  targets = rng.integers(0, v, size=(rows, length)).astype(np.int32)
  mask = (rng.random((rows, length)) < 0.6).astype(np.float32)
  mask[-1, length // 2:] = 0  # a padded tail
  task_ids = np.where(mask > 0, rng.integers(0, tasks, size=(rows, length)), -1).astype(np.int32)
  return (kernel, bias, hidden), (targets, mask, task_ids, np.array(LAM, np.float32))
