"""Checkpoint managers saving at the same time from two threads (side-by-side preparation runs,
prep.parallel > 1) do not trip over each other.

orbax hands the "directory created" signal of an async save to its writers under a process-wide
operation id, which another manager's save advances in between; with directories created in the
background, one run's writers waited for the other's keys (a 300 s signalling timeout) or raced
it to the same temporary directory (FileExistsError / FileNotFoundError), in about every other run
of this test before runtime/checkpoint.py made directories inside `save`.
"""

import threading

import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.multihost import multihost

from visatb_jax.runtime import checkpoint


@pytest.fixture
def short_signal_timeout(monkeypatch):
  """A lost signal fails the test in seconds instead of orbax's 300."""
  monkeypatch.setattr(multihost, "_DEFAULT_BARRIER_TIMEOUT", 10)


def _save_steps(directory, steps, errors):
  try:
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
    for step in range(1, steps + 1):
      ckpt.save(step, {"w": jnp.full((64,), step, jnp.float32)})
    ckpt.close()
  except BaseException as e:  # pylint: disable=broad-except
    errors.append(e)


@pytest.mark.parametrize("attempt", range(3))
def test_two_threads_save_side_by_side(tmp_path, short_signal_timeout, attempt):
  del attempt  # each attempt races the two threads anew
  steps, errors = 25, []
  threads = [threading.Thread(target=_save_steps, args=(tmp_path / str(k), steps, errors))
             for k in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads), "a save hangs"
  assert not errors, errors
  for k in range(2):
    ckpt = checkpoint.Checkpointer(tmp_path / str(k))
    assert ckpt.all_steps() == [steps - 1, steps]
    restored = ckpt.restore({"w": jnp.zeros((64,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.full((64,), steps, np.float32))
    ckpt.close()
