"""Orbax checkpoints of the train state (step, trainable params, optimizer state).

Frozen parameters (the vision tower) are not saved: they come unchanged from the
pretrained model the caller builds, and saving them would multiply disk use for nothing.

Layout: one orbax CheckpointManager directory, one sub-directory per step, each holding the
composite items

  <step>/state/       the TrainState pytree (always)
  <step>/weighting/   the loss-weighting strategy's state (`weighting.py`), when the run
                      had one
  <step>/gradmtl/     a gradient method's state (`gradmtl_step.py`: Nash-MTL's α, PCGrad's key)
  <step>/data/        the input iterator's state, one JSON file per process (grain's handler),
                      when the run read a stateful loader (`data/loader.py`)

Both items of a step are written by one `save`, so they always belong to the same step.
Checkpoints written before the weighting item existed hold the TrainState as orbax's
single unnamed item (`<step>/default/`); they are still read as the `state` item.

A step whose files were truncated, emptied or deleted raises `CheckpointUnreadable`, one line
naming the step and directory instead of orbax's traceback; a resumed training run then falls back
to the step before it (`train/loop.py`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

PyTree = TypeVar("PyTree")

STATE_ITEM = "state"
WEIGHTING_ITEM = "weighting"
# Orbax's name for the single unnamed item of a manager in "default item" mode: the layout
# of checkpoints written before the composite layout.
_LEGACY_STATE_ITEM = "default"
DATA_ITEM = "data"
GRADMTL_ITEM = "gradmtl"
EXTRA_ITEMS = (WEIGHTING_ITEM, DATA_ITEM, GRADMTL_ITEM)


def _not_a_stop(record: logging.LogRecord) -> bool:
  """Drops orbax's log of a wait that Ctrl-C interrupted ("Save Finalize thread failed" and a
  traceback): a second Ctrl-C stops a run at once by design, with its own one line."""
  return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


# orbax logs through absl's logger.
logging.getLogger("absl").addFilter(_not_a_stop)

# What orbax raises on reading a step whose files were truncated, emptied or deleted:
# tensorstore's OUT_OF_RANGE / DATA_LOSS / NOT_FOUND (ValueError), JSONDecodeError (ValueError)
# for its metadata files, or an OSError.
_READ_ERRORS = (ValueError, OSError, KeyError)


class CheckpointError(ValueError):
  """A checkpoint problem the user acts on; its message is one line naming the directory."""


class CheckpointUnreadable(CheckpointError):
  """One step of a checkpoint directory cannot be read (a truncated, emptied or deleted file).

  Attributes:
    directory: the checkpoint directory.
    step: the step that cannot be read.
    reason: the first line of orbax's error.
  """

  def __init__(self, directory: str, step: int, cause: BaseException):
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    if len(reason) > 160:
      reason = reason[:157] + "..."
    super().__init__(f"the checkpoint of step {step} in {directory} cannot be read ({reason})")
    self.directory = directory
    self.step = step
    self.reason = reason


class IteratorState:
  """Adapts an iterator with a JSON-able `get_state()` / `set_state()` to grain's orbax handler.

  grain's handler writes `get_state()` bytes to `process_<i>-of-<n>.json`, so each host keeps its
  own position in its own shard of the data.
  """

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state(), sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:  # grain calls it after a restore; nothing to start here
    pass


def _abstract(target: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


def _save_args(name: str, item: Any) -> ocp.args.CheckpointArgs:
  if name == DATA_ITEM:
    import grain  # pylint: disable=g-import-not-at-top  # only where a data iterator is saved
    return grain.checkpoint.CheckpointSave(IteratorState(item))
  return ocp.args.StandardSave(item)


def _restore_args(name: str, item: Any) -> ocp.args.CheckpointArgs:
  """The data item is restored into `item` itself (its `set_state`); others by structure."""
  if name == DATA_ITEM:
    import grain  # pylint: disable=g-import-not-at-top
    return grain.checkpoint.CheckpointRestore(IteratorState(item))
  return ocp.args.StandardRestore(_abstract(item))


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints (state and extra items) under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    # grain's handler is named up front (below), so grain is imported with the first
    # Checkpointer, not with this module: `--help` and the pure modules do not pay for it.
    import grain  # pylint: disable=g-import-not-at-top
    # Orbax wants absolute paths.
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Naming the items' handlers locks the manager into composite mode up front (left to
        # itself it would pick single-item mode on reading a legacy checkpoint, then refuse
        # composite saves) and lets it read item metadata before any save or restore. The
        # legacy item is listed so that such a step can be read.
        item_handlers={**{name: ocp.StandardCheckpointHandler()
                          for name in (STATE_ITEM, WEIGHTING_ITEM, GRADMTL_ITEM,
                                       _LEGACY_STATE_ITEM)},
                       DATA_ITEM: grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Directories are made inside `save` (a few mkdirs), not in orbax's background
            # thread: that one hands its "directory created" signal to the writers under a
            # process-wide operation id, which a save of another manager in another thread
            # (side-by-side preparation runs) advances in between. The writers then wait for
            # the other run's keys (a 300 s signalling timeout) or race it to the same
            # temporary directory (FileExistsError). Only the array writes stay asynchronous.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def items(self, step: int | None = None) -> frozenset[str]:
    """Names of the items stored at `step` (default: latest); a legacy step reads as `state`.

    Raises:
      CheckpointUnreadable: the step's metadata cannot be read.
    """
    step = self._step(step)
    names = set(self._item_metadata(step).keys())
    if _LEGACY_STATE_ITEM in names:
      names.discard(_LEGACY_STATE_ITEM)
      names.add(STATE_ITEM)
    return frozenset(names)

  def save(self, step: int, state: PyTree, extras: Mapping[str, Any] | None = None) -> None:
    """Starts an async save of `state` and the `extras` items (names from EXTRA_ITEMS).

    Device-to-host copies finish before this returns, so the caller may donate `state`
    right after.
    """
    extras = dict(extras or {})
    unknown = set(extras) - set(EXTRA_ITEMS)
    if unknown:
      raise ValueError(f"unknown checkpoint item(s) {sorted(unknown)}; known: {EXTRA_ITEMS}")
    args = {STATE_ITEM: ocp.args.StandardSave(state)}
    args.update({name: _save_args(name, tree) for name, tree in extras.items()})
    self._manager.save(int(step), args=ocp.args.Composite(**args))

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores the state of `step` (default: latest) with the structure, dtypes and
    shardings of `target`; extra items stored with it are not read."""
    state, _ = self.restore_with_extras(target, {}, step)
    return state

  def restore_with_extras(self, target: PyTree, extras: Mapping[str, Any],
                          step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """(state, {name: item}) of `step` (default: latest), each shaped like its target.

    Raises:
      FileNotFoundError: no checkpoint at all.
      KeyError: an item of `extras` is not stored at that step.
      CheckpointUnreadable: a file of that step is damaged (truncated, emptied, deleted).
    """
    step = self._step(step)
    stored = set(self._item_metadata(step).keys())
    missing = set(extras) - stored
    if missing:
      raise KeyError(f"checkpoint step {step} in {self.directory} has no item(s) "
                     f"{sorted(missing)}; it has {sorted(stored)}")
    state_item = _LEGACY_STATE_ITEM if _LEGACY_STATE_ITEM in stored else STATE_ITEM
    args = {state_item: ocp.args.StandardRestore(_abstract(target))}
    args.update({name: _restore_args(name, tree) for name, tree in extras.items()})
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except _READ_ERRORS as e:
      raise CheckpointUnreadable(self.directory, step, e) from e
    return restored[state_item], {name: restored[name] for name in extras}

  def discard(self, step: int) -> None:
    """Removes `step` (e.g. an unreadable one, so that a resumed run can save that step again)."""
    self._manager.delete(int(step))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def _item_metadata(self, step: int) -> Any:
    try:
      return self._manager.item_metadata(step)
    except _READ_ERRORS as e:
      raise CheckpointUnreadable(self.directory, step, e) from e

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return int(step)
