"""Tests of the gradient-combination methods (visatb_jax/gradmtl.py) on fixed gradient matrices.

References: closed forms where they exist, otherwise scipy's SLSQP on the simplex in float64.
Every method is jitted once per shape: the SLSQP and degenerate cases share [4, 16].
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from visatb_jax.core import gradmtl

T, P = 4, 16
JIT = {name: jax.jit(fn) for name, fn in gradmtl.METHODS.items()}
_nash_raw = jax.jit(lambda G: gradmtl.nash(G, normalize=False))


def _fixed_G(seed):
  """Random [T, P] gradients with unequal norms (an imbalanced, partly conflicting set)."""
  rng = np.random.default_rng(seed)
  G = rng.normal(size=(T, P)) * np.array([1.0, 3.0, 0.3, 1.0])[:, None]
  return G.astype(np.float32)


def _slsqp(objective, num_tasks, seed=0):
  """Best of a few SLSQP runs over the simplex (float64, tight tolerance)."""
  rng = np.random.default_rng(seed)
  starts = [np.full(num_tasks, 1 / num_tasks)] + [rng.dirichlet(np.ones(num_tasks))
                                                  for _ in range(3)]
  best = None
  for x0 in starts:
    res = minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * num_tasks,
                   constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                   options={"ftol": 1e-14, "maxiter": 2000})
    # Status 8 ("positive directional derivative in line search") is SLSQP at its
    # precision floor, which a tolerance this tight reaches at the optimum.
    assert res.status in (0, 8), res.message
    if best is None or res.fun < best.fun:
      best = res
  return best.x, best.fun


def _dual_w(weights, scale):
  """Recovers the simplex w* from the direction weights (1/T + λ·w*) / (1 + scale²)."""
  lam_w = np.asarray(weights, np.float64) * (1 + scale**2) - 1 / len(weights)
  return lam_w / lam_w.sum()


def _conflict_averse_direction(G, w, scale):
  g0, gw = G.mean(0), w @ G
  return (g0 + scale * np.linalg.norm(g0) / np.linalg.norm(gw) * gw) / (1 + scale**2)


def test_registry():
  assert set(gradmtl.METHODS) == {"imgrad", "cagrad", "pcgrad", "mgda", "nash", "graddrop"}


def test_flatten_and_unflatten_round_trip():
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32),
          "b": [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)]}
  G = gradmtl.flatten_task_grads(tree)
  assert G.shape == (3, 14)
  like = jax.tree.map(lambda x: x[0], tree)
  for k in range(3):
    np.testing.assert_array_equal(G[k], np.concatenate([tree["a"][k].ravel(), tree["b"][0][k]]))
    back = gradmtl.unflatten(G[k], like)
    jax.tree.map(lambda x, y, k=k: np.testing.assert_array_equal(x, y[k]), back, tree)


def test_mgda_two_tasks_closed_form():
  mgda = jax.jit(gradmtl.mgda)
  pairs = [([1.0, 0.0, 0.0], [0.0, 2.0, 0.0]),     # orthogonal
           ([1.0, 0.0, 0.0], [-1.0, 0.5, 0.0]),    # conflicting
           ([1.0, 0.0, 0.0], [2.0, 0.0, 0.0]),     # parallel: w1 clipped to 1
           ([3.0, 1.0, -2.0], [-0.5, 2.0, 1.0])]
  for g1, g2 in pairs:
    g1, g2 = np.asarray(g1), np.asarray(g2)
    w1 = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    d, w = mgda(jnp.asarray(np.stack([g1, g2]), jnp.float32))
    np.testing.assert_allclose(w, [w1, 1 - w1], atol=1e-5)
    np.testing.assert_allclose(d, w1 * g1 + (1 - w1) * g2, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_matches_slsqp(seed):
  G = _fixed_G(seed)
  A = G.astype(np.float64) @ G.T.astype(np.float64)
  w_ref, f_ref = _slsqp(lambda x: x @ A @ x, T)
  d, w = JIT["mgda"](jnp.asarray(G))
  w = np.asarray(w, np.float64)
  np.testing.assert_allclose(w, w_ref, atol=1e-3)
  np.testing.assert_allclose(w @ A @ w, f_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d, w @ G, rtol=1e-5, atol=1e-6)
  # Optimality: the min-norm point has g_k·d ≥ ‖d‖² for every task.
  assert np.all(G @ np.asarray(d) >= np.sum(np.asarray(d) ** 2) * (1 - 1e-4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cagrad_matches_slsqp(seed):
  c = 0.4
  G = _fixed_G(seed).astype(np.float64)
  A, g0_norm = G @ G.T, np.linalg.norm(G.mean(0))

  def objective(x):  # g_wᵀg0 + c‖g0‖‖g_w‖
    return x @ A @ np.full(T, 1 / T) + c * g0_norm * np.sqrt(x @ A @ x)

  w_ref, f_ref = _slsqp(objective, T)
  d, weights = JIT["cagrad"](jnp.asarray(G, jnp.float32))
  w = _dual_w(weights, c)
  np.testing.assert_allclose(w, w_ref, atol=1e-3)
  np.testing.assert_allclose(objective(w), f_ref, atol=1e-5)
  np.testing.assert_allclose(d, _conflict_averse_direction(G, w_ref, c), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imgrad_matches_slsqp(seed):
  alpha = 0.8
  G = _fixed_G(seed).astype(np.float64)
  A, g0 = G @ G.T, G.mean(0)
  wm, _ = _slsqp(lambda x: x @ A @ x, T)
  gm = wm @ G
  cos = g0 @ gm / (np.linalg.norm(g0) * np.linalg.norm(gm))
  assert 0 < cos < 1  # the fixed G are imbalanced enough for the imbalance term to matter

  def objective(x):  # (1.5 − cos θ)·g_wᵀg0 + cos θ·α‖g0‖·‖g_w‖, the released code's form
    return ((1.5 - cos) * (x @ A @ np.full(T, 1 / T))
            + cos * alpha * np.linalg.norm(g0) * np.sqrt(x @ A @ x))

  w_ref, f_ref = _slsqp(objective, T)
  d, weights = JIT["imgrad"](jnp.asarray(G, jnp.float32))
  w = _dual_w(weights, alpha)
  np.testing.assert_allclose(w, w_ref, atol=1e-3)
  np.testing.assert_allclose(objective(w), f_ref, atol=1e-5)
  np.testing.assert_allclose(d, _conflict_averse_direction(G, w_ref, alpha), rtol=1e-3,
                             atol=1e-4)


def test_imgrad_objective_reduces_to_cagrad():
  A = jnp.asarray(_fixed_G(0) @ _fixed_G(0).T)
  w = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(gradmtl.imgrad_objective(w, A, 0.4, 1.0, offset=2.0),
                             gradmtl.cagrad_objective(w, A, 0.4), rtol=1e-6)


def test_pcgrad_conflicting_pair():
  pcgrad = jax.jit(gradmtl.pcgrad, static_argnames="reduction")
  g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # g1·g2 = −1
  G = jnp.asarray(np.stack([g1, g2]), jnp.float32)
  d, w = pcgrad(G, rng=jax.random.key(0))
  # g1' = g1 + ½g2 = (½, ½) ⟂ g2;  g2' = g2 + g1 = (0, 1) ⟂ g1.
  g1p, g2p = np.array([0.5, 0.5]), np.array([0.0, 1.0])
  assert g1p @ g2 == 0 and g2p @ g1 == 0
  np.testing.assert_allclose(d, g1p + g2p, atol=1e-6)
  np.testing.assert_allclose(w, [2.0, 1.5], atol=1e-6)  # (g1 + ½g2) + (g2 + g1)
  d_mean, _ = pcgrad(G, rng=jax.random.key(0), reduction="mean")
  np.testing.assert_allclose(d_mean, (g1p + g2p) / 2, atol=1e-6)


def test_pcgrad_non_conflicting_pair_is_plain_sum():
  G = np.array([[1.0, 0.5], [0.5, 1.0]], np.float32)
  d, w = jax.jit(gradmtl.pcgrad)(jnp.asarray(G), rng=jax.random.key(0))
  np.testing.assert_allclose(d, G.sum(0), atol=1e-6)
  np.testing.assert_array_equal(w, [1.0, 1.0])


def _pcgrad_reference(G, orders):
  """Yu et al.'s loop: each g_i projected, in the given order, onto the original g_j."""
  out = []
  for i, order in enumerate(orders):
    g = G[i].copy()
    for j in order:
      dot = g @ G[j]
      if dot < 0:
        g -= dot / (G[j] @ G[j]) * G[j]
    out.append(g)
  return np.sum(out, 0)


def test_pcgrad_random_order_three_tasks():
  G = np.array([[1.0, 0.0, 0.0], [-0.8, 1.0, 0.0], [-0.5, -0.9, 1.0]])
  others = [[j for j in range(3) if j != i] for i in range(3)]
  candidates = [_pcgrad_reference(G, orders) for orders in
                itertools.product(*[list(itertools.permutations(o)) for o in others])]
  pcgrad = jax.jit(gradmtl.pcgrad)
  results = set()
  for seed in range(8):
    d = np.asarray(pcgrad(jnp.asarray(G, jnp.float32), rng=jax.random.key(seed))[0])
    # Each result is Yu et al.'s for some order of the other tasks.
    assert min(np.abs(d - c).max() for c in candidates) < 1e-5
    results.add(tuple(np.round(d, 4)))
  assert len(results) > 1  # the order really is random (and it matters for this G)


def test_nash_fixed_point():
  G = _fixed_G(3)
  A = G.astype(np.float64) @ G.T.astype(np.float64)
  d, alpha = _nash_raw(jnp.asarray(G))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(alpha > 0)
  np.testing.assert_allclose(A @ alpha, 1 / alpha, rtol=1e-3)
  np.testing.assert_allclose(d, alpha @ G, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.sum(np.asarray(d, np.float64) ** 2), T, rtol=1e-3)
  # Default: the official normalisation, A / ‖A‖_F.
  _, alpha_n = JIT["nash"](jnp.asarray(G))
  alpha_n = np.asarray(alpha_n, np.float64)
  np.testing.assert_allclose(A / np.linalg.norm(A) @ alpha_n, 1 / alpha_n, rtol=1e-3)


def test_nash_keeps_previous_alpha_on_failure():
  G = _fixed_G(0)
  G[2] = 0.0  # no α > 0 solves Aα = 1/α with a zero row
  prev = jnp.asarray([0.5, 1.0, 1.5, 2.0])
  d, alpha = JIT["nash"](jnp.asarray(G), prev_alpha=prev)
  np.testing.assert_array_equal(alpha, prev)
  np.testing.assert_allclose(d, np.asarray(prev) @ G, rtol=1e-5, atol=1e-6)
  _, alpha = JIT["nash"](jnp.asarray(G))
  np.testing.assert_array_equal(alpha, np.ones(T))


def _degenerate_inputs():
  G = _fixed_G(4)
  zero_row = G.copy()
  zero_row[1] = 0.0
  identical = G.copy()
  identical[2] = identical[0]
  all_same = np.repeat(G[:1], T, axis=0)
  opposite = G.copy()
  opposite[1] = -opposite[0]
  return {"zero_row": zero_row, "identical_rows": identical, "all_same": all_same,
          "opposite": opposite, "all_zero": np.zeros_like(G)}


@pytest.mark.parametrize("name", sorted(gradmtl.METHODS))
def test_degenerate_inputs_give_finite_directions(name):
  options = {"rng": jax.random.key(0)} if name in ("pcgrad", "graddrop") else {}
  for case, G in _degenerate_inputs().items():
    d, w = JIT[name](jnp.asarray(G), **options)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)), (name, case)
    if name != "graddrop" or case in ("all_same", "all_zero"):  # GradDrop: only without conflict
      np.testing.assert_allclose(d, np.asarray(w) @ G, rtol=1e-4, atol=1e-5, err_msg=case)
    if case == "all_same":
      # One gradient repeated: every method returns a positive multiple of it.
      cos = d @ G[0] / (np.linalg.norm(d) * np.linalg.norm(G[0]))
      np.testing.assert_allclose(cos, 1.0, atol=1e-5, err_msg=case)


def test_cagrad_with_c_zero_is_mean_gradient():
  G = _fixed_G(5)
  d, w = jax.jit(lambda G: gradmtl.cagrad(G, c=0.0))(jnp.asarray(G))
  np.testing.assert_allclose(d, G.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, np.full(T, 1 / T), rtol=1e-6)


# ------------------------------------------------------------------------------ GradDrop


def _graddrop_reference(G, u, leak=0.0):
  """Chen et al.'s GradDrop in numpy (float64), given the uniform draw u [P]."""
  G = np.asarray(G, np.float64)
  mass = np.abs(G).sum(0)
  purity = np.where(mass > 0, 0.5 * (1 + G.sum(0) / np.where(mass > 0, mass, 1)), 0.5)
  mask = ((purity > u) & (G > 0)) | ((purity < u) & (G < 0))
  kept = leak * G + (1 - leak) * mask * G
  row = np.abs(G).sum(1)
  weights = np.where(row > 0, np.abs(kept).sum(1) / np.where(row > 0, row, 1), 1.0)
  return kept.sum(0), weights


def test_graddrop_agreeing_signs_is_the_sum():
  # Signs differ between coordinates but every coordinate's tasks agree (zeros allowed).
  G = np.array([[1.0, -2.0, 0.0, 3.0, 0.0],
                [0.5, -1.0, -4.0, 0.0, 0.0],
                [2.0, 0.0, -1.0, 1.0, 0.0]], np.float32)
  for seed in range(5):
    d, w = JIT["graddrop"](jnp.asarray(G), rng=jax.random.key(seed))
    np.testing.assert_array_equal(d, G.sum(0))
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
  # One task: nothing to conflict with.
  d, w = JIT["graddrop"](jnp.asarray(G[:1] - 0.7), rng=jax.random.key(0))
  np.testing.assert_array_equal(d, G[0] - 0.7)
  np.testing.assert_array_equal(w, [1.0])


def test_graddrop_matches_numpy_reference():
  G = _fixed_G(6)
  key = jax.random.key(11)
  u = np.asarray(jax.random.uniform(key, (P,), jnp.float32), np.float64)
  for leak in (0.0, 0.3, 1.0):
    d, w = jax.jit(lambda G, k, leak=leak: gradmtl.graddrop(G, rng=k, leak=leak))(
        jnp.asarray(G), key)
    d_ref, w_ref = _graddrop_reference(G, u, leak)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5)
  # leak = 1 passes everything: the plain sum.
  np.testing.assert_allclose(d, G.sum(0), rtol=1e-5, atol=1e-6)
  # With conflicts and no leak something is dropped: every weight < 1, d is not weights @ G.
  d, w = JIT["graddrop"](jnp.asarray(G), rng=key)
  assert np.all(np.asarray(w) < 1) and np.all(np.asarray(w) > 0)
  assert np.abs(np.asarray(d) - np.asarray(w) @ G).max() > 1e-2


def test_graddrop_hand_computed_conflict():
  # Coordinate 0: (3, −1) → P = ½(1 + 2/4) = 0.75: d = 3 w.p. 0.75, −1 w.p. 0.25.
  # Coordinate 1: (1, −1) → P = ½: d = ±1 with equal odds. Coordinate 2: (2, 1) → d = 3 always.
  n = 20000
  G = np.tile(np.array([[3.0, 1.0, 2.0], [-1.0, -1.0, 1.0]], np.float32), (1, n))
  d, w = JIT["graddrop"](jnp.asarray(G), rng=jax.random.key(0))
  d = np.asarray(d).reshape(n, 3)
  assert set(np.unique(d[:, 0])) == {3.0, -1.0} and set(np.unique(d[:, 1])) == {1.0, -1.0}
  np.testing.assert_array_equal(d[:, 2], 3.0)
  assert abs(np.mean(d[:, 0] == 3.0) - 0.75) < 0.015   # 5 standard errors ≈ 0.015
  assert abs(np.mean(d[:, 1] == 1.0) - 0.5) < 0.018
  # Kept mass: task 0 keeps its 3 w.p. 0.75, its 1 w.p. ½, its 2 always: (0.75·3 + ½ + 2) / 6.
  np.testing.assert_allclose(w, [(0.75 * 3 + 0.5 + 2) / 6, (0.25 + 0.5 + 1) / 3], atol=0.01)


def test_graddrop_seeded_randomness():
  G = jnp.asarray(_fixed_G(7))
  d1, w1 = JIT["graddrop"](G, rng=jax.random.key(3))
  d2, w2 = JIT["graddrop"](G, rng=jax.random.key(3))
  d3, _ = JIT["graddrop"](G, rng=jax.random.key(4))
  np.testing.assert_array_equal(d1, d2)
  np.testing.assert_array_equal(w1, w2)
  assert np.abs(np.asarray(d1) - np.asarray(d3)).max() > 1e-3
  # A raw uint32 key works too (the train step stores raw key data).
  d4, _ = JIT["graddrop"](G, rng=jax.random.key_data(jax.random.key(3)))
  np.testing.assert_array_equal(d1, d4)


def test_graddrop_leak_is_checked():
  with pytest.raises(ValueError, match="leak"):
    gradmtl.graddrop(jnp.ones((2, 3)), rng=jax.random.key(0), leak=1.5)
