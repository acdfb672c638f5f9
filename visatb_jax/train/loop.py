"""Functional training: optimizer, jit train step on a Mesh, and the resumable loop.

The model is split once into (graphdef, trainable params, frozen state); the step is a
pure function of arrays. The VITW loss is summed over the whole global batch of an
optimizer step — every device and every accumulation micro-batch — and divided exactly
once, so a sharded or accumulated step equals the single-device full-batch step.
The loop takes λ from a fixed vector, a function of the step, or a dynamic weighting
strategy (`weighting.py`) whose state is checkpointed with the model.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.runtime import checkpoint as checkpoint_lib
from visatb_jax.core import loss as loss_lib
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding as sharding_lib
from visatb_jax.core import weighting as weighting_lib
from visatb_jax.model import lora as lora_lib

DATA_AXIS = "data"
CHECKPOINT_DIR = "checkpoints"

Batch = Mapping[str, Any]
LamLike = Any  # float32 [T] array-like, or Callable[[int], array-like] of the step index.

# Folded into cfg.seed for the weighting strategy's keys, so that its random stream (RLW's z)
# is independent of any other use of the same seed (e.g. the model's initialisation).
_WEIGHTING_RNG_SALT = 0x5EED1A3B
_GRADMTL_SEED_SALT = 0x6AD3717C
_DROPOUT_SEED_SALT = 0x0D20B0A7

_DEFAULTS = {
    "accum_steps": 1,
    "warmup_frac": 0.03,
    "clip_norm": 1.0,
    "weight_decay": 0.0,
    "checkpoint_every": 1000,
    "log_every": 10,
    "seed": 0,
    "freeze_vision_tower": True,
    "tla": False,
    "batch_size": None,
    "ce_chunk_size": 0,
    "gradient_method": None,
    "gradient_method_options": None,
}


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is left in place."""


def _cfg(cfg: Any, name: str) -> Any:
  """A config field (dict or ConfigDict), with the defaults above for optional ones."""
  if name in cfg:
    return cfg[name]
  if name in _DEFAULTS:
    return _DEFAULTS[name]
  raise KeyError(f"config field {name!r} is required")


# ----------------------------------------------------------------------------- optimizer


def make_schedule(cfg: Any) -> optax.Schedule:
  """Linear warm-up over `warmup_frac` of `steps` from 0 to `lr`, then cosine decay to 0."""
  steps = int(_cfg(cfg, "steps"))
  warmup = int(round(float(_cfg(cfg, "warmup_frac")) * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=float(_cfg(cfg, "lr")),
      warmup_steps=warmup,
      # optax needs decay_steps > warmup_steps; steps counts the warm-up too.
      decay_steps=max(steps, warmup + 1),
      end_value=0.0,
  )


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with a unit learning rate.

  The train step multiplies the updates by the learning rate it receives as an argument
  (`make_schedule` evaluated on the host), so the compiled step does not depend on the length
  of the run and one compilation serves every run of a pipeline.
  """
  return _optimizer(_optimizer_key(cfg))


def _optimizer_key(cfg: Any) -> tuple[float, float]:
  return float(_cfg(cfg, "clip_norm") or 0.0), float(_cfg(cfg, "weight_decay"))


def _optimizer(key: tuple[float, float]) -> optax.GradientTransformation:
  clip_norm, weight_decay = key
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(1.0, weight_decay=weight_decay))
  return optax.chain(*parts)


def _flat(tree: Any) -> tuple[Any, tuple[Any, ...]]:
  """A hashable (treedef, leaves) form of a pytree of shardings, for the lru_cache below."""
  return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))


@functools.lru_cache(maxsize=16)
def _cached_train_step(graphdef: nnx.GraphDef, optimizer_key: tuple[float, float], mesh: Mesh,
                       accum_steps: int, tla: bool, ce_chunk_size: int, state_sharding_flat,
                       frozen_sharding_flat, dropout_seed: int | None = None):
  return make_train_step(graphdef, _optimizer(optimizer_key), mesh=mesh, accum_steps=accum_steps,
                         tla=tla, donate=True, ce_chunk_size=ce_chunk_size,
                         dropout_seed=dropout_seed,
                         state_sharding=jax.tree.unflatten(*state_sharding_flat),
                         frozen_sharding=jax.tree.unflatten(*frozen_sharding_flat))


# ------------------------------------------------------------------------- model & state


def trainable_filter(freeze_vision_tower: bool = True, lora: bool = False) -> nnx.filterlib.Filter:
  """What the optimizer updates: every nnx.Param except a frozen vision tower's; with LoRA, the
  adapters and the projector only (model/lora.py)."""
  return lora_lib.trainable_filter(freeze_vision_tower, lora)


def split_model(
    model: nnx.Module, *, freeze_vision_tower: bool = True
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else: frozen params, rng state, ...).

  A model carrying LoRA adapters trains only them (and the projector); the frozen rest holds no
  optimizer state.
  """
  return nnx.split(model, trainable_filter(freeze_vision_tower, lora_lib.has_lora(model)), ...)


@struct.dataclass
class TrainState:
  """What the optimizer changes and a checkpoint holds; frozen state lives alongside."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  # Only the trainable params get optimizer state: the frozen tower costs no Adam moments.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ---------------------------------------------------------------------------- sharding


def make_mesh(devices: Sequence[jax.Device] | None = None, mesh_config: Any = None) -> Mesh:
  """("data", "fsdp", "tensor") mesh over `devices` (default all); see sharding.make_mesh."""
  return sharding_lib.make_mesh(mesh_config, devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return sharding_lib.batch_sharding(mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Host arrays [B, ...] → global arrays sharded on their leading axis over `data`."""
  return sharding_lib.shard_batch(batch, mesh)


# -------------------------------------------------------------------------- train step


def _micro_batches(batch: Batch, accum_steps: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[B, ...] → [A, B/A, ...] where micro-batch k holds rows k, k+A, k+2A, ...

  Strided rather than contiguous so that, with rows sharded contiguously over `data`,
  every micro-batch is spread over all devices without moving any row.
  """
  def split(x):
    rows = x.shape[0]
    x = x.reshape(rows // accum_steps, accum_steps, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    # Rows of every micro-batch stay on the batch axes (replicated where they do not divide).
    return sharding_lib.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2), mesh)
  return {k: split(v) for k, v in batch.items()}


def _loss_sums(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
               batch: Batch, lam: jax.Array, ce_chunk_size: int = 0,
               dropout_key: jax.Array | None = None):
  """Model forward + VITW sums on one (micro-)batch; the weighted sum is differentiated.

  With `ce_chunk_size`, the LM head and the cross-entropy run over chunks of that many tokens, so
  the [tokens, vocab] logits never exist at once (loss.chunked_token_loss). `dropout_key` gives
  the LoRA adapters' dropout masks of this micro-batch (model/lora.py).
  """
  if dropout_key is not None:
      frozen = lora_lib.with_dropout_key(frozen, dropout_key)
  model = nnx.merge(graphdef, params, frozen)
  inputs = dict(images=batch.get("images"), positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"))
  if ce_chunk_size:
    hidden = model.hidden_states(batch["input_ids"], **inputs)
    sums = loss_lib.chunked_token_loss(hidden, model.logits, batch["targets"], batch["loss_mask"],
                                       batch["task_ids"], lam, chunk_size=ce_chunk_size)
  else:
    logits = model(batch["input_ids"], **inputs)
    sums = loss_lib.token_loss(logits, batch["targets"], batch["loss_mask"], batch["task_ids"], lam)
  weighted, weight, task_sum, task_count = sums
  return weighted, (weight, task_sum, task_count)


def _accumulate(grad_fn, params, batch, accum_steps, mesh, num_tasks, key=None):
  """Sums of (grads, weighted nll, weight, per-task nll, per-task count) over micro-batches.

  `grad_fn(params, micro_batch, micro_key)`; micro-batch k gets `fold_in(key, k)` (None: None).
  """
  def micro_key(k):
    return None if key is None else jax.random.fold_in(key, k)

  if accum_steps == 1:
    (weighted, (weight, task_sum, task_count)), grads = grad_fn(params, batch, micro_key(0))
    return grads, weighted, weight, task_sum, task_count

  def body(carry, xs):
    micro, k = xs
    (weighted, (weight, task_sum, task_count)), grads = grad_fn(params, micro, micro_key(k))
    return jax.tree.map(jnp.add, carry, (grads, weighted, weight, task_sum, task_count)), None

  zero = jnp.zeros((), jnp.float32)
  init = (jax.tree.map(jnp.zeros_like, params), zero, zero,
          jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.float32))
  sums, _ = jax.lax.scan(body, init, (_micro_batches(batch, accum_steps, mesh),
                                      jnp.arange(accum_steps)))
  return sums


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    accum_steps: int = 1,
    tla: bool = False,
    donate: bool = False,
    state_sharding: Any = None,
    frozen_sharding: Any = None,
    ce_chunk_size: int = 0,
    dropout_seed: int | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Jit-compiled `(state, frozen, batch, lam, lr) -> (state, metrics)`.

  `lam` is a float32 [T] argument, so a new λ never recompiles; `lr` scales the updates of
  `tx` (a unit-rate optimizer from `make_optimizer`), so the schedule never recompiles either. With `tla`, λ is
  replaced by 1 / (count of each task over the whole global batch). The batch's
  leading axis is the global batch, sharded over `data`; state and frozen are
  replicated. `donate` lets XLA reuse the state's buffers (the input state is then
  deleted). `ce_chunk_size` > 0 computes the cross-entropy over chunks of that many tokens
  (same loss and gradients, without the full [tokens, vocab] logits). `dropout_seed` (a model
  with LoRA dropout, in train mode): the masks of step s, micro-batch k come from
  fold_in(fold_in(key(dropout_seed), s), k), a pure function of the step, so a resumed run draws
  the same masks.

  Metrics: loss, per_task_loss [T], per_task_count [T], grad_norm (before clipping),
  weight_sum, tokens (number of loss tokens), lam [T] (the λ actually used).
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

  def step(state: TrainState, frozen: nnx.State, batch: Batch, lam: jax.Array, lr: jax.Array):
    num_tasks = lam.shape[0]
    lam = lam.astype(jnp.float32)
    if tla:
      # Counts over the global batch, before any micro-batch split.
      lam = loss_lib.tla_lambda(batch["task_ids"], batch["loss_mask"], num_tasks)
    grad_fn = jax.value_and_grad(
        lambda p, b, key: _loss_sums(graphdef, p, frozen, b, lam, ce_chunk_size, key),
        has_aux=True)
    key = (None if dropout_seed is None
           else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
    grads, weighted, weight, task_sum, task_count = _accumulate(
        grad_fn, state.params, batch, accum_steps, mesh, num_tasks, key)
    # The one division of the step. A batch without loss tokens has zero sums: divide by 1.
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    metrics = {
        "loss": weighted / denom,
        "per_task_loss": loss_lib.per_task_mean(task_sum, task_count),
        "per_task_count": task_count,
        "grad_norm": optax.tree.norm(grads),
        "weight_sum": weight,
        "tokens": jnp.sum((batch["loss_mask"] > 0) & (batch["task_ids"] >= 0)),
        "lam": lam,
    }
    return new_state, metrics

  repl, data = replicated(mesh), data_sharded(mesh)
  state_sh = repl if state_sharding is None else state_sharding
  frozen_sh = repl if frozen_sharding is None else frozen_sharding
  return jax.jit(sharding_lib.under_mesh(step, mesh),
                 in_shardings=(state_sh, frozen_sh, data, repl, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,) if donate else ())


# ------------------------------------------------------------------------------- loop


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


def _lam_at(lam: LamLike, step_index: int) -> np.ndarray:
  value = lam(step_index) if callable(lam) else lam
  return np.asarray(value, np.float32)


def weighting_rng(seed: int, step: int) -> jax.Array:
  """The key `train` passes to the weighting strategy's `update` after step index `step`.

  A pure function of (seed, step), so a resumed run draws the same random λ (RLW) as the
  run it continues, without any key in the checkpoint.
  """
  base = jax.random.fold_in(jax.random.key(int(seed)), _WEIGHTING_RNG_SALT)
  return jax.random.fold_in(base, int(step))


def _check_weighting(weighting: weighting_lib.Strategy | None, tla: bool) -> None:
  """TLA's λ is made by the step (`tla=True`); a strategy must agree with the config."""
  if weighting is None:
    return
  if weighting.name == "tla" and not tla:
    raise ValueError("the tla weighting strategy needs the train config's tla=True "
                     "(the train step computes the TLA λ)")
  if tla and weighting.name != "tla":
    raise ValueError(f"train config tla=True replaces every λ in the step, so the "
                     f"{weighting.name!r} strategy would be ignored; use the tla strategy")


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


def _check_batch(batch: Batch, cfg: Any, mesh: Mesh, processes: int = 1) -> int:
  """Validates the global batch shape against the config and mesh; returns its rows.

  `batch` holds the rows of 1 process out of `processes` (all of them by default).
  """
  rows = int(np.shape(batch["input_ids"])[0]) * processes
  batch_size, accum = _cfg(cfg, "batch_size"), int(_cfg(cfg, "accum_steps"))
  if batch_size is not None and rows != int(batch_size):
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
    lam: LamLike | None,
    cfg: Any,
    workdir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    task_names: Sequence[str] | None = None,
    weighting: weighting_lib.Strategy | None = None,
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
    lam: float32 [T] task weights, or a function of the step index returning them
      (ignored, except for T, when `cfg.tla`). With a `weighting` strategy only its length
      T is read (its values are ignored), and it may be None when `task_names` is given.
    cfg: steps, lr and the optional fields of `_DEFAULTS`.
    workdir: gets `checkpoints/`, `metrics.jsonl` and `tb/`.
    mesh: default: `make_mesh()` over all devices.
    task_names: names of the T tasks in logs; default `task0`, `task1`, ...
    weighting: a `weighting.Strategy` that makes λ instead of `lam`: step index i trains
      with `state["lam"]`, then `update(state, per_task_loss, i, weighting_rng(cfg.seed, i),
      per_task_count=...)` (jitted) gives the λ of step i + 1. Its state is saved in every
      checkpoint next to the TrainState and restored on resume, so a killed run continues
      with the same λ sequence. The `tla` strategy requires `cfg.tla` (the step computes
      TLA's λ) and any other strategy forbids it. None: λ from `lam`.

  Raises:
    TrainingDiverged: the loss became NaN/inf (the diverged state is not saved).
    ValueError: inconsistent task count, TLA setting, or a checkpoint written with a
      different use of a weighting strategy than this call.
  """
  workdir = os.fspath(workdir)
  mesh = make_mesh() if mesh is None else mesh
  steps = int(_cfg(cfg, "steps"))
  log_every, ckpt_every = int(_cfg(cfg, "log_every")), int(_cfg(cfg, "checkpoint_every"))
  tla = bool(_cfg(cfg, "tla"))
  _check_weighting(weighting, tla)
  if lam is None:
    if weighting is None or task_names is None:
      raise ValueError("lam may be None only with a weighting strategy and task_names")
    num_tasks = len(task_names)
  else:
    num_tasks = _lam_at(lam, 0).shape[0]
  task_names = [f"task{k}" for k in range(num_tasks)] if task_names is None else list(task_names)
  if len(task_names) != num_tasks:
    raise ValueError(f"{len(task_names)} task names for {num_tasks} task weights")

  tx, schedule = make_optimizer(cfg), make_schedule(cfg)
  dropout_seed = None
  if lora_lib.has_dropout(model):
    model.train()  # the adapters' dropout on; their masks come from the step (make_train_step)
    dropout_seed = (int(_cfg(cfg, "seed")) ^ _DROPOUT_SEED_SALT) & 0x7FFFFFFF
  graphdef, params, frozen = split_model(
      model, freeze_vision_tower=bool(_cfg(cfg, "freeze_vision_tower")))
  state = init_train_state(params, tx)
  state_sharding = sharding_lib.param_shardings(state, mesh)
  frozen_sharding = sharding_lib.param_shardings(frozen, mesh)
  state = jax.device_put(state, state_sharding)
  frozen = jax.device_put(frozen, frozen_sharding)
  # Replicated on the mesh like the step's metrics, so that the jitted update sees one
  # device set and every host of a multi-host run holds (and saves) the same state.
  wstate = None if weighting is None else replicate(weighting.init(num_tasks), mesh)
  iterator = get_batch if _is_stateful(get_batch) else None
  method = _cfg(cfg, "gradient_method")
  mtl_state = None
  if method:
    if dropout_seed is not None:
      raise ValueError(f"gradient_method={method!r} does not draw LoRA dropout masks; use "
                       "lora.dropout=0 with gradient methods")
    if weighting is not None or tla:
      raise ValueError(f"gradient_method={method!r} combines per-task gradients itself; it "
                       "cannot be used with a weighting strategy or tla")
    from visatb_jax.train import gradmtl_step  # pylint: disable=g-import-not-at-top
    # Salted like the weighting key: PCGrad's task order must not share the model's seed stream.
    mtl_seed = (int(_cfg(cfg, "seed")) ^ _GRADMTL_SEED_SALT) & 0x7FFFFFFF
    mtl_state = replicate(gradmtl_step.init_mtl_state(method, num_tasks, mtl_seed), mesh)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=2)
  if ckpt.latest_step() is not None:
    state, wstate, mtl_state = _restore_for_resume(ckpt, state, wstate, iterator, mtl_state)
  start = int(state.step)

  if method:
    options = tuple(sorted(dict(_cfg(cfg, "gradient_method_options") or {}).items()))
    mtl_fn = gradmtl_step.cached_gradmtl_train_step(
        graphdef, _optimizer_key(cfg), mesh, method, options, int(_cfg(cfg, "accum_steps")),
        _flat(state_sharding), _flat(frozen_sharding))

    def step_fn(state, frozen, batch, lam_i, lr):
      nonlocal mtl_state
      state, metrics, mtl_state = mtl_fn(state, frozen, batch, lam_i, lr, mtl_state)
      return state, metrics
  else:
    step_fn = _cached_train_step(graphdef, _optimizer_key(cfg), mesh,
                                 int(_cfg(cfg, "accum_steps")), tla,
                                 int(_cfg(cfg, "ce_chunk_size") or 0),
                                 _flat(state_sharding), _flat(frozen_sharding), dropout_seed)
  seed = int(_cfg(cfg, "seed"))
  log = metrics_log.MetricsLog(workdir, resume_step=start, enabled=jax.process_index() == 0)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=steps, initial=start, disable=None, desc="train", unit="step")
  t0 = t_window = time.perf_counter()
  window_tokens = 0
  try:
    for index in range(start, steps):
      if iterator is not None:
        local_batch = next(iterator)
        rows = _check_batch(local_batch, cfg, mesh, jax.process_count())
        window_tokens += _input_tokens(local_batch) * jax.process_count()
      else:
        host_batch = get_batch(index)
        rows = _check_batch(host_batch, cfg, mesh)
        window_tokens += _input_tokens(host_batch)
        local_batch = _process_rows(host_batch, rows)
      lam_i = (_lam_at(lam, index) if wstate is None
               else np.asarray(jax.device_get(wstate["lam"]), np.float32))
      state, device_metrics = step_fn(state, frozen, shard_batch(local_batch, mesh), lam_i,
                                      np.float32(schedule(index)))
      metrics = jax.device_get(device_metrics)
      done = index + 1
      # Before any save: a diverged state must never replace the last good checkpoint.
      _check_finite(metrics, done, task_names)
      if wstate is not None:
        # The λ of the next step, from the losses of this one (weighting.py's contract).
        _, wstate = weighting_lib.jit_update(
            weighting, wstate, device_metrics["per_task_loss"], index,
            weighting_rng(seed, index), device_metrics["per_task_count"])
      bar.update(1)
      if done % log_every == 0 or done == steps:
        now = time.perf_counter()
        log.write(metrics_log.make_record(
            step=done, metrics=metrics, task_names=task_names, lr=float(schedule(index)),
            tokens_per_s=window_tokens / max(now - t_window, 1e-9), elapsed_s=now - t0))
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        t_window, window_tokens = now, 0
      if done % ckpt_every == 0 or done == steps:
        # The weighting state saved with step `done` already holds the λ of index `done`,
        # the first step a resumed run trains.
        extras = {} if wstate is None else {checkpoint_lib.WEIGHTING_ITEM: wstate}
        if iterator is not None:
          extras[checkpoint_lib.DATA_ITEM] = iterator
        if mtl_state is not None:
          extras[checkpoint_lib.GRADMTL_ITEM] = mtl_state
        ckpt.save(done, state, extras)
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


def restore_model(model: nnx.Module, cfg: Any, workdir: str | os.PathLike) -> nnx.Module:
  """Loads the trainable params of the latest checkpoint in `workdir/checkpoints` into `model`.

  `cfg` must be the training config of that run (the optimizer state's structure depends on it).
  A weighting strategy's state stored in the same checkpoint is not read.
  """
  graphdef, params, _ = split_model(
      model, freeze_vision_tower=bool(_cfg(cfg, "freeze_vision_tower")))
  del graphdef
  ckpt = checkpoint_lib.Checkpointer(os.path.join(os.fspath(workdir), CHECKPOINT_DIR),
                                     max_to_keep=2)
  try:
    state = ckpt.restore(init_train_state(params, make_optimizer(cfg)))
  finally:
    ckpt.close()
  nnx.update(model, state.params)
  return model
