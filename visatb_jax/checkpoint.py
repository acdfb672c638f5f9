"""Orbax checkpoints of the train state (step, trainable params, optimizer state).

Frozen parameters (the vision tower) are not saved: they come unchanged from the
pretrained model the caller builds, and saving them would multiply disk use for nothing.
"""

from __future__ import annotations

import os
from typing import TypeVar

import jax
import orbax.checkpoint as ocp

PyTree = TypeVar("PyTree")


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a pytree under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    # Orbax wants absolute paths.
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree) -> None:
    """Starts an async save; device-to-host copies finish before this returns,
    so the caller may donate `state` right after."""
    self._manager.save(int(step), args=ocp.args.StandardSave(state))

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores `step` (default: latest) with the structure, dtypes and shardings of `target`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
