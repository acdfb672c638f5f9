"""Jit train step that combines per-task gradients with a `gradmtl` method.

The counterpart of `train.make_train_step` for the gradient-combination baselines (IMGrad,
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
are summed over micro-batches (`lax.scan`, rows strided as in train.py) and divided once.
G = gradmtl.flatten_task_grads(...) is [T, P] float32 with P the number of trainable parameters
(the vision tower is frozen by the trainer): T·P·4 bytes, plus the [T, …] per-task gradient tree
it is raveled from — fine for small models, the limit of this step for large ones.

Active tasks. Only tasks with loss tokens in the global batch and λ > 0 take part: the method
runs on those rows alone (a `lax.switch` on their number K, the active rows gathered first, no
gather when all T are active). A zero row is not harmless: the min-norm point of a hull that
contains 0 is 0 (MGDA would not move), CAGrad's dual puts its weight on the zero row, and
Nash-MTL has no solution. A batch with no active task gives a zero direction.

Scale. The direction is put on the scale of a summed loss over the K active tasks, as the
methods' releases do before the optimizer step: `cagrad` and `imgrad` (built on the mean
gradient) and `pcgrad` with `reduction="mean"` are multiplied by K; `pcgrad` (sum), `nash`
(Gᵀα) and `mgda` (a convex combination, as the MGDA-UB and Nash-MTL releases step with it) are
not. Then global-norm clipping and Adam (`tx`) as in the EW step, and `lr` multiplies the update.

Metrics: those of `train.make_train_step` (loss is the λ-weighted VITW loss, for logging only;
grad_norm is the norm of the combined direction before clipping) plus `mtl_weights` [T]: the
weights m with direction = Σ_k m_k ∇L_k (scale included, 0 for inactive tasks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.core import gradmtl
from visatb_jax.core import loss as loss_lib
from visatb_jax.runtime import sharding as sharding_lib
from visatb_jax.train import loop as train_lib

Batch = Mapping[str, Any]
# Arguments the step supplies itself; a user cannot set them through method_options.
_STEP_OPTIONS = {"pcgrad": ("rng",), "nash": ("prev_alpha",)}


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


def _task_sums(graphdef: nnx.GraphDef, frozen: nnx.State, batch: Batch, lam: jax.Array,
               params: nnx.State):
  """per_task_nll_sum [T] (differentiated) and the other VITW sums of one (micro-)batch."""
  model = nnx.merge(graphdef, params, frozen)
  logits = model(batch["input_ids"], images=batch.get("images"),
                 positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  weighted, weight, task_sum, task_count = loss_lib.token_loss(
      logits, batch["targets"], batch["loss_mask"], batch["task_ids"], lam)
  return task_sum, (weighted, weight, task_count)


def _micro_task_grads(graphdef, frozen, lam, params, batch):
  """One forward, then the vjp vmapped over the T one-hot cotangents."""
  task_sum, vjp_fn, (weighted, weight, task_count) = jax.vjp(
      functools.partial(_task_sums, graphdef, frozen, batch, lam), params, has_aux=True)
  (grads,) = jax.vmap(vjp_fn)(jnp.eye(task_sum.shape[0], dtype=task_sum.dtype))
  return grads, weighted, weight, task_sum, task_count


def task_gradients(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: Batch,
                   lam: jax.Array, *, accum_steps: int = 1, mesh: Mesh | None = None):
  """Per-task gradients of the NLL sums, and the VITW sums, over the whole (global) batch.

  Returns (grads, weighted_nll_sum, weight_sum, per_task_nll_sum [T], per_task_count [T]) where
  every leaf of `grads` is [T, *param.shape]: row k = ∂ per_task_nll_sum[k] / ∂ params, summed
  over the `accum_steps` micro-batches (nothing is divided). `mesh` is needed for accum_steps > 1.
  """
  lam = jnp.asarray(lam, jnp.float32)
  fn = functools.partial(_micro_task_grads, graphdef, frozen, lam, params)
  if accum_steps == 1:
    return fn(batch)
  if mesh is None:
    raise ValueError("task_gradients needs the mesh when accum_steps > 1")
  num_tasks = lam.shape[0]

  def body(carry, micro):
    return jax.tree.map(jnp.add, carry, fn(micro)), None

  zero = jnp.zeros((), jnp.float32)
  zeros_t = jnp.zeros((num_tasks,), jnp.float32)
  init = (jax.tree.map(lambda p: jnp.zeros((num_tasks, *p.shape), p.dtype), params),
          zero, zero, zeros_t, zeros_t)
  # pylint: disable-next=protected-access
  micro = train_lib._micro_batches(batch, accum_steps, mesh)
  sums, _ = jax.lax.scan(body, init, micro)
  return sums


# ----------------------------------------------------------------------------- combination


def combine(G: jax.Array, active: jax.Array, method: str,
            method_options: Mapping[str, Any] | None = None, *,
            mtl_state: GradMTLState) -> tuple[jax.Array, jax.Array, GradMTLState]:
  """`method` on the active rows of G [T, P] → (direction [P], weights [T], next state).

  direction = weights @ G, on the summed-loss scale (`direction_scale`); inactive tasks get
  weight 0 and do not enter the solver. Jittable; `method`/`method_options` are static.
  """
  options = _check_method(method, method_options)
  num_tasks = G.shape[0]
  fn = gradmtl.METHODS[method]
  key, rng = jax.random.split(jax.random.wrap_key_data(mtl_state.key))
  prev_alpha = mtl_state.alpha
  # Active tasks first, each group in task order.
  order = jnp.argsort(jnp.logical_not(active).astype(jnp.int32), stable=True)

  def branch(k: int) -> Callable[[], tuple[jax.Array, jax.Array, jax.Array]]:
    def run():
      if k == 0:
        return jnp.zeros(G.shape[1:], G.dtype), jnp.zeros((num_tasks,), jnp.float32), prev_alpha
      # All T active: the order is the identity, and gathering would copy G.
      rows = jnp.arange(num_tasks) if k == num_tasks else order[:k]
      g_active = G if k == num_tasks else jnp.take(G, rows, axis=0)
      kwargs = dict(options)
      if method == "pcgrad":
        kwargs["rng"] = rng
      if method == "nash":
        kwargs["prev_alpha"] = prev_alpha[rows]
      d, w = fn(g_active, **kwargs)
      scale = direction_scale(method, options, k)
      weights = jnp.zeros((num_tasks,), jnp.float32).at[rows].set(scale * w.astype(jnp.float32))
      alpha = prev_alpha.at[rows].set(w) if method == "nash" else prev_alpha
      return (scale * d).astype(G.dtype), weights, alpha
    return run

  num_active = jnp.sum(active.astype(jnp.int32))
  direction, weights, alpha = jax.lax.switch(num_active, [branch(k) for k in range(num_tasks + 1)])
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
) -> Callable[..., tuple[train_lib.TrainState, dict[str, jax.Array], GradMTLState]]:
  """Jit-compiled `(state, frozen, batch, lam, lr, mtl_state) -> (state, metrics, mtl_state)`.

  As `train.make_train_step` (no `tla`: every task is already its own mean loss), with the
  update direction from `gradmtl.METHODS[method](G, **method_options)` on the per-task
  gradients (see the module docstring), and `mtl_state` from `init_mtl_state` threaded through.
  `method_options` are static (c, alpha, iters, reduction, ...). `donate` also donates the
  mtl_state. Metrics: those of the EW step plus `mtl_weights` [T].
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  options = _check_method(method, method_options)
  task_sh = _task_axis_shardings(state_sharding, mesh)

  def step(state: train_lib.TrainState, frozen: nnx.State, batch: Batch, lam: jax.Array,
           lr: jax.Array, mtl_state: GradMTLState):
    lam = lam.astype(jnp.float32)
    grads, weighted, weight, task_sum, task_count = task_gradients(
        graphdef, state.params, frozen, batch, lam, accum_steps=accum_steps, mesh=mesh)
    if task_sh is not None:
      grads = jax.lax.with_sharding_constraint(grads, task_sh)
    # The one division of the step: row k becomes ∇(λ_k · mean NLL of task k).
    row_scale = jnp.where(task_count > 0, lam / jnp.where(task_count > 0, task_count, 1.0), 0.0)
    G = gradmtl.flatten_task_grads(grads) * row_scale[:, None]
    active = (task_count > 0) & (lam > 0)
    d, mtl_weights, mtl_state = combine(G, active, method, options, mtl_state=mtl_state)
    direction = gradmtl.unflatten(d, state.params)
    updates, opt_state = tx.update(direction, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    new_state = train_lib.TrainState(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        opt_state=opt_state)
    metrics = {
        "loss": loss_lib.safe_divide(weighted, weight),
        "per_task_loss": loss_lib.per_task_mean(task_sum, task_count),
        "per_task_count": task_count,
        "grad_norm": optax.tree.norm(direction),
        "weight_sum": weight,
        "tokens": jnp.sum((batch["loss_mask"] > 0) & (batch["task_ids"] >= 0)),
        "lam": lam,
        "mtl_weights": mtl_weights,
    }
    return new_state, metrics, mtl_state

  repl, data = train_lib.replicated(mesh), train_lib.data_sharded(mesh)
  state_sh = repl if state_sharding is None else state_sharding
  frozen_sh = repl if frozen_sharding is None else frozen_sharding
  return jax.jit(sharding_lib.under_mesh(step, mesh),
                 in_shardings=(state_sh, frozen_sh, data, repl, repl, repl),
                 out_shardings=(state_sh, repl, repl),
                 donate_argnums=(0, 5) if donate else ())


@functools.lru_cache(maxsize=16)
def cached_gradmtl_train_step(graphdef: nnx.GraphDef, optimizer_key: tuple[float, float],
                              mesh: Mesh, method: str, method_options: tuple[tuple[str, Any], ...],
                              accum_steps: int, state_sharding_flat, frozen_sharding_flat):
  """`make_gradmtl_train_step` with donation, memoised like `train._cached_train_step`.

  `method_options` as sorted (name, value) pairs; the sharding arguments as `train._flat` gives.
  """
  # pylint: disable=protected-access
  return make_gradmtl_train_step(
      graphdef, train_lib._optimizer(optimizer_key), mesh=mesh, method=method,
      method_options=dict(method_options), accum_steps=accum_steps, donate=True,
      state_sharding=jax.tree.unflatten(*state_sharding_flat),
      frozen_sharding=jax.tree.unflatten(*frozen_sharding_flat))
