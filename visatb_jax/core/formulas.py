"""The λ formulas on arrays (docs/method.md §3–5, §14), for jax or float64 numpy.

Every function takes `xp` (jnp or numpy) where both are used: `balancing` runs them on the jax
arrays of one computation (jittable, differentiable, masked on safe denominators), `bootstrap`
on thousands of resamples at once in float64 numpy. One body per formula, so the bootstrap's λ
is the λ of `balancing.compute_lambda` by construction.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

# A contribution or difficulty denominator must exceed this fraction of the magnitude of the scores
# it is made of: a smaller one is noise, and dividing by it would give meaningless huge weights.
MIN_RELATIVE_DENOMINATOR = 1e-4
Array = Any


def gain_valid(own_diag: Any, ref: Any, xp: Any) -> Any:
  """Per receiver j: is the own-data gain V_j(own_j) − V_j(ref) clearly positive?

  Clearly positive means above `MIN_RELATIVE_DENOMINATOR` × the larger of |V_j(own_j)|, |V_j(ref)|
  (a gain <= 0 always fails, since that bound is >= 0).
  """
  bound = MIN_RELATIVE_DENOMINATOR * xp.maximum(xp.abs(own_diag), xp.abs(ref))
  return (own_diag - ref) > bound


def difficulty_valid(num: Any, den: Any) -> Any:
  """Per unit i: is the difficulty denominator > 0 and not too close to 0 next to the numerator?"""
  return den > MIN_RELATIVE_DENOMINATOR * abs(num)


def contributions(own: Array, ref: Array, valid: Array | None = None, xp: Any = jnp) -> Array:
  """C[i, j] = (own[i, j] − ref[j]) / (own[j, j] − ref[j]), with C[j, j] = 1 exactly.

  With a `valid` mask [N], a receiver j with valid[j] False gets C[i, j] = 0 for i ≠ j; its
  denominator is replaced by 1 before dividing, so that neither the values nor the gradients of
  the branch not taken hold inf/NaN. Leading batch axes are allowed (own [..., N, N], ref and
  valid [..., N]), and `xp` may be numpy (the bootstrap runs these formulas in float64 numpy).
  """
  gain = own - ref[..., None, :]
  den = xp.diagonal(gain, axis1=-2, axis2=-1)
  if valid is None:
    c = gain / den[..., None, :]
  else:
    safe = xp.where(valid, den, xp.ones_like(den))
    c = xp.where(valid[..., None, :], gain / safe[..., None, :], xp.zeros_like(gain))
  # x / x is 1 already; `where` makes it exact and keeps its gradient exactly 0.
  return xp.where(xp.eye(own.shape[-1], dtype=bool), xp.ones_like(c), c)


def difficulty(num: Array, den: Array, valid: Array | None = None, xp: Any = jnp) -> Array:
  """D = 1 − num / den; with a `valid` mask, D = 0 where it is False (safe denominator as in C).

  Elementwise: any leading batch axes, `xp` jnp or numpy as in `contributions`.
  """
  if valid is None:
    return 1.0 - num / den
  safe = xp.where(valid, den, xp.ones_like(den))
  return xp.where(valid, 1.0 - num / safe, xp.zeros_like(num))


def outward_inward_of(c: Array, dropped: Array | None = None,
                    xp: Any = jnp) -> tuple[Array, Array]:
  """`outward_inward` without checks; C may have leading batch axes ([..., N, N]), `xp` numpy."""
  n = c.shape[-1]
  off = xp.where(xp.eye(n, dtype=bool), xp.zeros_like(c), c)
  if dropped is None:
    return off.sum(axis=-1) / (n - 1), off.sum(axis=-2) / (n - 1)
  kept = ~dropped
  # Number of kept receivers j ≠ i for each contributor i; max(·, 1) keeps 0/0 out (the sum is
  # 0 then, so C_out[i] = 0).
  count = kept.sum() - kept.astype(int)
  c_out = xp.where(kept, off, xp.zeros_like(off)).sum(axis=-1)
  c_out = c_out / xp.maximum(count, 1).astype(c_out.dtype)
  c_in = off.sum(axis=-2) / (n - 1)
  return c_out, xp.where(kept, c_in, xp.zeros_like(c_in))


def shrink(x: Any, sd: Any, xp: Any = jnp) -> tuple[Any, Any]:
  """(x̃, factor) of positive-part shrinkage of x [..., N] toward its mean over the last axis.

  factor = max(0, 1 − sd²/dev²) = max(0, 1 − 1/z²), 1 where sd = 0 (no evidence of noise: no
  shrinkage) and 0 where dev = 0 < sd. The divisions use a safe denominator (1 where dev = 0), so
  neither the values nor the gradients of the branch not taken hold inf/NaN. x̃ is x itself where
  the factor is 1 and the mean itself where it is 0, exactly. `sd` broadcasts against x; `xp`
  may be numpy (the bootstrap shrinks every resample at once in float64).
  """
  # The mean over the units with evidence (finite sd): a unit without any (sd = inf) is put at
  # the others' mean, not at a mean that its own uninformative value pulls.
  sd = xp.broadcast_to(sd, x.shape)
  w = xp.isfinite(sd).astype(x.dtype)
  n = w.sum(axis=-1, keepdims=True)
  mean = xp.where(n > 0, (x * w).sum(axis=-1, keepdims=True) / xp.where(n > 0, n, 1.0),
                  x.mean(axis=-1, keepdims=True))
  dev = x - mean
  dev2, sd2 = dev * dev, sd * sd
  nonzero = dev2 > 0
  ratio = sd2 / xp.where(nonzero, dev2, xp.ones_like(dev2))
  factor = xp.where(nonzero, xp.maximum(1.0 - ratio, 0.0), xp.zeros_like(ratio))
  factor = xp.where(sd2 > 0, factor, xp.ones_like(factor))
  shrunk = xp.where(factor == 0, xp.broadcast_to(mean, dev.shape), x - dev * (1.0 - factor))
  return shrunk, factor


AUTO_GRID_POINTS = 128


AUTO_RELATIVE_TOLERANCE = 1e-6


def np_components(x: np.ndarray, t: np.ndarray) -> np.ndarray:
  """(λ_out, λ_in, λ_D) [R, 3, N] in float64 numpy from x [R, 3, N] = (C_out, C_in, D), T [R].

  The formulas of `lambda_components`, for R rows at once.
  """
  sign = np.array([1.0, -1.0, 1.0])
  z = sign[:, None] * x / t[:, None, None]
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return x.shape[-1] * z / z.sum(axis=-1, keepdims=True)


def np_weights(x: np.ndarray, t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Final weights λ [R, N] in float64 from x [R, 3, N] = (C_out, C_in, D) and T [R]."""
  components = np_components(x, t)
  # Written out (not `alpha @ components`) so that every row is computed by the same operations.
  return alpha[0] * components[:, 0] + alpha[1] * components[:, 1] + alpha[2] * components[:, 2]


def auto_search(x: np.ndarray, alpha: np.ndarray, t_range: tuple[float, float],
                 bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """The search of `auto_temperature` for R rows at once: (T [R], feasible [R]).

  Row by row it takes exactly the steps of a scalar search: the first feasible point of the log
  grid, then bisection (in log scale) of the step before it until its relative width is at most
  `AUTO_RELATIVE_TOLERANCE`. Rows with no feasible grid point get T = t_range[1] and False.
  The loops run over the grid points and the bisection steps, never over the rows.
  """
  t_lo, t_hi = t_range
  w_lo, w_hi = bounds
  rows = x.shape[0]

  def feasible(ix: np.ndarray, t: np.ndarray) -> np.ndarray:
    w = np_weights(x[ix], t, alpha)
    return np.all((w >= w_lo) & (w <= w_hi), axis=-1)

  grid = np.geomspace(t_lo, t_hi, AUTO_GRID_POINTS)
  first = np.full(rows, -1)  # index of the first feasible grid point, -1 while none
  for k, t in enumerate(grid):
    todo = np.flatnonzero(first < 0)
    if todo.size == 0:
      break
    ok = feasible(todo, np.full(todo.size, float(t)))
    first[todo[ok]] = k
  found = first >= 0
  out = np.full(rows, float(t_hi))
  out[found & (first == 0)] = t_lo
  bisect = np.flatnonzero(found & (first > 0))
  lo, hi = grid[first[bisect] - 1].astype(np.float64), grid[first[bisect]].astype(np.float64)
  # Invariant: lo infeasible, hi feasible.
  active = hi - lo > AUTO_RELATIVE_TOLERANCE * hi
  while active.any():
    ix = np.flatnonzero(active)
    mid = np.sqrt(lo[ix] * hi[ix])
    ok = feasible(bisect[ix], mid)
    hi[ix[ok]] = mid[ok]
    lo[ix[~ok]] = mid[~ok]
    active[ix] = hi[ix] - lo[ix] > AUTO_RELATIVE_TOLERANCE * hi[ix]
  out[bisect] = hi
  return out, found
