"""Gradient-combination methods for multi-task learning: IMGrad, CAGrad, PCGrad, MGDA, Nash-MTL,
GradDrop.

Every method is a pure, jittable function of the per-task gradients G: either the [T, P] matrix
whose row k is task k's flattened gradient of the shared parameters (`flatten_task_grads`), or,
as the train step passes them, any pytree whose every leaf has a leading task axis T (leaf
[T, *param.shape]: row k of the leaf is task k's gradient of that parameter). It returns

    (direction, weights [T])   with   direction == Σ_k weights_k · G_k   (up to rounding)

for every method but GradDrop, the direction shaped like one task's gradient ([P], or the tree
without its task axis). Those five combine the task gradients linearly, so each one is solved in
the T×T Gram space A = G Gᵀ (cheap: T is small): `task_gram` sums the [T, T] Gram of every leaf
(a contraction over the leaf's parameter axes), the solver turns A into the weights
(`WEIGHTS`), and `combine_tasks` forms Σ_k w_k g_k leaf by leaf. Nothing of size T × P is ever
built, so per-task gradients sharded like the parameters (FSDP) stay sharded end to end: the
Gram is a local contraction plus one [T, T] all-reduce, the combination a local weighted sum.
The small solvers run inside JAX (no scipy at run time); scipy is only the reference in the
tests. The Gram matrix is rescaled by its mean diagonal before solving: every objective here is
invariant to a positive rescaling of G (or scales trivially), and this keeps the float32 solvers
well scaled whatever the gradients' magnitude. GradDrop (`graddrop`) instead masks G coordinate
by coordinate (leaf by leaf), so its direction is no linear combination of the rows; its weights
are the fraction of each task's gradient mass it keeps.

Scale conventions follow the papers' releases: `mgda` returns a convex combination (the
scale of one task gradient), `cagrad`/`imgrad` are built on the *mean* gradient g0,
`pcgrad` sums the projected gradients (Yu et al.; `reduction="mean"` averages them as the
CAGrad/IMGrad repositories do), `nash` returns Gᵀα, `graddrop` sums the kept components.
Multiply by T to put a mean-based direction on the scale of a summed loss, as those releases
do before the optimizer step.

Under `jax.jit`, G, `rng` (pcgrad, graddrop) and `prev_alpha` (nash) are array arguments; every
other option (c, alpha, iters, reduction, leak, ...) is a Python value and must be static.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

_HIGHEST = jax.lax.Precision.HIGHEST
# Inside √(wᵀAw + ε) of CAGrad/IMGrad, relative to the mean squared gradient norm: keeps the
# objective differentiable when the min-norm point is 0 (the releases add 1e-8 absolute).
_SQRT_EPS = 1e-8
_TINY = 1e-20


# ------------------------------------------------------------------------------ helpers


def flatten_task_grads(per_task_grads: Any) -> jax.Array:
  """Pytree whose every leaf has a leading task axis T → G [T, P] (one raveled row per task)."""
  return jax.vmap(lambda tree: ravel_pytree(tree)[0])(per_task_grads)


def unflatten(direction: jax.Array, like: Any) -> Any:
  """A flat [P] vector → a pytree shaped like `like` (one task's gradient, no task axis)."""
  _, unravel = ravel_pytree(like)
  return unravel(direction)


def _leaf_gram(g: jax.Array) -> jax.Array:
  """[T, *shape] → [T, T]: the dot products of the rows, contracted over the parameter axes in
  place (no reshape, which could relayout a sharded leaf); float32, full precision."""
  g = g.astype(jnp.float32)
  axes = tuple(range(1, g.ndim))
  return jax.lax.dot_general(g, g, ((axes, axes), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


def task_gram(grads: Any) -> jax.Array:
  """A = G Gᵀ [T, T] of per-task gradients G ([T, P] or a tree of [T, ...] leaves), as the sum
  of the leaves' Grams: float32 at full precision (no TF32/bf16 passes on accelerators)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("task_gram needs at least one gradient leaf")
  return functools.reduce(jnp.add, [_leaf_gram(g) for g in leaves])


def gram(G: jax.Array) -> jax.Array:
  """A = G Gᵀ [T, T] of a [T, P] matrix (or a tree: `task_gram`)."""
  return task_gram(G)


def combine_tasks(weights: jax.Array, grads: Any) -> Any:
  """Σ_k weights_k · G_k leaf by leaf: the task axis contracted away, each leaf in its own dtype
  (and, under jit, its own sharding: the sum is local to every shard)."""
  w = weights.astype(jnp.float32)

  def one(g):
    out = jnp.tensordot(w, g.astype(jnp.float32), axes=(0, 0), precision=_HIGHEST)
    return out.astype(g.dtype)

  return jax.tree.map(one, grads)


def normalize_gram(A: jax.Array) -> jax.Array:
  """A / mean(diag A): the same minimisers, entries of order 1 (A itself when A = 0)."""
  scale = jnp.mean(jnp.diag(A))
  return A / jnp.where(scale > _TINY, scale, 1.0)


def project_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection onto {w ≥ 0, Σw = 1} (sort-based, Duchi et al. 2008)."""
  n = v.shape[0]
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u) - 1.0
  index = jnp.arange(1, n + 1, dtype=v.dtype)
  rho = jnp.max(jnp.where(u - css / index > 0, jnp.arange(n), 0))
  theta = css[rho] / (rho + 1).astype(v.dtype)
  return jnp.maximum(v - theta, 0.0)


def minimize_on_simplex(fun: Callable[[jax.Array], jax.Array], w0: jax.Array, *,
                        iters: int, polish_steps: int = 3) -> jax.Array:
  """argmin of a smooth convex `fun` over the probability simplex.

  Accelerated projected gradient (FISTA) with a backtracking Lipschitz estimate, so no
  step size has to be known (the CAGrad/IMGrad objectives have unbounded curvature near a
  zero min-norm point), and a monotone restart: a step that increases `fun` is rejected and
  the momentum reset, so the iterate kept is the best one visited. Then `polish_steps`
  Newton steps on the face the iterate lies on (`_polish_on_face`).
  """
  value_and_grad = jax.value_and_grad(fun)

  def step(_, carry):
    w, fw, y, t, lip = carry
    fy, gy = value_and_grad(y)
    # Projection onto the simplex ignores shifts along (1, …, 1): drop that component so
    # that a large but irrelevant gradient mean cannot cost precision in the projection.
    gy = gy - jnp.mean(gy)
    # Float32 slack: below it the sufficient-decrease test only compares rounding noise.
    slack = 1e-6 * (1.0 + jnp.abs(fy))

    def trial(lip):
      w_new = project_simplex(y - gy / lip)
      diff = w_new - y
      bound = fy + gy @ diff + 0.5 * lip * (diff @ diff) + slack
      f_new = fun(w_new)
      return w_new, f_new, ~(f_new <= bound)

    def grow(c):
      lip, _, _, _, n = c
      lip = 2.0 * lip
      return (lip, *trial(lip), n + 1)

    # Optimistic: let the estimate shrink again where the curvature drops, but never so far
    # that one step moves a coordinate by more than 2 (the simplex is smaller than that, and
    # a huge step would only cost float32 precision in the projection; on a flat objective
    # the estimate would otherwise shrink without bound).
    lip = jnp.maximum(0.5 * lip, jnp.maximum(jnp.max(jnp.abs(gy)) / 2.0, 1e-30))
    lip, w_new, f_new, _, _ = jax.lax.while_loop(
        lambda c: c[3] & (c[4] < 60), grow, (lip, *trial(lip), 0))
    better = f_new <= fw
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y_next = jnp.where(better, w_new + ((t - 1.0) / t_new) * (w_new - w), w)
    return (jnp.where(better, w_new, w), jnp.where(better, f_new, fw), y_next,
            jnp.where(better, t_new, 1.0), lip)

  w0 = w0.astype(jnp.float32)
  init = (w0, fun(w0), w0, jnp.ones((), jnp.float32), jnp.ones((), jnp.float32))
  w, fw = jax.lax.fori_loop(0, iters, step, init)[:2]
  polished = _polish_on_face(fun, w, steps=polish_steps)
  # Keep the polish unless it is worse beyond float32 noise (e.g. FISTA was not yet on the
  # optimal face, or the face's Hessian was singular and the Newton system failed).
  keep = jnp.all(jnp.isfinite(polished)) & (fun(polished) <= fw + 1e-7 * (1.0 + jnp.abs(fw)))
  return jnp.where(keep, polished, w)


def _polish_on_face(fun: Callable[[jax.Array], jax.Array], w: jax.Array, *,
                    steps: int) -> jax.Array:
  """Newton steps for `fun` restricted to the current face {w_k = 0 off the support, Σw = 1}.

  First-order methods reach the optimal face quickly but crawl along flat directions (an
  ill-conditioned Gram matrix), where float32 function values can no longer tell iterates
  apart; Newton on the face fixes those directions exactly. Steps are cut at the boundary
  (fraction to boundary), and a coordinate that reaches 0 leaves the support.
  """
  num_tasks = w.shape[0]
  grad_fn, hess_fn = jax.grad(fun), jax.hessian(fun)

  def step(_, w):
    support = w > 0
    both = support[:, None] & support[None, :]
    # Off the support: identity rows with a zero right-hand side, so those δ_k are 0.
    hess = jnp.where(both, hess_fn(w), jnp.eye(num_tasks, dtype=w.dtype))
    ones = support.astype(w.dtype)
    kkt = jnp.block([[hess, ones[:, None]], [ones[None, :], jnp.zeros((1, 1), w.dtype)]])
    rhs = jnp.concatenate([-jnp.where(support, grad_fn(w), 0.0), jnp.zeros((1,), w.dtype)])
    delta = jnp.where(support, jnp.linalg.solve(kkt, rhs)[:num_tasks], 0.0)
    shrinking = delta < 0
    to_boundary = jnp.where(shrinking, w / jnp.where(shrinking, -delta, 1.0), jnp.inf)
    t = jnp.minimum(1.0, jnp.min(to_boundary))
    blocking = (to_boundary <= t) & shrinking  # Exactly 0, not a rounding residue.
    new = jnp.where(blocking, 0.0, jnp.maximum(w + t * delta, 0.0))
    new = new / jnp.sum(new)
    return jnp.where(jnp.all(jnp.isfinite(new)), new, w)

  return jax.lax.fori_loop(0, steps, step, w)


def _uniform(num_tasks: int) -> jax.Array:
  return jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)


# --------------------------------------------------------------------------------- MGDA


def mgda_weights(A: jax.Array, *, iters: int = 50) -> jax.Array:
  """Simplex weights of the min-norm point of the hull: argmin_w wᵀAw."""
  return minimize_on_simplex(lambda w: w @ A @ w, _uniform(A.shape[0]), iters=iters)


def mgda_from_gram(A: jax.Array, *, iters: int = 50) -> jax.Array:
  """`mgda`'s weights from the Gram matrix A = G Gᵀ."""
  return mgda_weights(normalize_gram(A), iters=iters)


def mgda(G: Any, *, iters: int = 50) -> tuple[Any, jax.Array]:
  """MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of conv{g_1..g_T}.

  Solved by accelerated projected gradient on the simplex (in place of the Frank-Wolfe of
  the MGDA-UB release: it reaches the same point, with linear convergence when the
  gradients are independent). Returns (d = Σ w_k g_k, w).
  """
  w = mgda_from_gram(task_gram(G), iters=iters)
  return combine_tasks(w, G), w


# ------------------------------------------------------------------------------- CAGrad


def cagrad_objective(w: jax.Array, A: jax.Array, c: float) -> jax.Array:
  """CAGrad's dual: g_wᵀg0 + c·‖g0‖·‖g_w‖ with g0 the mean gradient (Liu et al. 2021, eq. 4)."""
  num_tasks = A.shape[0]
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(A), 0.0))
  gw_g0 = w @ A @ jnp.full((num_tasks,), 1.0 / num_tasks, A.dtype)
  gw_norm = jnp.sqrt(jnp.maximum(w @ A @ w, 0.0) + _SQRT_EPS)
  return gw_g0 + c * g0_norm * gw_norm


def _conflict_averse(A: jax.Array, w: jax.Array, c: float) -> jax.Array:
  """Task weights of d = (g0 + c‖g0‖/‖g_w‖ · g_w) / (1 + c²)."""
  num_tasks = A.shape[0]
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(A), 0.0))
  gw_norm = jnp.sqrt(jnp.maximum(w @ A @ w, 0.0))
  lam = c * g0_norm / jnp.maximum(gw_norm, 1e-8 * jnp.maximum(g0_norm, _TINY))
  lam = jnp.where(gw_norm > 0, lam, 0.0)
  return (_uniform(num_tasks) + lam * w) / (1.0 + c * c)


def cagrad_from_gram(A: jax.Array, *, c: float = 0.4, iters: int = 200) -> jax.Array:
  """`cagrad`'s weights from the Gram matrix A = G Gᵀ."""
  A = normalize_gram(A)
  w = minimize_on_simplex(lambda v: cagrad_objective(v, A, c), _uniform(A.shape[0]),
                          iters=iters)
  return _conflict_averse(A, w, c)


def cagrad(G: Any, *, c: float = 0.4, iters: int = 200) -> tuple[Any, jax.Array]:
  """CAGrad (Liu et al., NeurIPS 2021): the conflict-averse direction.

  max_d min_k g_kᵀd  s.t. ‖d − g0‖ ≤ c‖g0‖, solved through its dual over the simplex:
  w* = argmin_w g_wᵀg0 + c‖g0‖‖g_w‖ (`cagrad_objective`), then
  d = g0 + (c‖g0‖ / ‖g_w*‖)·g_w*, rescaled by 1/(1 + c²) as the released code does.
  Returns (d, weights) with d = weights @ G.
  """
  weights = cagrad_from_gram(task_gram(G), c=c, iters=iters)
  return combine_tasks(weights, G), weights


# ------------------------------------------------------------------------------- IMGrad

IMGRAD_OFFSET = 1.5


def imgrad_cos(A: jax.Array, *, mgda_iters: int = 50) -> jax.Array:
  """cos θ between the mean gradient g0 and the MGDA min-norm direction g_m (0 if either is 0).

  g_m satisfies g_mᵀg_k ≥ ‖g_m‖² for every k, so g_mᵀg0 ≥ 0 and cos θ ∈ [0, 1].
  """
  num_tasks = A.shape[0]
  wm = mgda_weights(A, iters=mgda_iters)
  dot = wm @ A @ jnp.full((num_tasks,), 1.0 / num_tasks, A.dtype)
  norms = jnp.sqrt(jnp.maximum(wm @ A @ wm, 0.0) * jnp.maximum(jnp.mean(A), 0.0))
  return jnp.clip(jnp.where(norms > _TINY, dot / jnp.where(norms > _TINY, norms, 1.0), 0.0),
                  0.0, 1.0)


def imgrad_objective(w: jax.Array, A: jax.Array, alpha: float, cos: jax.Array,
                     offset: float = IMGRAD_OFFSET) -> jax.Array:
  """IMGrad's objective: (offset − cos θ)·g_wᵀg0 + cos θ·α‖g0‖·‖g_w‖ (see `imgrad`)."""
  num_tasks = A.shape[0]
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(A), 0.0))
  gw_g0 = w @ A @ jnp.full((num_tasks,), 1.0 / num_tasks, A.dtype)
  gw_norm = jnp.sqrt(jnp.maximum(w @ A @ w, 0.0) + _SQRT_EPS)
  return (offset - cos) * gw_g0 + cos * alpha * g0_norm * gw_norm


def imgrad_from_gram(A: jax.Array, *, alpha: float = 0.8, offset: float = IMGRAD_OFFSET,
                     iters: int = 200, mgda_iters: int = 50) -> jax.Array:
  """`imgrad`'s weights from the Gram matrix A = G Gᵀ."""
  A = normalize_gram(A)
  cos = imgrad_cos(A, mgda_iters=mgda_iters)
  w = minimize_on_simplex(lambda v: imgrad_objective(v, A, alpha, cos, offset),
                          _uniform(A.shape[0]), iters=iters)
  return _conflict_averse(A, w, alpha)


def imgrad(G: Any, *, alpha: float = 0.8, offset: float = IMGRAD_OFFSET,
           iters: int = 200, mgda_iters: int = 50) -> tuple[Any, jax.Array]:
  """IMGrad (Zhou, Liu, Zhao, Gong, IJCAI 2025, arXiv 2503.08006): imbalance-sensitive CAGrad.

  Steps: g0 = mean gradient; g_m = MGDA min-norm direction; cos θ = cos(g0, g_m), a measure
  of imbalance (g_m leans towards the small gradients, away from g0, when one task
  dominates); then

      w* = argmin_{w ∈ simplex}  (offset − cos θ)·g_wᵀg0 + cos θ·c·‖g_w‖,   c = α‖g0‖,
      d  = (g0 + (c / ‖g_w*‖)·g_w*) / (1 + α²).

  Which objective, and why. This is the objective of the authors' released code
  (github.com/zzpustc/IMGrad, `imgrad` in nyuv2/utils.py, the general T-task version) with
  its constant offset = 1.5, and the 1/(1 + α²) rescaling its trainers select
  (`rescale=1`). The paper's own equation could not be read for this implementation (only
  its appendix was reachable); as described there and in the issue it balances the same
  two CAGrad terms through cos θ, and it differs slightly from the code. We follow the code
  because it is what produced the published numbers, and expose `offset` so a (1 − cos θ)
  weighting of the linear term can be chosen (offset=1.0; the problem stays convex since
  both coefficients are ≥ 0). With cos θ = 1 (balanced: g_m ∥ g0, e.g. identical
  gradients) and offset = 2 it is exactly CAGrad's objective with c = α; as the imbalance
  grows (cos θ → 0) the norm term fades and the linear term, which pulls w towards the
  tasks least aligned with g0, takes over.
  The CityScapes script of the release applies (1.5 − cos θ) to only part of g_wᵀg0 (an
  operator-precedence slip in its two-task closed form); we do not reproduce that.
  The minimisation is done in JAX (FISTA on the simplex) instead of scipy's SLSQP.

  Returns (d, weights) with d = weights @ G.
  """
  weights = imgrad_from_gram(task_gram(G), alpha=alpha, offset=offset, iters=iters,
                             mgda_iters=mgda_iters)
  return combine_tasks(weights, G), weights


# ------------------------------------------------------------------------------- PCGrad


def pcgrad_from_gram(A: jax.Array, *, rng: jax.Array, reduction: str = "sum") -> jax.Array:
  """`pcgrad`'s weights from the Gram matrix A = G Gᵀ (not normalised: the projections'
  coefficients g_i'·g_j / ‖g_j‖² are ratios of its entries)."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"pcgrad reduction must be 'sum' or 'mean', got {reduction!r}")
  num_tasks = A.shape[0]
  diag = jnp.diag(A)
  keys = jax.random.split(rng, num_tasks)
  orders = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)

  def surgery(i, order):
    def body(s, coef):
      j = order[s]
      dot = coef @ A[:, j]  # g_i'·g_j
      project = (j != i) & (dot < 0) & (diag[j] > 0)
      step = jnp.where(project, dot / jnp.where(diag[j] > 0, diag[j], 1.0), 0.0)
      return coef.at[j].add(-step)

    return jax.lax.fori_loop(0, num_tasks, body, jax.nn.one_hot(i, num_tasks,
                                                                 dtype=jnp.float32))

  coefs = jax.vmap(surgery)(jnp.arange(num_tasks), orders)  # [T, T]: row i = g_i' in G-basis
  weights = jnp.sum(coefs, axis=0)
  if reduction == "mean":
    weights = weights / num_tasks
  return weights


def pcgrad(G: Any, *, rng: jax.Array, reduction: str = "sum") -> tuple[Any, jax.Array]:
  """PCGrad (Yu et al., NeurIPS 2020): gradient surgery.

  For every task i, in an independent random order of the other tasks j: if the current
  g_i' conflicts with the ORIGINAL g_j (g_i'·g_j < 0), project it onto g_j's normal plane,
  g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²)·g_j. The result is Σ_i g_i' (`reduction="sum"`, as in
  the authors' release) or its mean (`"mean"`, as in the CAGrad/IMGrad repositories).
  Zero gradients are never projected onto. Runs entirely on the Gram matrix: each g_i' is
  tracked as a coefficient vector over the original rows. Returns (d, weights).
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"pcgrad reduction must be 'sum' or 'mean', got {reduction!r}")
  weights = pcgrad_from_gram(task_gram(G), rng=rng, reduction=reduction)
  return combine_tasks(weights, G), weights


# ----------------------------------------------------------------------------- Nash-MTL


def nash_alpha(A: jax.Array, *, iters: int = 20,
               tol: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """Solves A α = 1/α, α > 0, by damped Newton; returns (α, converged).

  The solution is the unique minimiser of f(α) = ½αᵀAα − Σ log α_k, which is
  self-concordant, so Newton's method damped by 1/(1 + λ) (λ the Newton decrement) stays in
  α > 0 and converges from any start, quadratically once λ < 1/4 (full steps from there).
  It starts from α_k ∝ 1/‖g_k‖, the exact answer for orthogonal gradients, scaled optimally.
  `converged`: finite, positive, and max_k |α_k (Aα)_k − 1| ≤ tol. No solution exists when
  A is singular on the positive orthant (e.g. a zero gradient row): then not converged.
  """
  num_tasks = A.shape[0]
  diag = jnp.diag(A)
  start = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
  quad = start @ A @ start
  start = start * jnp.sqrt(num_tasks / jnp.where(quad > 0, quad, 1.0))

  def step(_, alpha):
    grad = A @ alpha - 1.0 / alpha
    hess = A + jnp.diag(1.0 / (alpha * alpha))
    delta = -jnp.linalg.solve(hess, grad)
    decrement = jnp.sqrt(jnp.maximum(-(grad @ delta), 0.0))
    t = jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
    new = alpha + t * delta
    # Rounding can still push a coordinate to ≤ 0 on a near-singular A; stay put then.
    ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
    return jnp.where(ok, new, alpha)

  alpha = jax.lax.fori_loop(0, iters, step, start)
  residual = jnp.max(jnp.abs(alpha * (A @ alpha) - 1.0))
  converged = jnp.all(jnp.isfinite(alpha)) & jnp.all(alpha > 0) & (residual <= tol)
  return alpha, converged


def nash_from_gram(A: jax.Array, *, iters: int = 20, prev_alpha: jax.Array | None = None,
                   normalize: bool = True, tol: float = 1e-4) -> jax.Array:
  """`nash`'s α from the Gram matrix A = G Gᵀ."""
  num_tasks = A.shape[0]
  if normalize:
    norm = jnp.linalg.norm(A)
    A = A / jnp.where(norm > _TINY, norm, 1.0)
  alpha, converged = nash_alpha(A, iters=iters, tol=tol)
  fallback = (jnp.ones((num_tasks,), jnp.float32) if prev_alpha is None
              else jnp.asarray(prev_alpha, jnp.float32))
  return jnp.where(converged, alpha, fallback)


def nash(G: Any, *, iters: int = 20, prev_alpha: jax.Array | None = None,
         normalize: bool = True, tol: float = 1e-4) -> tuple[Any, jax.Array]:
  """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution d = Gᵀα, A α = 1/α.

  Solved by at most `iters` damped Newton steps (`nash_alpha`) instead of the paper's
  sequence of convex programs. With `normalize` (default, as the official release) the
  system is solved for A/‖A‖_F, so ‖d‖ scales with the gradients (‖d‖² = T·‖A‖_F); with
  `normalize=False` exactly GGᵀα = 1/α (then ‖d‖² = T whatever the gradients). On failure
  (non-finite or not converged) α is `prev_alpha` (default: ones, the release's initial α),
  as the release keeps the previous step's α. Returns (d, α): pass α as the next call's
  `prev_alpha`.
  """
  alpha = nash_from_gram(task_gram(G), iters=iters, prev_alpha=prev_alpha, normalize=normalize,
                         tol=tol)
  return combine_tasks(alpha, G), alpha


# ----------------------------------------------------------------------------- GradDrop


def graddrop(G: Any, *, rng: jax.Array, leak: float = 0.0) -> tuple[Any, jax.Array]:
  """GradDrop (Chen et al., NeurIPS 2020, "Just Pick a Sign"): sign-consistent gradient dropout.

  Coordinate by coordinate p of the shared parameters, the gradient sign purity

      P_p = ½ · (1 + Σ_k G_kp / Σ_k |G_kp|)          (½ where every G_kp is 0)

  is the probability of keeping the positive side. One uniform draw U_p ∈ [0, 1) per coordinate,
  shared by the tasks, picks the side: task k's component is kept when G_kp > 0 and U_p < P_p, or
  G_kp < 0 and U_p ≥ P_p (the paper's mask; its ties have probability 0). The direction is

      d_p = Σ_k (ℓ + (1 − ℓ)·M_kp) · G_kp,           ℓ = `leak`,

  so leak=0 is GradDrop and leak=1 the plain sum; the paper's per-task leaks are one shared
  value here. Where every task's component has the same sign, P_p is 1 or 0 and nothing is
  dropped: if the tasks never conflict, d = Σ_k g_k.

  Where it acts. The paper applies the mask to the gradients with respect to a shared
  activation layer, summed over the batch; here, as for the other methods of this module, it
  acts on G, i.e. each coordinate of the shared parameters is one unit. Everything but the
  per-task masses is elementwise, so a tree is masked leaf by leaf (`graddrop_uniforms` gives
  the draws: one key per leaf), and sharded leaves stay sharded.

  Weights. The mask differs from coordinate to coordinate, so d is not weights @ G. The returned
  weights are the fraction of each task's gradient mass that enters d,

      w_k = Σ_p |(ℓ + (1 − ℓ)·M_kp)·G_kp| / Σ_p |G_kp|    (1 for a zero gradient: nothing dropped),

  in [0, 1]; d == weights @ G exactly when no component is dropped (e.g. no conflict, leak=1).
  The direction is a sum over tasks, on the scale of a summed loss like `pcgrad`'s.

  Args:
    G: [T, P] per-task gradients, or a tree of [T, ...] leaves.
    rng: a JAX random key; the mask is a deterministic function of (G, rng).
    leak: the fraction of every task's gradient that passes unmasked, in [0, 1] (static).

  Returns:
    (direction shaped like one row of G, each leaf in its dtype; weights [T] float32).
  """
  return graddrop_scaled(G, None, rng=rng, leak=leak)


def graddrop_uniforms(rng: jax.Array, grads: Any) -> Any:
  """GradDrop's draws U ∈ [0, 1): a tree shaped like one task's gradient. A single leaf (a
  [T, P] matrix) draws from `rng` itself; leaf i of a larger tree from fold_in(rng, i)."""
  leaves, treedef = jax.tree.flatten(grads)
  keys = ([rng] if len(leaves) == 1
          else [jax.random.fold_in(rng, i) for i in range(len(leaves))])
  return treedef.unflatten([jax.random.uniform(k, g.shape[1:], jnp.float32)
                            for k, g in zip(keys, leaves, strict=True)])


def _graddrop_leaf(g: jax.Array, u: jax.Array, leak: float,
                   row_scale: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One leaf [T, ...]: (its kept sum [...], each task's kept mass [T], its mass [T])."""
  dtype = g.dtype
  g = g.astype(jnp.float32)
  if row_scale is not None:
    g = g * row_scale.astype(jnp.float32).reshape((-1,) + (1,) * (g.ndim - 1))
  positive = jnp.sum(jnp.maximum(g, 0.0), axis=0)
  negative = jnp.sum(jnp.maximum(-g, 0.0), axis=0)
  mass = positive + negative
  # P = ½(1 + Σg / Σ|g|) written as Σg⁺ / (Σg⁺ + Σg⁻): the same number, but exactly 1 (or 0)
  # where no component is negative (or positive), so an agreeing column is never dropped.
  purity = jnp.where(mass > 0, positive / jnp.where(mass > 0, mass, 1.0), 0.5)
  keep_positive = (u < purity)[None]
  mask = jnp.where(g > 0, keep_positive, (g < 0) & ~keep_positive)
  kept = jnp.where(mask, g, 0.0)
  if leak:
    kept = leak * g + (1.0 - leak) * kept
  axes = tuple(range(1, g.ndim))
  return (jnp.sum(kept, axis=0).astype(dtype), jnp.sum(jnp.abs(kept), axis=axes),
          jnp.sum(jnp.abs(g), axis=axes))


def graddrop_scaled(G: Any, row_scale: jax.Array | None, *, rng: jax.Array,
                    leak: float = 0.0) -> tuple[Any, jax.Array]:
  """`graddrop` of the rows of G scaled by `row_scale` [T] (None: 1), the scaling fused into
  the masking, so no scaled copy of G is kept."""
  if not 0.0 <= leak <= 1.0:
    raise ValueError(f"graddrop leak must be in [0, 1], got {leak}")
  leaves, treedef = jax.tree.flatten(G)
  uniforms = jax.tree.leaves(graddrop_uniforms(rng, G))
  parts = [_graddrop_leaf(g, u, leak, row_scale) for g, u in zip(leaves, uniforms, strict=True)]
  kept_mass = functools.reduce(jnp.add, [p[1] for p in parts])
  task_mass = functools.reduce(jnp.add, [p[2] for p in parts])
  weights = jnp.where(task_mass > 0, kept_mass / jnp.where(task_mass > 0, task_mass, 1.0), 1.0)
  return treedef.unflatten([p[0] for p in parts]), weights


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, Callable[..., tuple[Any, jax.Array]]] = {
    "imgrad": imgrad,
    "cagrad": cagrad,
    "pcgrad": pcgrad,  # needs rng=
    "mgda": mgda,
    "nash": nash,  # takes prev_alpha= (its previous returned weights)
    "graddrop": graddrop,  # needs rng=; its weights are kept-mass fractions, not coefficients
}

# The linear methods as A = G Gᵀ [T, T] → weights [T] (direction = combine_tasks(weights, G)),
# with the options of their METHODS entry: what a caller that forms G's Gram itself (the train
# step, over a sharded tree) solves. GradDrop is not linear: `graddrop_scaled`.
FROM_GRAM: dict[str, Callable[..., jax.Array]] = {
    "imgrad": imgrad_from_gram,
    "cagrad": cagrad_from_gram,
    "pcgrad": pcgrad_from_gram,
    "mgda": mgda_from_gram,
    "nash": nash_from_gram,
}
