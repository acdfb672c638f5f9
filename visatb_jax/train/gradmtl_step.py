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

Metrics: those of `step.step_metrics` (loss is the λ-weighted VITW loss, for logging only;
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
                   ce_chunk_size: int = 0):
  """Per-task gradients of the NLL sums, and the VITW sums, over the whole (global) batch.

  Returns (grads, LossSums) where every leaf of `grads` is [T, *param.shape]: row k =
  ∂ per_task_nll_sum[k] / ∂ params, summed over the `accum_steps` micro-batches (nothing is
  divided). One forward per micro-batch, then its vjp vmapped over the T one-hot cotangents.
  `mesh` is needed for accum_steps > 1; `ce_chunk_size` as in the VITW step.
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
    return grads, sums

  return step_lib.accumulate(micro, batch, accum_steps, mesh)


# ----------------------------------------------------------------------------- combination


def combine(G: jax.Array, active: jax.Array, method: str,
            method_options: Mapping[str, Any] | None = None, *,
            mtl_state: GradMTLState) -> tuple[jax.Array, jax.Array, GradMTLState]:
  """`method` on the active rows of G [T, P] → (direction [P], weights [T], next state).

  direction = weights @ G (GradDrop: the kept share of each row, the direction not being a
  linear combination), on the summed-loss scale (`direction_scale`); inactive tasks get
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
      if "rng" in _STEP_OPTIONS.get(method, ()):
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
    ce_chunk_size: int = 0,
) -> Callable[..., tuple[state_lib.TrainState, dict[str, jax.Array], GradMTLState]]:
  """Jit-compiled `(state, frozen, batch, lam, lr, mtl_state) -> (state, metrics, mtl_state)`.

  As `vitw_step.make_train_step` (no `tla`: every task is already its own mean loss), with the
  update direction from `gradmtl.METHODS[method](G, **method_options)` on the per-task
  gradients (see the module docstring), and `mtl_state` from `init_mtl_state` threaded through.
  `method_options` are static (c, alpha, iters, reduction, ...). `donate` also donates the
  mtl_state. Metrics: those of the EW step plus `mtl_weights` [T].
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  options = _check_method(method, method_options)
  task_sh = _task_axis_shardings(state_sharding, mesh)

  def step(state: state_lib.TrainState, frozen: nnx.State, batch: Batch, lam: jax.Array,
           lr: jax.Array, mtl_state: GradMTLState):
    lam = lam.astype(jnp.float32)
    grads, sums = task_gradients(graphdef, state.params, frozen, batch, lam,
                                 accum_steps=accum_steps, mesh=mesh, ce_chunk_size=ce_chunk_size)
    if task_sh is not None:
      grads = jax.lax.with_sharding_constraint(grads, task_sh)
    # The one division of the step: row k becomes ∇(λ_k · mean NLL of task k).
    count = sums.task_count
    row_scale = jnp.where(count > 0, lam / jnp.where(count > 0, count, 1.0), 0.0)
    G = gradmtl.flatten_task_grads(grads) * row_scale[:, None]
    active = (count > 0) & (lam > 0)
    d, mtl_weights, mtl_state = combine(G, active, method, options, mtl_state=mtl_state)
    direction = gradmtl.unflatten(d, state.params)
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
