"""Jit train step that combines per-task gradients with a `gradmtl` method.

The counterpart of `vitw_step.make_train_step` for the gradient-combination baselines (IMGrad,
CAGrad, PCGrad, MGDA, Nash-MTL): the same arguments and metrics, plus a small `GradMTLState`
carried from step to step (Nash-MTL's previous α, PCGrad's random key).

What is combined. Task k's loss is λ_k times its mean token NLL over the whole global batch of
the optimizer step (every device and accumulation micro-batch):

    L_k = λ_k · per_task_nll_sum[k] / per_task_count[k]        (0 for a task without tokens)

so λ still matters: it scales row k of G, which changes the solution of every method (Nash-MTL
and MGDA are not invariant to the scale of one row). With λ = 1 each task is its own mean loss,
as in the methods' papers. `lam` stays an array argument, so a new λ never recompiles.

How G is built. One forward pass gives per_task_nll_sum [T]; `jax.vjp` of it, vmapped over the
T one-hot cotangents, gives the T gradients of the trainable parameters from that single forward
(the backward is batched over T: its activation cotangents are T times those of one backward,
e.g. [T, B, L, V] for the logits). With accumulation the per-task NLL-sum gradients and counts
are summed over micro-batches (`step.accumulate`, rows strided as in the VITW step) and divided once.
The per-task gradients G are that tree, every leaf [T, *param.shape] and sharded like its
parameter (the task axis replicated: `_task_axis_shardings`, pinned on every micro-batch), so a
device holds T × its FSDP share of the trainable parameters: T·P·4 bytes over the FSDP shards
(`memory_need`; `check_memory`, called by the config check, refuses a config whose share cannot
fit one device). No [T, P] matrix is ever formed: the methods are solved on the [T, T] Gram
matrix, the sum of every leaf's own Gram (a local contraction and one small all-reduce), and the
direction is the weighted sum Σ_k w_k g_k taken leaf by leaf; GradDrop masks leaf by leaf
(`combine`). The division by the counts is folded into the Gram matrix and the weights.

Active tasks. Only tasks with loss tokens in the global batch and λ > 0 take part: the method
runs on those rows alone (a `lax.switch` on their number K, the active entries of the Gram
matrix gathered first, no gather when all T are active). A zero row is not harmless: the
min-norm point of a hull that contains 0 is 0 (MGDA would not move), CAGrad's dual puts its
weight on the zero row, and Nash-MTL has no solution. A batch with no active task gives a zero direction.

Scale. The direction is put on the scale of a summed loss over the K active tasks, as the
methods' releases do before the optimizer step: `cagrad` and `imgrad` (built on the mean
gradient) and `pcgrad` with `reduction="mean"` are multiplied by K; `pcgrad` (sum), `nash`
(Gᵀα) and `mgda` (a convex combination, as the MGDA-UB and Nash-MTL releases step with it) are
not. Then global-norm clipping and Adam (`tx`) as in the EW step, and `lr` multiplies the update.

Metrics: those of `step.step_metrics` (loss is the λ-weighted VITW loss, for logging only;
grad_norm is the norm of the combined direction before clipping) plus `mtl_weights` [T]: the
weights m with direction = Σ_k m_k ∇L_k (scale included, 0 for inactive tasks).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.core import gradmtl
from visatb_jax.train import state as state_lib
from visatb_jax.train import step as step_lib

Batch = Mapping[str, Any]
# Arguments the step supplies itself; a user cannot set them through method_options.
_STEP_OPTIONS = {"pcgrad": ("rng",), "graddrop": ("rng",), "nash": ("prev_alpha",)}


@struct.dataclass
class GradMTLState:
  """Carried across steps and checkpointed with the model: plain arrays only.

  alpha: float32 [T], Nash-MTL's α of the last step that solved (its fallback when the next
    solve fails; absent tasks keep theirs). Ones at the start, as the release.
  key: uint32 [2], raw key data of PCGrad's random task order (split once per step).
  """

  alpha: jax.Array
  key: jax.Array


def _check_method(method: str, method_options: Mapping[str, Any] | None) -> dict[str, Any]:
  if method not in gradmtl.METHODS:
    raise ValueError(f"unknown gradient method {method!r}; known: {sorted(gradmtl.METHODS)}")
  options = dict(method_options or {})
  reserved = set(options) & set(_STEP_OPTIONS.get(method, ()))
  if reserved:
    raise ValueError(f"method_options of {method!r} may not set {sorted(reserved)}: the train "
                     "step passes them from GradMTLState")
  return options


def init_mtl_state(method: str, num_tasks: int, seed: int = 0) -> GradMTLState:
  """The state of step 0 for `method` over `num_tasks` tasks (same structure for every method)."""
  _check_method(method, None)
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  return GradMTLState(alpha=jnp.ones((num_tasks,), jnp.float32),
                      key=jax.random.key_data(jax.random.key(int(seed))))


def direction_scale(method: str, method_options: Mapping[str, Any] | None, num_active: int) -> int:
  """Factor putting the method's direction on the scale of a loss summed over the active tasks."""
  options = dict(method_options or {})
  if method in ("cagrad", "imgrad"):
    return num_active
  if method == "pcgrad" and options.get("reduction", "sum") == "mean":
    return num_active
  return 1


# --------------------------------------------------------------------------- per-task grads


def task_gradients(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: Batch,
                   lam: jax.Array, *, accum_steps: int = 1, mesh: Mesh | None = None,
                   ce_chunk_size: int = 0, grad_sharding: Any = None):
  """Per-task gradients of the NLL sums, and the VITW sums, over the whole (global) batch.

  Returns (grads, LossSums) where every leaf of `grads` is [T, *param.shape]: row k =
  ∂ per_task_nll_sum[k] / ∂ params, summed over the `accum_steps` micro-batches (nothing is
  divided). One forward per micro-batch, then its vjp vmapped over the T one-hot cotangents.
  `mesh` is needed for accum_steps > 1; `ce_chunk_size` as in the VITW step. `grad_sharding`
  (a tree of shardings of the [T, ...] leaves, `_task_axis_shardings`) pins every micro-batch's
  gradients, hence the accumulator, to the parameters' layout: left to itself the partitioner
  may keep a [T, ...] gradient whole on every device, T times the parameters.
  """
  lam = jnp.asarray(lam, jnp.float32)
  if accum_steps > 1 and mesh is None:
    raise ValueError("task_gradients needs the mesh when accum_steps > 1")

  def micro(micro_batch, key):
    del key
    def task_sum(p):
      sums = step_lib.forward_sums(graphdef, p, frozen, micro_batch, lam,
                                   ce_chunk_size=ce_chunk_size)
      return sums.task_sum, sums
    task_sums, vjp_fn, sums = jax.vjp(task_sum, params, has_aux=True)
    (grads,) = jax.vmap(vjp_fn)(jnp.eye(task_sums.shape[0], dtype=task_sums.dtype))
    if grad_sharding is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
    return grads, sums

  return step_lib.accumulate(micro, batch, accum_steps, mesh)


# ----------------------------------------------------------------------------- combination


def combine(grads: Any, active: jax.Array, method: str,
            method_options: Mapping[str, Any] | None = None, *, mtl_state: GradMTLState,
            row_scale: jax.Array | None = None) -> tuple[Any, jax.Array, GradMTLState]:
  """`method` on the active tasks' gradients → (direction, weights [T], next state).

  `grads`: the per-task gradients G, a [T, P] matrix or a tree of [T, ...] leaves (the step's,
  sharded like the parameters); row k enters as row_scale[k] · G_k (None: 1). The direction is
  shaped like one row (the tree without its task axis) and equals Σ_k weights_k · row_scale_k ·
  G_k (GradDrop: weights are the kept share of each row, the direction not being a linear
  combination), on the summed-loss scale (`direction_scale`). Inactive tasks get weight 0 and
  do not enter the solver.

  How: the linear methods are solved on the [T, T] Gram matrix of the scaled rows, restricted
  to the active tasks (a `lax.switch` on their number K, the active entries gathered first, no
  gather when all T are active); G itself is only read twice, by the Gram and by the weighted
  sum, each leaf by leaf. GradDrop masks leaf by leaf over all T rows, the inactive ones scaled
  to 0 (a zero row neither votes on a sign nor adds to the direction, and the draws do not
  depend on T). Jittable; `method`/`method_options` are static.
  """
  options = _check_method(method, method_options)
  leaves = jax.tree.leaves(grads)
  num_tasks = leaves[0].shape[0]
  active = jnp.asarray(active, bool)
  # An inactive row is scaled to 0: GradDrop then ignores it, and no weight can reach it.
  scale_rows = jnp.where(active, 1.0 if row_scale is None else jnp.asarray(row_scale, jnp.float32),
                         0.0)
  key, rng = jax.random.split(jax.random.wrap_key_data(mtl_state.key))
  prev_alpha = mtl_state.alpha

  if method == "graddrop":
    direction, w = gradmtl.graddrop_scaled(grads, scale_rows, rng=rng, **options)
    weights = jnp.where(active, w, 0.0)
    return direction, weights, GradMTLState(alpha=prev_alpha, key=jax.random.key_data(key))

  fn = gradmtl.FROM_GRAM[method]
  A = gradmtl.task_gram(grads) * scale_rows[:, None] * scale_rows[None, :]
  # Active tasks first, each group in task order.
  order = jnp.argsort(jnp.logical_not(active).astype(jnp.int32), stable=True)

  def branch(k: int) -> Callable[[], tuple[jax.Array, jax.Array]]:
    def run():
      if k == 0:
        return jnp.zeros((num_tasks,), jnp.float32), prev_alpha
      # All T active: the order is the identity, and gathering would copy A.
      rows = jnp.arange(num_tasks) if k == num_tasks else order[:k]
      a_active = A if k == num_tasks else A[rows[:, None], rows[None, :]]
      kwargs = dict(options)
      if "rng" in _STEP_OPTIONS.get(method, ()):
        kwargs["rng"] = rng
      if method == "nash":
        kwargs["prev_alpha"] = prev_alpha[rows]
      w = fn(a_active, **kwargs).astype(jnp.float32)
      scale = direction_scale(method, options, k)
      weights = jnp.zeros((num_tasks,), jnp.float32).at[rows].set(scale * w)
      alpha = prev_alpha.at[rows].set(w) if method == "nash" else prev_alpha
      return weights, alpha
    return run

  num_active = jnp.sum(active.astype(jnp.int32))
  weights, alpha = jax.lax.switch(num_active, [branch(k) for k in range(num_tasks + 1)])
  # The weights apply to the scaled rows; the raw rows take their product with the scale.
  direction = gradmtl.combine_tasks(weights * scale_rows, grads)
  return direction, weights, GradMTLState(alpha=alpha, key=jax.random.key_data(key))


# ------------------------------------------------------------------------------ train step


def _task_axis_shardings(state_sharding: Any, mesh: Mesh) -> Any:
  """Shardings of the per-task gradient tree: each parameter's, with a replicated task axis."""
  params_sh = getattr(state_sharding, "params", None)
  if params_sh is None:
    return None
  return jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), params_sh,
                      is_leaf=lambda s: isinstance(s, NamedSharding))


def make_gradmtl_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    method: str,
    method_options: Mapping[str, Any] | None = None,
    accum_steps: int = 1,
    donate: bool = False,
    state_sharding: Any = None,
    frozen_sharding: Any = None,
    ce_chunk_size: int = 0,
) -> Callable[..., tuple[state_lib.TrainState, dict[str, jax.Array], GradMTLState]]:
  """Jit-compiled `(state, frozen, batch, lam, lr, mtl_state) -> (state, metrics, mtl_state)`.

  As `vitw_step.make_train_step` (no `tla`: every task is already its own mean loss), with the
  update direction of `gradmtl.METHODS[method]` (`method_options` its options) on the per-task
  gradients, solved leaf by leaf by `combine` (see the module docstring), and `mtl_state` from
  `init_mtl_state` threaded through.
  `method_options` are static (c, alpha, iters, reduction, ...). `donate` also donates the
  mtl_state. Metrics: those of the EW step plus `mtl_weights` [T].
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  options = _check_method(method, method_options)
  task_sh = _task_axis_shardings(state_sharding, mesh)
  params_sh = getattr(state_sharding, "params", None)

  def step(state: state_lib.TrainState, frozen: nnx.State, batch: Batch, lam: jax.Array,
           lr: jax.Array, mtl_state: GradMTLState):
    lam = lam.astype(jnp.float32)
    grads, sums = task_gradients(graphdef, state.params, frozen, batch, lam,
                                 accum_steps=accum_steps, mesh=mesh, ce_chunk_size=ce_chunk_size,
                                 grad_sharding=task_sh)
    # The one division of the step: row k becomes ∇(λ_k · mean NLL of task k). It is folded
    # into the Gram matrix and the weights, so no scaled copy of the gradients is made.
    count = sums.task_count
    row_scale = jnp.where(count > 0, lam / jnp.where(count > 0, count, 1.0), 0.0)
    active = (count > 0) & (lam > 0)
    direction, mtl_weights, mtl_state = combine(grads, active, method, options,
                                                mtl_state=mtl_state, row_scale=row_scale)
    if params_sh is not None:
      direction = jax.lax.with_sharding_constraint(direction, params_sh)
    new_state = state_lib.apply_direction(state, tx, direction, lr)
    metrics = step_lib.step_metrics(sums, batch, lam, direction)
    metrics["mtl_weights"] = mtl_weights
    return new_state, metrics, mtl_state

  return step_lib.jit_step(step, mesh, state_sharding=state_sharding,
                           frozen_sharding=frozen_sharding, extra_in=1, extra_out=1,
                           donate=donate, donate_extra=(5,))


@functools.lru_cache(maxsize=16)
def cached_gradmtl_train_step(graphdef: nnx.GraphDef, optimizer_spec: tuple[float, float],
                              mesh: Mesh, method: str, method_options: tuple[tuple[str, Any], ...],
                              accum_steps: int, ce_chunk_size: int, state_sharding_flat,
                              frozen_sharding_flat):
  """`make_gradmtl_train_step` with donation, memoised like `vitw_step.cached_train_step`.

  `method_options` as sorted (name, value) pairs; the sharding arguments as `step.flat_tree`
  gives them.
  """
  return make_gradmtl_train_step(
      graphdef, state_lib.optimizer_from_spec(optimizer_spec), mesh=mesh, method=method,
      method_options=dict(method_options), accum_steps=accum_steps, donate=True,
      ce_chunk_size=ce_chunk_size,
      state_sharding=step_lib.unflat_tree(state_sharding_flat),
      frozen_sharding=step_lib.unflat_tree(frozen_sharding_flat))


# ------------------------------------------------------------------------------ memory plan

# What the dry run's smallest device holds (runtime/cost.py CHIPS: an H100, 80 GB of 1e9 bytes).
DEVICE_BYTES = 80e9


def memory_need(*, num_tasks: int, trainable: int, frozen: int, param_bytes: int,
                shards: int) -> dict[str, float]:
  """Bytes per device of the step's arrays that do not depend on the batch, as planned.

  per_task_gradients: T × trainable × param_bytes / shards (the [T, ...] tree, sharded like the
  parameters over the `shards` = fsdp × tensor devices); model_state: the trainable parameters
  and Adam's two moments (3 × trainable) and the frozen ones, in the parameter dtype, over the
  same shards. Activations come on top (the dry run measures them); small replicated leaves
  (norm scales) are counted as sharded.
  """
  grads = num_tasks * trainable * param_bytes / shards
  state = (3 * trainable + frozen) * param_bytes / shards
  return {"per_task_gradients": grads, "model_state": state, "total": grads + state}


def memory_message(method: str, need: Mapping[str, float], *, num_tasks: int, trainable: int,
                   param_bytes: int, devices: int, shards: int,
                   capacity: float = DEVICE_BYTES) -> str | None:
  """The one line refusing `method` when `need` (`memory_need`) exceeds `capacity`; else None."""
  if need["total"] <= capacity:
    return None
  return (f"gradient method {method!r}: its per-task gradients of {num_tasks} tasks take "
          f"{need['per_task_gradients'] / 1e9:.1f} GB per device on {devices} device(s) "
          f"({num_tasks} x {trainable:,} trainable parameters x {param_bytes} bytes / "
          f"{shards} FSDP x tensor shards), plus {need['model_state'] / 1e9:.1f} GB of model "
          f"state: {need['total'] / 1e9:.1f} GB, more than the {capacity / 1e9:.0f} GB of one "
          "device before any activation; use more devices (config.mesh.fsdp) or fewer tasks")


def parameter_counts(model_section: Any, train_section: Any) -> tuple[int, int, int]:
  """(trainable, frozen, bytes per parameter) of a config's model, from its abstract shapes
  (nothing allocated, no weight read; a few seconds at 7B, memoised). Parts that are not on
  this machine (the paper configs name them as paths to fill) are sized from the config's own
  sizes."""
  def plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else dict(x or {})
  train = plain(train_section)
  key = json.dumps({"model": plain(model_section),
                    "freeze_vision_tower": bool(train.get("freeze_vision_tower", True)),
                    "trainable": str(train.get("trainable") or "model")},
                   sort_keys=True, default=str)
  return _parameter_counts(key)


@functools.lru_cache(maxsize=8)
def _parameter_counts(key: str) -> tuple[int, int, int]:
  import math  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  spec = json.loads(key)
  section = spec["model"]
  parts = factory.model_parts(section)
  if parts is not None and not all(os.path.exists(p) for p in parts.values()):
    section = {**section, **dict.fromkeys(factory.PART_FIELDS, "")}
  model = factory.abstract_model(section, factory.model_config(section))
  _, params, frozen = state_lib.split_model(
      model, freeze_vision_tower=spec["freeze_vision_tower"], trainable=spec["trainable"])

  def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))

  itemsize = jnp.dtype(factory.dtypes(section)["param_dtype"]).itemsize
  return count(params), count(frozen), int(itemsize)


def check_memory(methods: Sequence[str], *, num_tasks: int, num_devices: int, mesh_config: Any,
                 counts: tuple[int, int, int], capacity: float = DEVICE_BYTES) -> None:
  """ValueError (one line: method, T, devices, bytes) when a gradient method's per-task
  gradients and the model state exceed one device's `capacity` on `num_devices` devices of the
  config's mesh. `counts`: `parameter_counts`."""
  from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  shape = sharding.mesh_shape(mesh_config, num_devices)
  shards = int(shape["fsdp"]) * int(shape["tensor"])
  trainable, frozen, param_bytes = counts
  need = memory_need(num_tasks=num_tasks, trainable=trainable, frozen=frozen,
                     param_bytes=param_bytes, shards=shards)
  for method in methods:
    message = memory_message(method, need, num_tasks=num_tasks, trainable=trainable,
                             param_bytes=param_bytes, devices=num_devices, shards=shards,
                             capacity=capacity)
    if message:
      raise ValueError(message)
