"""A damaged checkpoint (a file truncated, e.g. by a full disk or a copy cut short): resuming falls
back to the step before it with a one-line warning, or stops with one line naming the directory
to remove; loading a trained model never falls back to a less trained one."""

import functools
import glob
import os
import signal
import sys

import jax
import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.runtime import checkpoint
from visatb_jax.train import loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import CFG, LAM, TASKS, make_batch, new_model, params_of  # noqa: E402


def _truncate_arrays(step_dir) -> None:
  """Halves every array data file of the TrainState item (what tensorstore reports as
  OUT_OF_RANGE, as in the 166-line traceback this replaces)."""
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture
def preempted_at_4(tmp_path, meshes):
  """A run stopped by SIGTERM after step 4: checkpoints of steps 3 (regular) and 4."""
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # train() replaces it meanwhile

  def get_batch(i):
    if i == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return make_batch(i)

  try:
    with pytest.raises(loop.Preempted):
      train.train(new_model(), get_batch, LAM, CFG, tmp_path / "run", mesh=meshes[1],
                  task_names=TASKS)
  finally:
    signal.signal(signal.SIGTERM, previous)
  ckpt = tmp_path / "run" / "checkpoints"
  assert checkpoint.Checkpointer(ckpt).all_steps() == [3, 4]
  return tmp_path / "run"


def test_a_truncated_latest_step_falls_back_to_the_one_before(preempted_at_4, tmp_path, meshes,
                                                              capsys):
  run = functools.partial(train.train, mesh=meshes[1], task_names=TASKS)
  straight = run(new_model(), make_batch, LAM, CFG, tmp_path / "straight")
  _truncate_arrays(preempted_at_4 / "checkpoints" / "4")
  capsys.readouterr()
  resumed = run(new_model(), make_batch, LAM, CFG, preempted_at_4)
  logged = capsys.readouterr().out
  warnings = [l for l in logged.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1, logged
  assert (f"the checkpoint of step 4 in {preempted_at_4 / 'checkpoints'} cannot be read"
          in warnings[0]) and "resuming from step 3" in warnings[0], warnings[0]
  assert "resumed from step 3 (" in logged
  # Steps 4.. trained again: the model of an uninterrupted run, and step 4 saved anew.
  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  assert checkpoint.Checkpointer(preempted_at_4 / "checkpoints").all_steps() == [3, 6]


def test_no_readable_step_is_one_line_naming_the_directory(preempted_at_4, meshes):
  for step in ("3", "4"):
    _truncate_arrays(preempted_at_4 / "checkpoints" / step)
  with pytest.raises(checkpoint.CheckpointError) as info:
    train.train(new_model(), make_batch, LAM, CFG, preempted_at_4, mesh=meshes[1],
                task_names=TASKS)
  message = str(info.value)
  directory = str(preempted_at_4 / "checkpoints")
  # One line: orbax's reason is cut to its first line, at most 160 characters.
  assert "\n" not in message and len(message) - 2 * len(directory) < 320, message
  assert message.startswith(f"no checkpoint in {directory} can be read (step 4: "), message
  assert message.endswith(f"remove {directory} to train this model from the start"), message
  # Nothing was removed: the user decides.
  assert sorted(os.listdir(directory)) == ["3", "4"]


def test_loading_a_trained_model_does_not_fall_back(tmp_path, meshes):
  train.train(new_model(), make_batch, LAM, CFG, tmp_path, mesh=meshes[1], task_names=TASKS)
  _truncate_arrays(tmp_path / "checkpoints" / "6")
  with pytest.raises(checkpoint.CheckpointError) as info:
    train.restore_model(new_model(), CFG, tmp_path)
  message = str(info.value)
  assert "\n" not in message, message
  assert (f"the checkpoint of step 6 in {tmp_path / 'checkpoints'} cannot be read" in message
          and f"remove {tmp_path / 'checkpoints' / '6'} and run again" in message), message
