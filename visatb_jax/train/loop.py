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
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
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
  """SIGTERM (a preemption notice) stopped training; a checkpoint of the step reached is saved.

  Attributes:
    step: the step saved, from which the same command resumes.
    directory: the checkpoint directory.
  """

  def __init__(self, step: int, directory: str):
    super().__init__(f"training stopped at step {step} by SIGTERM; the checkpoint of step {step} "
                     f"is saved in {directory}, and re-running the same command resumes from it")
    self.step = step
    self.directory = directory


# Step ids for JAX's preemption sync, counted over every train() call of the process: the sync
# point is "the largest id any host has reached, plus one", so the ids must never repeat, or a
# notice that arrives between two runs could name a step the next run has already passed.
_PREEMPTION_SYNC_IDS = itertools.count(1)


class _PreemptionWatch:
  """Notices SIGTERM during train() and says at which step boundary every process stops.

  One process: a SIGTERM handler (installed from the main thread only: Python allows no other)
  sets a flag, read at every step boundary. Several processes: JAX's preemption sync service
  (its own SIGTERM notifier, started by `jax.distributed.initialize`) picks one step id for all
  hosts, so every host saves the same step; without that service, every host gathers every
  host's flag at every step boundary instead.
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous: Any = None
    self._installed = False
    self._mode = "local" if jax.process_count() == 1 else "jax"

  def __enter__(self) -> _PreemptionWatch:
    if self._mode == "local":
      self._install()
    return self

  def __exit__(self, exc_type, exc_value, traceback) -> None:
    if not self._installed:
      return
    signal.signal(signal.SIGTERM, self._previous)
    self._installed = False
    if exc_type is None and self._received.is_set():
      # Arrived after the last check: the handler train() replaced gets it, as if never replaced.
      signal.raise_signal(signal.SIGTERM)

  def _install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # e.g. side-by-side preparation runs: SIGTERM keeps its usual effect
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:
      return  # installed outside Python (e.g. JAX's notifier): it cannot be restored, leave it
    self._previous = previous
    signal.signal(signal.SIGTERM, lambda signum, frame: self._received.set())
    self._installed = True

  def should_stop(self) -> bool:
    """Whether to save and stop at this step boundary; every process calls it at every one."""
    if self._mode == "jax":
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return multihost_utils.reached_preemption_sync_point(next(_PREEMPTION_SYNC_IDS))
      except RuntimeError:  # the service is off (jax_enable_preemption_service=False)
        self._mode = "gather"
        self._install()
    if self._mode == "gather":
      return self._gathered()
    return self._received.is_set()

  def stopped_after_loop(self) -> bool:
    """Whether SIGTERM arrived after the last step boundary (the final checkpoint is saved)."""
    if self._mode == "gather":
      return self._gathered()
    return self._mode == "local" and self._received.is_set()

  def _gathered(self) -> bool:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self._received.is_set()))
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

  SIGTERM (a preempted VM, a scheduler's time limit) does not stop training at once: at the
  next step boundary the current step is checkpointed like a regular save and `Preempted` is
  raised; in a multi-process run every process stops at the same step (`_PreemptionWatch`).

  Raises:
    TrainingDiverged: the loss became NaN/inf (the diverged state is not saved).
    Preempted: SIGTERM arrived; the step reached is saved and a new call resumes from it.
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
  if ckpt.latest_step() is not None:
    state, wstate, mtl_state = _restore_for_resume(ckpt, state, wstate, iterator, mtl_state)
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

  def save(done: int) -> None:
    # The weighting state saved with step `done` already holds the λ of index `done`,
    # the first step a resumed run trains.
    extras = {} if wstate is None else {checkpoint_lib.WEIGHTING_ITEM: wstate}
    if iterator is not None:
      extras[checkpoint_lib.DATA_ITEM] = iterator
    if mtl_state is not None:
      extras[checkpoint_lib.GRADMTL_ITEM] = mtl_state
    ckpt.save(done, state, extras)

  # Around the `finally` too: a SIGTERM while the last saves complete only sets the flag.
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
        lam_i = (method.lam_at(index) if wstate is None
                 else np.asarray(jax.device_get(wstate["lam"]), np.float32))
        state, device_metrics = step_fn(state, frozen,
                                        sharding_lib.shard_batch(local_batch, mesh), lam_i,
                                        np.float32(schedule(index)))
        metrics = jax.device_get(device_metrics)
        done = index + 1
        # Before any save: a diverged state must never replace the last good checkpoint.
        _check_finite(metrics, done, task_names)
        if wstate is not None:
          # The λ of the next step, from the losses of this one (weighting.py's contract).
          _, wstate = weighting_lib.jit_update(
              weighting, wstate, device_metrics["per_task_loss"], index,
              weighting_rng(cfg.seed, index), device_metrics["per_task_count"])
        # `metrics` is on the host already (fetched above for the finiteness check).
        bar.update(1, loss=float(metrics["loss"]))
        if done % cfg.log_every == 0 or done == cfg.steps:
          now = time.perf_counter()
          log.write(metrics_log.make_record(
              step=done, metrics=metrics, task_names=task_names, lr=float(schedule(index)),
              tokens_per_s=window_tokens / max(now - t_window, 1e-9), elapsed_s=now - t0))
          t_window, window_tokens = now, 0
        saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if saved:
          save(done)
        if preemption.should_stop():
          if not saved:
            save(done)
          raise Preempted(done, ckpt.directory)
      if preemption.stopped_after_loop():
        raise Preempted(max(start, cfg.steps), ckpt.directory)
    finally:
      bar.close()
      log.close()
      ckpt.close()  # waits until every started save is complete
  nnx.update(model, state.params)
  if dropout_seed is not None:
    model.eval()  # generation and export see the deterministic model
  return model


def _restore_for_resume(ckpt: checkpoint_lib.Checkpointer, state: TrainState,
                        wstate: weighting_lib.State | None, iterator: Any = None,
                        mtl_state: Any = None) -> tuple[TrainState, Any, Any]:
  """The latest checkpoint's TrainState, weighting and gradient-method states, shaped like the
  given ones (None stays None). A stateful `iterator` is set, in place, to the saved position.
  """
  stored = ckpt.items()
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
  state, extras = ckpt.restore_with_extras(state, targets)
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
  finally:
    ckpt.close()
  nnx.update(model, state.params)
  return model
