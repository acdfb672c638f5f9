"""The loop reads nothing back from the device between log steps (issue 30, item 5).

Metrics are fetched at log steps and before saves only, λ of the dynamic methods stays on the
device, and the parameters are those of the loop that fetched every step (BENCHMARKS.md B11).
"""

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as array_lib

import test_train as tt  # the train tests' tiny model and batches (tests/train on sys.path)
from visatb_jax import train
from visatb_jax.core import weighting
from visatb_jax.runtime import checkpoint
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding
from visatb_jax.train import loop as loop_lib
from visatb_jax.train import vitw_step

# Log at 4 and 8, save at 5 and 8 (the last step): steps 1-3 and 6-7 must not read the device.
CFG = {**tt.WCFG, "steps": 8, "log_every": 4, "checkpoint_every": 5}


class DeviceReadError(AssertionError):
  pass


class _NoHostReads:
  """While `on`, a device→host read on the test's thread raises DeviceReadError.

  `jax.transfer_guard_device_to_host("disallow")` is the whole check on an accelerator, but on
  XLA:CPU it does not see reads into NumPy, which are zero-copy (jax-ml/jax#16602). So this also
  fails `ArrayImpl._value` (jax.device_get, float(), .item(), ...) and NumPy conversions of a
  jax.Array called from the loop's module (they read the buffer without `_value`).
  """

  def __init__(self, monkeypatch):
    self.on = False
    self._thread = threading.current_thread()
    self._guard = contextlib.ExitStack()
    value = array_lib.ArrayImpl._value

    def guarded_value(arr):
      self._fail("ArrayImpl._value")
      return value.fget(arr)

    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded_value))
    monkeypatch.setattr(loop_lib, "np", _WatchedNumpy(self))

  def _fail(self, what: str) -> None:
    if self.on and threading.current_thread() is self._thread:
      raise DeviceReadError(f"device→host read ({what}) between log steps")

  def set(self, on: bool) -> None:
    self._guard.close()
    self.on = on
    if on:
      self._guard.enter_context(jax.transfer_guard_device_to_host("disallow"))


class _WatchedNumpy:
  """numpy, whose functions fail on a jax.Array argument while the watch is on."""

  def __init__(self, watch: _NoHostReads):
    self._watch = watch

  def __getattr__(self, name):
    attr = getattr(np, name)
    fail = self._watch._fail  # pylint: disable=protected-access

    def check(args, kwargs):
      if any(isinstance(a, jax.Array) for a in (*args, *kwargs.values())):
        fail(f"np.{name}")

    if isinstance(attr, type) and issubclass(attr, np.generic):
      # A scalar type (np.float32(x) reads x), still usable as a dtype.
      return type(name, (attr,), {"__new__": lambda cls, *a, **k: (check(a, k), attr(*a, **k))[1]})
    if not callable(attr) or isinstance(attr, type):
      return attr

    def call(*args, **kwargs):
      check(args, kwargs)
      return attr(*args, **kwargs)
    return call


def _quiet_steps(cfg) -> set[int]:
  """Batch indices whose step (index + 1) neither logs nor saves."""
  return {i for i in range(cfg["steps"])
          if (i + 1) % cfg["log_every"] and (i + 1) % cfg["checkpoint_every"]
          and i + 1 != cfg["steps"]}


def _methods():
  return {
      "static": tt.LAM,
      "rlw": train.TrainMethod.from_strategy(weighting.get_strategy("rlw"), tt.LAM),
      "dwa": train.TrainMethod.from_strategy(weighting.get_strategy("dwa", window=1), tt.LAM),
      "pcgrad": train.TrainMethod.gradient("pcgrad", np.ones(len(tt.LAM))),
  }


def test_the_watch_catches_device_reads(monkeypatch):
  """Not a no-op: each way the old loop read the device fails while the watch is on."""
  watch = _NoHostReads(monkeypatch)
  x = jnp.arange(3.0) * 2
  watch.set(True)
  try:
    for read in (lambda: jax.device_get(x), lambda: float(x[0]),
                 lambda: loop_lib.np.asarray(x), lambda: loop_lib.np.float32(x[0])):
      with pytest.raises(DeviceReadError):
        read()
  finally:
    watch.set(False)
  np.testing.assert_array_equal(jax.device_get(x), [0.0, 2.0, 4.0])  # allowed again


@pytest.mark.parametrize("name", ["static", "rlw", "dwa", "pcgrad"])
def test_no_device_read_between_log_steps(tmp_path, meshes, monkeypatch, name):
  watch = _NoHostReads(monkeypatch)
  quiet = _quiet_steps(CFG)
  assert quiet == {0, 1, 2, 5, 6}
  guarded = []

  def get_batch(i):
    # From here to the next batch request, batch index i's whole iteration of the loop.
    watch.set(i in quiet)
    guarded.append(watch.on)
    return tt.make_batch(i)

  try:
    train.train(tt.new_model(), get_batch, _methods()[name], CFG, tmp_path, mesh=meshes[8],
                task_names=tt.TASKS)
  finally:
    watch.set(False)
  assert guarded == [i in quiet for i in range(CFG["steps"])]
  records = metrics_log.read_metrics(tmp_path / metrics_log.METRICS_FILE)
  assert [r["step"] for r in records] == [4, 8]
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.all_steps() == [5, 8]
  ckpt.close()


def _per_step_fetch_params(method, cfg, mesh):
  """The parameters after cfg["steps"] steps of the loop as it was before B11: λ and the
  learning rate read to the host and the metrics fetched after every step."""
  cfg = train.TrainConfig.of(cfg)
  method = train.TrainMethod.coerce(method)
  graphdef, params, frozen = train.split_model(tt.new_model(),
                                               freeze_vision_tower=cfg.freeze_vision_tower)
  tx, schedule = train.make_optimizer(cfg), train.make_schedule(cfg)
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  step = vitw_step.make_train_step(graphdef, tx, mesh=mesh, accum_steps=cfg.accum_steps)
  strategy = method.weighting
  wstate = None if strategy is None else strategy.init(method.num_tasks)
  for index in range(cfg.steps):
    lam = (method.lam_at(index) if wstate is None
           else np.asarray(jax.device_get(wstate["lam"]), np.float32))
    state, metrics = step(state, sharding.replicate(frozen, mesh),
                          sharding.shard_batch(tt.make_batch(index), mesh), lam,
                          np.float32(schedule(index)))
    metrics = jax.device_get(metrics)
    if wstate is not None:
      _, wstate = weighting.jit_update(strategy, wstate, metrics["per_task_loss"], index,
                                       train.weighting_rng(cfg.seed, index),
                                       metrics["per_task_count"])
  return jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("name", ["static", "rlw", "dwa"])
def test_parameters_equal_the_loop_that_fetched_every_step(tmp_path, meshes, name):
  method = _methods()[name]
  model = train.train(tt.new_model(), tt.make_batch, method, CFG, tmp_path, mesh=meshes[1],
                      task_names=tt.TASKS)
  expected = _per_step_fetch_params(method, CFG, meshes[1])
  got = _trained_params(model)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  # Sensitive: the run trained (the parameters moved from the initial model's).
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), got, _trained_params(tt.new_model()))
  assert any(jax.tree.leaves(moved))


def _trained_params(model):
  _, params, _ = train.split_model(model, freeze_vision_tower=CFG["freeze_vision_tower"])
  return jax.tree.map(np.asarray, params)


def test_nan_between_log_steps_stops_before_the_next_save(tmp_path, meshes):
  """A NaN at step 3 stops the run at the log of step 4, naming step 3, before any checkpoint;
  with a log at the end only, a NaN at step 6 stops it at the save of step 8, keeping step 5."""
  def poisoned(at):
    def get_batch(i):
      b = tt.make_batch(i)
      if i == at - 1:  # NaN images on the rows of task "vqa" only
        b["images"][1::2] = np.nan
      return b
    return get_batch

  cfg = CFG  # logs at 4 and 8, saves at 5 and 8
  with pytest.raises(train.TrainingDiverged, match=r"step 3\b.*vqa") as err:
    train.train(tt.new_model(), poisoned(3), tt.LAM, cfg, tmp_path / "a", mesh=meshes[1],
                task_names=tt.TASKS)
  assert "caption" not in str(err.value)
  assert not (tmp_path / "a" / metrics_log.METRICS_FILE).exists() or not (
      metrics_log.read_metrics(tmp_path / "a" / metrics_log.METRICS_FILE))
  ckpt = checkpoint.Checkpointer(tmp_path / "a" / "checkpoints")
  assert ckpt.all_steps() == []
  ckpt.close()

  cfg = {**cfg, "log_every": 10}  # only saves fetch: at 5 and at the last step, 8
  with pytest.raises(train.TrainingDiverged, match=r"step 6\b.*vqa"):
    train.train(tt.new_model(), poisoned(6), tt.LAM, cfg, tmp_path / "b", mesh=meshes[1],
                task_names=tt.TASKS)
  ckpt = checkpoint.Checkpointer(tmp_path / "b" / "checkpoints")
  assert ckpt.all_steps() == [5]
  ckpt.close()
