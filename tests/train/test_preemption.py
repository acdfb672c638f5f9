"""SIGTERM or Ctrl-C during train(): the step reached is checkpointed, `Preempted` (`Interrupted`)
is raised, and a new call resumes from that step and ends with the parameters of an uninterrupted
run. A second Ctrl-C stops at once."""

import functools
import os
import signal
import sys
import threading

import jax
import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.core import weighting
from visatb_jax.runtime import checkpoint
from visatb_jax.runtime import metrics_log
from visatb_jax.train.loop import Interrupted, Preempted

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import (CFG, LAM, STRATEGY_OPTIONS, TASKS, WCFG, deterministic,  # noqa: E402
                        make_batch, new_model, params_of)


class _Leaked(Exception):
  pass


@pytest.fixture
def sigterm_guard():
  """A SIGTERM handler of the test's own while it runs: a signal that train() failed to catch
  fails the test instead of killing pytest, and train() must hand it back when it returns."""

  def leaked(signum, frame):
    raise _Leaked("SIGTERM reached the handler train() should have replaced")

  previous = signal.signal(signal.SIGTERM, leaked)
  yield leaked
  signal.signal(signal.SIGTERM, previous)


def _sigterm_at(step_index: int, served: list[int]):
  """get_batch that sends this process SIGTERM while it serves the batch of `step_index`."""

  def get_batch(i):
    served.append(i)
    if i == step_index:
      os.kill(os.getpid(), signal.SIGTERM)
    return make_batch(i)

  return get_batch


def _steps(workdir):
  return checkpoint.Checkpointer(workdir / "checkpoints").all_steps()


@pytest.mark.parametrize("method_name", ["static", "rlw"])
@pytest.mark.parametrize("signal_at,stop", [(3, 4), (2, 3)])  # between / at regular saves (3, 6)
def test_sigterm_saves_the_step_and_a_rerun_resumes_identically(
    tmp_path, meshes, sigterm_guard, signal_at, stop, method_name):
  if method_name == "static":
    method, cfg = (lambda: LAM), CFG
  else:  # a dynamic λ: its state is one of the extras every save must hold
    method = lambda: train.TrainMethod.from_strategy(  # noqa: E731
        weighting.get_strategy("rlw", **STRATEGY_OPTIONS["rlw"]), LAM)
    cfg = WCFG
  run = functools.partial(train.train, mesh=meshes[1], task_names=TASKS)
  straight = run(new_model(), make_batch, method(), cfg, tmp_path / "a")

  served = []
  with pytest.raises(Preempted, match=f"step {stop}.*same command") as info:
    run(new_model(), _sigterm_at(signal_at, served), method(), cfg, tmp_path / "b")
  assert info.value.step == stop and served == list(range(stop))  # stopped at the boundary
  assert _steps(tmp_path / "b")[-1] == stop
  assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the previous handler is back

  served = []
  resumed = run(new_model(), _sigterm_at(-1, served), method(), cfg, tmp_path / "b")
  assert served == list(range(stop, cfg["steps"]))
  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  rec_a, rec_b = (metrics_log.read_metrics(tmp_path / d / metrics_log.METRICS_FILE)
                  for d in ("a", "b"))
  assert deterministic(rec_b) == deterministic(rec_a)


def test_sigterm_in_the_last_step_keeps_the_final_checkpoint(tmp_path, meshes, sigterm_guard):
  last = CFG["steps"] - 1
  with pytest.raises(Preempted) as info:
    train.train(new_model(), _sigterm_at(last, []), LAM, CFG, tmp_path, mesh=meshes[1],
                task_names=TASKS)
  assert info.value.step == CFG["steps"] and _steps(tmp_path) == [3, CFG["steps"]]
  # The re-run has nothing left to train and returns the trained model.
  served = []
  train.train(new_model(), _sigterm_at(-1, served), LAM, CFG, tmp_path, mesh=meshes[1],
              task_names=TASKS)
  assert served == []


def test_sigterm_during_the_final_save_reaches_the_previous_handler(
    tmp_path, meshes, sigterm_guard, monkeypatch):
  """After the last check, the signal is not swallowed: the handler train() replaced gets it."""
  close = checkpoint.Checkpointer.close

  def close_with_sigterm(self):
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "close", close_with_sigterm)
  with pytest.raises(_Leaked):
    train.train(new_model(), make_batch, LAM, {**CFG, "steps": 2}, tmp_path, mesh=meshes[1],
                task_names=TASKS)
  monkeypatch.undo()
  assert _steps(tmp_path) == [2]  # the save completed before the signal was passed on


def test_training_in_a_thread_leaves_the_signal_handlers_alone(tmp_path, meshes, sigterm_guard):
  """Python sets handlers from the main thread only; a trainer in another thread must not try."""
  seen, errors = [], []

  def get_batch(i):
    seen.append(signal.getsignal(signal.SIGTERM))
    return make_batch(i)

  def worker():
    try:
      train.train(new_model(), get_batch, LAM, {**CFG, "steps": 2}, tmp_path, mesh=meshes[1],
                  task_names=TASKS)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=worker)
  thread.start()
  thread.join()
  assert not errors, errors
  assert seen and all(h is sigterm_guard for h in seen)
  assert _steps(tmp_path) == [2]


# ----------------------------------------------------------------------------------- Ctrl-C


@pytest.fixture
def sigint_guard():
  """Python's own Ctrl-C handler while the test runs (whatever pytest installed is put back)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield signal.default_int_handler
  signal.signal(signal.SIGINT, previous)


def _sigint_at(step_index: int, served: list[int], times: int = 1):
  """get_batch that sends this process SIGINT `times` times while serving `step_index`."""

  def get_batch(i):
    served.append(i)
    if i == step_index:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
    return make_batch(i)

  return get_batch


def test_ctrl_c_saves_the_step_like_sigterm_and_a_rerun_says_it_resumed(
    tmp_path, meshes, sigint_guard, sigterm_guard, capfd):
  run = functools.partial(train.train, mesh=meshes[1], task_names=TASKS)
  straight = run(new_model(), make_batch, LAM, CFG, tmp_path / "a")
  served = []
  with pytest.raises(Interrupted, match="step 2 by Ctrl-C.*same command") as info:
    run(new_model(), _sigint_at(1, served), LAM, CFG, tmp_path / "b")
  assert info.value.step == 2 and served == [0, 1]  # not a step more, and not a step less
  assert _steps(tmp_path / "b") == [2]
  assert signal.getsignal(signal.SIGINT) is sigint_guard
  assert "Ctrl-C again stops at once" in capfd.readouterr().out

  resumed = run(new_model(), make_batch, LAM, CFG, tmp_path / "b")
  logged = capfd.readouterr().out
  assert logged.count("resumed from step") == 1 and "resumed from step 2 (" in logged
  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))


def test_a_second_ctrl_c_stops_at_once(tmp_path, meshes, sigint_guard, sigterm_guard):
  served = []
  with pytest.raises(KeyboardInterrupt):
    train.train(new_model(), _sigint_at(1, served, times=2), LAM, CFG, tmp_path,
                mesh=meshes[1], task_names=TASKS)
  assert served == [0, 1]
  assert _steps(tmp_path) == []  # no step-boundary save after the second one
  assert signal.getsignal(signal.SIGINT) is sigint_guard


def test_ctrl_c_during_the_final_save_reaches_the_previous_handler(
    tmp_path, meshes, sigint_guard, sigterm_guard, monkeypatch):
  close = checkpoint.Checkpointer.close

  def close_with_sigint(self):
    os.kill(os.getpid(), signal.SIGINT)
    close(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "close", close_with_sigint)
  with pytest.raises(KeyboardInterrupt):
    train.train(new_model(), make_batch, LAM, {**CFG, "steps": 2}, tmp_path, mesh=meshes[1],
                task_names=TASKS)
  monkeypatch.undo()
  assert _steps(tmp_path) == [2]  # the save completed before the signal was passed on


def test_an_ignored_ctrl_c_stays_ignored(tmp_path, meshes, sigterm_guard):
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    train.train(new_model(), _sigint_at(0, []), LAM, {**CFG, "steps": 2}, tmp_path,
                mesh=meshes[1], task_names=TASKS)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)
  assert _steps(tmp_path) == [2]
