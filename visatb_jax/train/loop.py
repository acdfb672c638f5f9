"""The resumable training loop: batches in, checkpoints and metrics out.

`train(model, get_batch, method, cfg, workdir)` runs `cfg.steps` optimizer steps of the step
that `method` (a `TrainMethod`) selects — the VITW step, or the per-task-gradient step — taking
λ from the method: fixed, made by the step (TLA), or updated by a weighting strategy whose state
is checkpointed with the model. A killed run resumes from its last checkpoint with the same data,
λ sequence and random streams.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from visatb_jax.core import weighting as weighting_lib
from visatb_jax.model import lora as lora_lib
from visatb_jax.runtime import checkpoint as checkpoint_lib
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import progress as progress_lib
from visatb_jax.runtime import sharding as sharding_lib
from visatb_jax.train import gradmtl_step
from visatb_jax.train import step as step_lib
from visatb_jax.train import vitw_step
from visatb_jax.train.method import TrainMethod
from visatb_jax.train.state import (TrainConfig, TrainState, init_train_state, make_optimizer,
                                    make_schedule, split_model)

CHECKPOINT_DIR = "checkpoints"

Batch = Mapping[str, Any]

# Folded into cfg.seed for the weighting strategy's keys, so that its random stream (RLW's z)
# is independent of any other use of the same seed (e.g. the model's initialisation).
_WEIGHTING_RNG_SALT = 0x5EED1A3B
_GRADMTL_SEED_SALT = 0x6AD3717C
_DROPOUT_SEED_SALT = 0x0D20B0A7


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is left in place."""


class Preempted(RuntimeError):
  """A stop signal stopped training at a step boundary; a checkpoint of the step reached is saved.

  SIGTERM (a preempted VM, a scheduler's time limit) raises this class; Ctrl-C its subclass
  `Interrupted`.

  Attributes:
    step: the step saved, from which the same command resumes.
    directory: the checkpoint directory.
  """

  signal_name = "SIGTERM"

  def __init__(self, step: int, directory: str):
    super().__init__(f"training stopped at step {step} by {self.signal_name}; the checkpoint of "
                     f"step {step} is saved in {directory}, and re-running the same command "
                     "resumes from it")
    self.step = step
    self.directory = directory


class Interrupted(Preempted):
  """Ctrl-C (SIGINT) stopped training at a step boundary, the step reached saved as for SIGTERM.

  A second Ctrl-C before that boundary raises KeyboardInterrupt at once instead (a save it lands
  in is left unfinished; the previous checkpoint is kept).
  """

  signal_name = "Ctrl-C"


_OPENED: list[str] = []  # checkpoint directories train() used in this process, in order
_OPENED_LOCK = threading.Lock()


def checkpoint_directories() -> list[str]:
  """The checkpoint directories train() resumed from or saved to in this process (side-by-side
  runs included), each once: what an interrupted command may say it kept."""
  with _OPENED_LOCK:
    return list(dict.fromkeys(_OPENED))


# Step ids for JAX's preemption sync, counted over every train() call of the process: the sync
# point is "the largest id any host has reached, plus one", so the ids must never repeat, or a
# notice that arrives between two runs could name a step the next run has already passed.
_PREEMPTION_SYNC_IDS = itertools.count(1)


def _say(text: str) -> None:
  """Writes `text` to stdout from a signal handler (stderr carries the one line a stop ends with).

  Straight to the file descriptor: the handler may run while the main thread is inside a
  `print`, and a second write through the same buffered stream raises "reentrant call".
  """
  try:
    os.write(sys.stdout.fileno(), text.encode())
  except (AttributeError, OSError, ValueError):  # no descriptor (a captured or closed stdout)
    pass


class _PreemptionWatch:
  """Notices SIGTERM and Ctrl-C during train() and says at which step boundary to stop.

  One process: handlers (installed from the main thread only: Python allows no other) set a
  flag, read at every step boundary; nothing is raised inside the step or a checkpoint save, so
  no library on the way can swallow the stop (orbax's save catches and logs exceptions in
  places). A second Ctrl-C raises KeyboardInterrupt at once. Several processes: JAX's preemption
  sync service (its own SIGTERM notifier, started by `jax.distributed.initialize`) picks one
  step id for all hosts, so every host saves the same step; without that service, every host
  gathers every host's flag at every step boundary instead. Ctrl-C keeps its usual effect there
  (one host's flag alone would stop that host only).
  """

  def __init__(self):
    self._received: dict[int, threading.Event] = {
        signal.SIGTERM: threading.Event(), signal.SIGINT: threading.Event()}
    self._previous: dict[int, Any] = {}
    self._mode = "local" if jax.process_count() == 1 else "jax"
    self.forced = False  # a second Ctrl-C: stop at once, without waiting for pending saves

  def __enter__(self) -> _PreemptionWatch:
    if self._mode == "local":
      self._install(signal.SIGTERM)
      self._install(signal.SIGINT)
    return self

  def __exit__(self, exc_type, exc_value, traceback) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    installed, self._previous = self._previous, {}
    if exc_type is not None:
      return
    for signum in installed:
      if self._received[signum].is_set():
        # Arrived after the last check: the handler train() replaced gets it, as if never
        # replaced (launch's, for Ctrl-C Python's KeyboardInterrupt).
        signal.raise_signal(signum)
        return

  def _install(self, signum: int) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # e.g. side-by-side preparation runs: the signal keeps its usual effect
    previous = signal.getsignal(signum)
    if previous is None or previous == signal.SIG_IGN:
      # Installed outside Python (e.g. JAX's notifier): it cannot be restored, leave it; an
      # ignored signal stays ignored.
      return
    self._previous[signum] = previous
    signal.signal(signum, self._on_sigint if signum == signal.SIGINT else self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received[signal.SIGTERM].set()

  def _on_sigint(self, signum, frame) -> None:
    del signum, frame
    if self._received[signal.SIGINT].is_set():
      self.forced = True
      raise KeyboardInterrupt
    self._received[signal.SIGINT].set()
    _say("\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again "
         "stops at once)\n")

  def should_stop(self) -> type[Preempted] | None:
    """Whether to save and stop at this step boundary, as the exception to raise then; every
    process calls it at every one."""
    if self._mode == "jax":
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return (Preempted if multihost_utils.reached_preemption_sync_point(
            next(_PREEMPTION_SYNC_IDS)) else None)
      except RuntimeError:  # the service is off (jax_enable_preemption_service=False)
        self._mode = "gather"
        self._install(signal.SIGTERM)
    if self._mode == "gather":
      return Preempted if self._gathered() else None
    return self._local()

  def stopped_after_loop(self) -> type[Preempted] | None:
    """Whether a stop arrived after the last step boundary (the final checkpoint is saved)."""
    if self._mode == "gather":
      return Preempted if self._gathered() else None
    return self._local() if self._mode == "local" else None

  def _local(self) -> type[Preempted] | None:
    if self._received[signal.SIGINT].is_set():
      return Interrupted
    return Preempted if self._received[signal.SIGTERM].is_set() else None

  def _gathered(self) -> bool:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(
        np.int32(self._received[signal.SIGTERM].is_set()))
    return bool(np.any(flags))


def _non_finite_tasks(per_task_loss: np.ndarray, task_names: Sequence[str]) -> list[str]:
  return [n for n, v in zip(task_names, per_task_loss) if not math.isfinite(float(v))]


def _check_finite(metrics: Mapping[str, Any], step: int, task_names: Sequence[str]) -> None:
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if math.isfinite(loss) and math.isfinite(grad_norm):
    return
  bad = _non_finite_tasks(metrics["per_task_loss"], task_names)
  tasks = ", ".join(bad) if bad else "none (every per-task loss is finite)"
  raise TrainingDiverged(
      f"training diverged at step {step} (batch index {step - 1}): loss={loss}, "
      f"grad_norm={grad_norm}; task(s) with non-finite loss: {tasks}")


def _fetch_checked(unchecked: list[tuple[int, Mapping[str, Any]]],
                   task_names: Sequence[str]) -> Mapping[str, Any] | None:
  """The host metrics of the last of the `unchecked` steps (emptied; None if none), all fetched
  in one transfer; raises `TrainingDiverged` for the first of them with a non-finite loss."""
  fetched = jax.device_get([metrics for _, metrics in unchecked])
  steps = [done for done, _ in unchecked]
  unchecked.clear()
  for done, metrics in zip(steps, fetched):
    _check_finite(metrics, done, task_names)
  return fetched[-1] if fetched else None


def _device_lr(schedule: Callable[[int], Any], index: int) -> jax.Array:
  """The schedule's learning rate of step `index` as a float32 device scalar, never read back.

  Strongly typed, as the float32 NumPy scalar it replaces, so the step's dtypes do not change.
  """
  return jnp.asarray(schedule(index), jnp.float32)


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Every array of `tree` replicated on `mesh`, those already there as they are.

  Every λ the step receives is then placed alike, static or dynamic, so one compiled call
  serves every method; a jitted update that reads only its key (RLW) leaves λ on one device.
  Built per device from the local value, which every process holds alike: no cross-host check.
  """
  repl = sharding_lib.replicated(mesh)

  def place(x):
    if isinstance(x, jax.Array) and x.committed and x.sharding.is_equivalent_to(repl, x.ndim):
      return x
    return jax.make_array_from_callback(x.shape, repl, lambda index: x[index])
  return jax.tree.map(place, tree)


def weighting_rng(seed: int, step: int) -> jax.Array:
  """The key `train` passes to the weighting strategy's `update` after step index `step`.

  A pure function of (seed, step), so a resumed run draws the same random λ (RLW) as the
  run it continues, without any key in the checkpoint.
  """
  base = jax.random.fold_in(jax.random.key(int(seed)), _WEIGHTING_RNG_SALT)
  return jax.random.fold_in(base, int(step))


def _is_stateful(get_batch: Any) -> bool:
  return hasattr(get_batch, "get_state") and hasattr(get_batch, "set_state")


def _process_rows(batch: Batch, rows: int) -> Batch:
  """This process's consecutive share of a global host batch (the whole batch on one process)."""
  count = jax.process_count()
  if count == 1:
    return batch
  if rows % count:
    raise ValueError(f"a global batch of {rows} rows does not split over {count} processes")
  n, p = rows // count, jax.process_index()
  return {k: np.asarray(v)[p * n:(p + 1) * n] for k, v in batch.items()}


def _check_batch(batch: Batch, cfg: TrainConfig, mesh: Mesh, processes: int = 1) -> int:
  """Validates the global batch shape against the config and mesh; returns its rows.

  `batch` holds the rows of 1 process out of `processes` (all of them by default).
  """
  rows = int(np.shape(batch["input_ids"])[0]) * processes
  batch_size, accum = cfg.batch_size, cfg.accum_steps
  if batch_size is not None and rows != batch_size:
    raise ValueError(f"get_batch returned {rows} rows, config batch_size is {batch_size}")
  if rows % accum:
    raise ValueError(f"batch of {rows} rows is not divisible by accum_steps={accum}")
  shards = sharding_lib.batch_shards(mesh)
  if rows % shards:
    raise ValueError(f"batch of {rows} rows is not divisible by the {shards} batch shards of the mesh")
  return rows


def _input_tokens(batch: Batch) -> int:
  """Non-padding input tokens, the throughput unit of tokens_per_s."""
  if "segment_ids" in batch:
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))
  return int(np.size(batch["input_ids"]))


def train(
    model: nnx.Module,
    get_batch: Callable[[int], Batch] | Iterator[Batch],
    method: TrainMethod | Any,
    cfg: TrainConfig | Mapping[str, Any],
    workdir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    task_names: Sequence[str] | None = None,
) -> nnx.Module:
  """Trains `model` for `cfg.steps` optimizer steps, resuming from `workdir/checkpoints`.

  Args:
    model: an NNX model following the Model contract; updated in place and returned.
    get_batch: step index (0-based) → global host batch (Batch contract); must be a
      deterministic function of the step so that a resumed run sees the same data. In a
      multi-process run every process returns the same global batch and trains on its own
      consecutive share of the rows. Or a stateful iterator of this host's batches with
      JSON-able `get_state()` / `set_state()` (`data/loader.py`): its state is saved with every
      checkpoint, per process, and restored on resume, so the next batch is exactly the one the
      killed run would have read.
    method: a `TrainMethod` (how λ is made and which step runs), or a static λ [T] (an array or a
      function of the step index). A dynamic method's strategy state is saved in every
      checkpoint next to the TrainState and restored on resume, so a killed run continues with
      the same λ sequence: step index i trains with `state["lam"]`, then the strategy's jitted
      `update(state, per_task_loss, i, weighting_rng(cfg.seed, i), per_task_count=...)` gives the
      λ of step i + 1.
    cfg: a `TrainConfig`, or a mapping of its fields.
    workdir: gets `checkpoints/`, `metrics.jsonl` and `tb/`.
    mesh: default: a mesh over all devices (`sharding.make_mesh`).
    task_names: names of the T tasks in logs; default `task0`, `task1`, ...

  SIGTERM (a preempted VM, a scheduler's time limit) and Ctrl-C do not stop training at once: at
  the next step boundary the current step is checkpointed like a regular save and `Preempted`
  (`Interrupted` for Ctrl-C) is raised; in a multi-process run every process stops at the same
  step (`_PreemptionWatch`). A second Ctrl-C raises KeyboardInterrupt at once.

  Raises:
    TrainingDiverged: the loss became NaN/inf (the diverged state is not saved). Metrics are
      read from the device only at log steps and before each save, so the run stops at the
      first of those after the step that diverged, naming that step.
    Preempted: SIGTERM arrived; the step reached is saved and a new call resumes from it.
    Interrupted: the same for Ctrl-C (a subclass of Preempted).
    ValueError: inconsistent task count, or a checkpoint written by another kind of method.
  """
  workdir = os.fspath(workdir)
  method = TrainMethod.coerce(method)
  cfg = TrainConfig.of(cfg)
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  num_tasks = method.num_tasks
  task_names = [f"task{k}" for k in range(num_tasks)] if task_names is None else list(task_names)
  if len(task_names) != num_tasks:
    raise ValueError(f"{len(task_names)} task names for {num_tasks} task weights")

  tx, schedule = make_optimizer(cfg), make_schedule(cfg)
  dropout_seed = None
  if lora_lib.has_dropout(model):
    if method.kind == "gradient":
      raise ValueError(f"the gradient method {method.name!r} does not draw LoRA dropout masks; "
                       "use lora.dropout=0 with gradient methods")
    model.train()  # the adapters' dropout on; their masks come from the step (vitw_step)
    dropout_seed = (cfg.seed ^ _DROPOUT_SEED_SALT) & 0x7FFFFFFF
  graphdef, params, frozen = split_model(model, freeze_vision_tower=cfg.freeze_vision_tower,
                                        trainable=cfg.trainable)
  state = init_train_state(params, tx)
  state_sharding = sharding_lib.param_shardings(state, mesh)
  frozen_sharding = sharding_lib.param_shardings(frozen, mesh)
  state = jax.device_put(state, state_sharding)
  frozen = jax.device_put(frozen, frozen_sharding)
  # Replicated on the mesh like the step's metrics, so that the jitted update sees one
  # device set and every host of a multi-host run holds (and saves) the same state.
  weighting = method.weighting
  wstate = None if weighting is None else sharding_lib.replicate(weighting.init(num_tasks), mesh)
  iterator = get_batch if _is_stateful(get_batch) else None
  mtl_state = None
  if method.kind == "gradient":
    # Salted like the weighting key: PCGrad's task order must not share the model's seed stream.
    mtl_seed = (cfg.seed ^ _GRADMTL_SEED_SALT) & 0x7FFFFFFF
    mtl_state = sharding_lib.replicate(
        gradmtl_step.init_mtl_state(method.gradient_method, num_tasks, mtl_seed), mesh)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=2)
  with _OPENED_LOCK:
    _OPENED.append(ckpt.directory)
  if ckpt.latest_step() is not None:
    try:
      state, wstate, mtl_state = _restore_for_resume(ckpt, state, wstate, iterator, mtl_state)
    except BaseException:
      ckpt.close()
      raise
    if jax.process_index() == 0:
      print(f"  resumed from step {int(state.step)} ({ckpt.directory})", flush=True)
  start = int(state.step)

  shardings = (step_lib.flat_tree(state_sharding), step_lib.flat_tree(frozen_sharding))
  if method.kind == "gradient":
    mtl_fn = gradmtl_step.cached_gradmtl_train_step(
        graphdef, cfg.optimizer_spec, mesh, method.gradient_method, method.gradient_options,
        cfg.accum_steps, cfg.ce_chunk_size, *shardings)

    def step_fn(state, frozen, batch, lam_i, lr):
      nonlocal mtl_state
      state, metrics, mtl_state = mtl_fn(state, frozen, batch, lam_i, lr, mtl_state)
      return state, metrics
  else:
    step_fn = vitw_step.cached_train_step(graphdef, cfg.optimizer_spec, mesh, cfg.accum_steps,
                                          method.kind == "tla", cfg.ce_chunk_size, *shardings,
                                          dropout_seed)
  log = metrics_log.MetricsLog(workdir, resume_step=start, enabled=jax.process_index() == 0)
  # A bar on a terminal, a plain line every 10 % (at most 100 steps) in a log (progress.py).
  bar = progress_lib.Progress(cfg.steps, desc="train", unit="step", initial=start,
                              lines=jax.process_index() == 0)
  t0 = t_window = time.perf_counter()
  window_tokens = 0
  # The device metrics of the steps since the last fetch, checked for NaN at the next log
  # step or save.
  unchecked: list[tuple[int, Mapping[str, Any]]] = []
  placed_lam = None  # a static λ (host, device), placed again only when it changes

  def save(done: int) -> None:
    # The weighting state saved with step `done` already holds the λ of index `done`,
    # the first step a resumed run trains.
    extras = {} if wstate is None else {checkpoint_lib.WEIGHTING_ITEM: wstate}
    if iterator is not None:
      extras[checkpoint_lib.DATA_ITEM] = iterator
    if mtl_state is not None:
      extras[checkpoint_lib.GRADMTL_ITEM] = mtl_state
    ckpt.save(done, state, extras)

  # Around the `finally` too: a stop signal while the last saves complete only sets the flag.
  abandon = False
  with _PreemptionWatch() as preemption:
    try:
      for index in range(start, cfg.steps):
        if iterator is not None:
          local_batch = next(iterator)
          rows = _check_batch(local_batch, cfg, mesh, jax.process_count())
          window_tokens += _input_tokens(local_batch) * jax.process_count()
        else:
          host_batch = get_batch(index)
          rows = _check_batch(host_batch, cfg, mesh)
          window_tokens += _input_tokens(host_batch)
          local_batch = _process_rows(host_batch, rows)
        # λ and the learning rate stay on the device: a host read here would wait for the
        # previous step and stall the dispatch queue every step.
        if wstate is not None:
          lam_i = wstate["lam"]
        else:
          host_lam = method.lam_at(index)
          if placed_lam is None or not np.array_equal(host_lam, placed_lam[0]):
            placed_lam = (host_lam, _on_mesh(host_lam, mesh))
          lam_i = placed_lam[1]
        state, device_metrics = step_fn(state, frozen,
                                        sharding_lib.shard_batch(local_batch, mesh), lam_i,
                                        _device_lr(schedule, index))
        done = index + 1
        unchecked.append((done, device_metrics))
        if wstate is not None:
          # The λ of the next step, from the losses of this one (weighting.py's contract).
          _, wstate = weighting_lib.jit_update(
              weighting, wstate, device_metrics["per_task_loss"], index,
              weighting_rng(cfg.seed, index), device_metrics["per_task_count"])
          wstate = _on_mesh(wstate, mesh)
        logged = done % cfg.log_every == 0 or done == cfg.steps
        saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
        shown = {}  # the bar keeps showing the loss of the last fetched step
        if logged or saved:
          # Before any save: a diverged state must never replace the last good checkpoint.
          metrics = _fetch_checked(unchecked, task_names)
          shown["loss"] = float(metrics["loss"])
        bar.update(1, **shown)
        if logged:
          now = time.perf_counter()
          log.write(metrics_log.make_record(
              step=done, metrics=metrics, task_names=task_names, lr=float(schedule(index)),
              tokens_per_s=window_tokens / max(now - t_window, 1e-9), elapsed_s=now - t0))
          t_window, window_tokens = now, 0
        if saved:
          save(done)
        stop = preemption.should_stop()
        if stop is not None:
          if not saved:
            _fetch_checked(unchecked, task_names)
            save(done)
          raise stop(done, ckpt.directory)
      stop = preemption.stopped_after_loop()
      if stop is not None:
        raise stop(max(start, cfg.steps), ckpt.directory)
    except KeyboardInterrupt:
      # A second Ctrl-C stops at once: a save it interrupted is not waited for (orbax leaves
      # it unfinished, and a resumed run starts from the previous checkpoint).
      abandon = preemption.forced
      raise
    finally:
      bar.close()
      log.close()
      if not abandon:
        ckpt.close()  # waits until every started save is complete
  nnx.update(model, state.params)
  if dropout_seed is not None:
    model.eval()  # generation and export see the deterministic model
  return model


def _restore_for_resume(ckpt: checkpoint_lib.Checkpointer, state: TrainState,
                        wstate: weighting_lib.State | None, iterator: Any = None,
                        mtl_state: Any = None) -> tuple[TrainState, Any, Any]:
  """The latest readable checkpoint's TrainState, weighting and gradient-method states, shaped
  like the given ones (None stays None). A stateful `iterator` is set, in place, to the saved
  position.

  A step that cannot be read (a truncated or deleted file) is removed, with a one-line warning,
  and the one before it is restored: the resumed run trains the removed steps again.

  Raises:
    checkpoint.CheckpointError: no step can be read; the message names the directory to remove.
  """
  unreadable = []
  for step in reversed(ckpt.all_steps()):
    try:
      restored = _restore_step(ckpt, step, state, wstate, iterator, mtl_state)
    except checkpoint_lib.CheckpointUnreadable as e:
      unreadable.append(e)
      continue
    for bad in unreadable:
      ckpt.discard(bad.step)
    if unreadable and jax.process_index() == 0:
      steps = ", ".join(str(e.step) for e in unreadable)
      print(f"warning: {unreadable[0]}; removed step(s) {steps} and resuming from step {step}",
            flush=True)
    return restored
  first = unreadable[0]
  raise checkpoint_lib.CheckpointError(
      f"no checkpoint in {ckpt.directory} can be read (step {first.step}: {first.reason}); "
      f"remove {ckpt.directory} to train this model from the start")


def _restore_step(ckpt: checkpoint_lib.Checkpointer, step: int, state: TrainState,
                  wstate: weighting_lib.State | None, iterator: Any,
                  mtl_state: Any) -> tuple[TrainState, Any, Any]:
  """`_restore_for_resume` of one step."""
  stored = ckpt.items(step)
  if (mtl_state is not None) != (checkpoint_lib.GRADMTL_ITEM in stored):
    raise ValueError(f"the checkpoint in {ckpt.directory} was written "
                     f"{'with' if mtl_state is None else 'without'} a gradient method, but this "
                     f"run trains {'with' if mtl_state is not None else 'without'} one")
  if iterator is not None and checkpoint_lib.DATA_ITEM not in stored:
    raise ValueError(f"the checkpoint in {ckpt.directory} holds no input iterator state, so a "
                     "stateful loader cannot resume at the right batch; resume with the data "
                     "function the run started with")
  has_weighting = checkpoint_lib.WEIGHTING_ITEM in stored
  # Resuming across a change of weighting would silently change the λ sequence.
  if wstate is None and has_weighting:
    raise ValueError(f"the checkpoint in {ckpt.directory} holds a weighting strategy's state, "
                     "but train() was called without a strategy")
  if wstate is not None and not has_weighting:
    raise ValueError(f"the checkpoint in {ckpt.directory} was written without a weighting "
                     "strategy, but train() was called with one")
  targets = {} if wstate is None else {checkpoint_lib.WEIGHTING_ITEM: wstate}
  if iterator is not None:
    targets[checkpoint_lib.DATA_ITEM] = iterator
  if mtl_state is not None:
    targets[checkpoint_lib.GRADMTL_ITEM] = mtl_state
  state, extras = ckpt.restore_with_extras(state, targets, step)
  return state, extras.get(checkpoint_lib.WEIGHTING_ITEM), extras.get(checkpoint_lib.GRADMTL_ITEM)


def restore_model(model: nnx.Module, cfg: TrainConfig | Mapping[str, Any],
                  workdir: str | os.PathLike) -> nnx.Module:
  """Loads the trainable params of the latest checkpoint in `workdir/checkpoints` into `model`.

  `cfg` must be the training config of that run (the optimizer state's structure depends on it).
  A weighting strategy's state stored in the same checkpoint is not read.
  """
  cfg = TrainConfig.of(cfg)
  graphdef, params, _ = split_model(model, freeze_vision_tower=cfg.freeze_vision_tower,
                                    trainable=cfg.trainable)
  del graphdef
  ckpt = checkpoint_lib.Checkpointer(os.path.join(os.fspath(workdir), CHECKPOINT_DIR),
                                     max_to_keep=2)
  try:
    state = ckpt.restore(init_train_state(params, make_optimizer(cfg)))
  except checkpoint_lib.CheckpointUnreadable as e:
    # No fallback here: an earlier step is a less trained model, not this one.
    raise checkpoint_lib.CheckpointError(
        f"{e}; remove {os.path.join(e.directory, str(e.step))} and run again: its training "
        "resumes from the checkpoint before it (or starts again) and saves that step anew") from e
  finally:
    ckpt.close()
  nnx.update(model, state.params)
  return model
