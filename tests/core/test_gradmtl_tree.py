"""The leafwise path of visatb_jax/core/gradmtl.py: per-task gradients as a tree of [T, ...]
leaves (the train step's, sharded like the parameters) give what the flattened [T, P] matrix
gives, for every method, without a [T, P] matrix.

The reference is the flattened formulation: G = flatten_task_grads(tree), A = G @ G.T in
numpy, the method's weights from A, the direction weights @ G (GradDrop: the numpy mask on the
same draws).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import gradmtl

T = 4
# Leaves of every rank, a scalar parameter ([T]) and a stacked-layer-like one included.
SHAPES = {"bias": (), "vec": (7,), "kernel": (5, 3), "stacked": (2, 3, 4), "odd": (1, 6, 1)}
LINEAR = sorted(gradmtl.FROM_GRAM)


def _tree(seed, scales=(1.0, 3.0, 0.3, 1.0)):
  """A random gradient tree with unequal task norms (imbalanced, partly conflicting)."""
  rng = np.random.default_rng(seed)
  s = np.asarray(scales, np.float32)
  return {name: {"g": jnp.asarray(rng.normal(size=(T, *shape)).astype(np.float32)
                                  * s.reshape((T,) + (1,) * len(shape)))}
          for name, shape in SHAPES.items()}


def _flat(tree):
  return np.asarray(gradmtl.flatten_task_grads(tree), np.float64)


def _options(name, seed=0):
  if name in ("pcgrad", "graddrop"):
    return {"rng": jax.random.key(seed)}
  if name == "nash":
    return {"prev_alpha": jnp.asarray([0.5, 1.0, 1.5, 2.0])}
  return {}


JIT = {name: jax.jit(fn) for name, fn in gradmtl.METHODS.items()}


def test_task_gram_and_combine_equal_the_flattened_products():
  tree = _tree(0)
  G = _flat(tree)
  np.testing.assert_allclose(gradmtl.task_gram(tree), G @ G.T, rtol=1e-5)
  w = np.array([0.3, -1.0, 2.0, 0.5], np.float32)
  d = gradmtl.combine_tasks(jnp.asarray(w), tree)
  assert jax.tree.structure(d) == jax.tree.structure(tree)
  for name, shape in SHAPES.items():
    assert d[name]["g"].shape == shape and d[name]["g"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(d)[0]), w @ G,
                             rtol=1e-5, atol=1e-6)
  # bf16 leaves: the Gram in float32, the direction in each leaf's dtype.
  mixed = {"a": tree["kernel"]["g"].astype(jnp.bfloat16), "b": tree["vec"]["g"]}
  assert gradmtl.task_gram(mixed).dtype == jnp.float32
  out = gradmtl.combine_tasks(jnp.asarray(w), mixed)
  assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=4),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_task_gram_of_any_leaf_shapes(shapes, tasks, seed):
  rng = np.random.default_rng(seed)
  tree = [rng.normal(size=(tasks, *s)).astype(np.float32) for s in shapes]
  G = np.concatenate([x.reshape(tasks, -1) for x in tree], 1).astype(np.float64)
  A = np.asarray(gradmtl.task_gram([jnp.asarray(x) for x in tree]), np.float64)
  assert A.shape == (tasks, tasks)
  np.testing.assert_allclose(A, G @ G.T, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(G).max()) ** 2)


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("seed", [0, 1])
def test_leafwise_equals_flattened(name, seed):
  tree = _tree(seed)
  G = _flat(tree)
  options = _options(name, seed)
  d_tree, w_tree = JIT[name](tree, **options)
  d_flat, w_flat = JIT[name](jnp.asarray(G, jnp.float32), **options)
  # The old formulas: weights from A = G Gᵀ computed from the flattened matrix.
  w_old = gradmtl.FROM_GRAM[name](jnp.asarray(G @ G.T, jnp.float32), **options)
  for w in (w_flat, w_old):
    np.testing.assert_allclose(w_tree, w, rtol=2e-4, atol=1e-5)
  d = np.asarray(jax.flatten_util.ravel_pytree(d_tree)[0], np.float64)
  np.testing.assert_allclose(d, np.asarray(d_flat), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d, np.asarray(w_flat, np.float64) @ G, rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(d_tree) == jax.tree.structure(tree)


def test_pcgrad_leafwise_keeps_its_random_order():
  # Three tasks whose PCGrad result depends on the order (tests/core/test_gradmtl.py): every
  # key gives on the tree exactly what it gives on the flattened matrix, and keys differ.
  G = np.array([[1.0, 0.0, 0.0], [-0.8, 1.0, 0.0], [-0.5, -0.9, 1.0]], np.float32)
  tree = {"a": jnp.asarray(G[:, :1]), "b": jnp.asarray(G[:, 1:])}
  results = set()
  for seed in range(6):
    for reduction in ("sum", "mean"):
      d_tree, w_tree = gradmtl.pcgrad(tree, rng=jax.random.key(seed), reduction=reduction)
      d_flat, w_flat = gradmtl.pcgrad(jnp.asarray(G), rng=jax.random.key(seed),
                                      reduction=reduction)
      np.testing.assert_allclose(w_tree, w_flat, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(np.concatenate([d_tree["a"], d_tree["b"]]), d_flat, atol=1e-6)
    results.add(tuple(np.round(np.asarray(w_tree), 4)))
  assert len(results) > 1


def _graddrop_reference(G, u, leak=0.0):
  """Chen et al.'s GradDrop in numpy (float64) on a flattened G, given the draws u [P]."""
  mass = np.abs(G).sum(0)
  purity = np.where(mass > 0, 0.5 * (1 + G.sum(0) / np.where(mass > 0, mass, 1)), 0.5)
  mask = ((purity > u) & (G > 0)) | ((purity < u) & (G < 0))
  kept = leak * G + (1 - leak) * mask * G
  row = np.abs(G).sum(1)
  return kept.sum(0), np.where(row > 0, np.abs(kept).sum(1) / np.where(row > 0, row, 1), 1.0)


@pytest.mark.parametrize("leak", [0.0, 0.4])
def test_graddrop_leafwise_equals_the_flattened_mask(leak):
  tree = _tree(3)
  G = _flat(tree)
  key = jax.random.key(5)
  u_tree = gradmtl.graddrop_uniforms(key, tree)
  assert jax.tree.structure(u_tree) == jax.tree.structure(jax.tree.map(lambda x: x[0], tree))
  u = np.asarray(jax.flatten_util.ravel_pytree(u_tree)[0], np.float64)
  assert u.shape == (G.shape[1],) and 0 <= u.min() and u.max() < 1
  d_tree, w_tree = jax.jit(lambda t, k: gradmtl.graddrop(t, rng=k, leak=leak))(tree, key)
  d_ref, w_ref = _graddrop_reference(G, u, leak)
  d = np.asarray(jax.flatten_util.ravel_pytree(d_tree)[0])
  np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_tree, w_ref, rtol=1e-5)
  # Something was dropped: the test can tell a mask from the plain sum.
  assert leak or np.abs(d - G.sum(0)).max() > 1e-2
  # Every leaf draws its own numbers (no leaf reuses another's).
  firsts = {float(np.ravel(x)[0]) for x in jax.tree.leaves(u_tree)}
  assert len(firsts) == len(SHAPES)


def test_graddrop_of_one_leaf_is_the_flattened_graddrop():
  G = jnp.asarray(_flat(_tree(4)), jnp.float32)
  key = jax.random.key(9)
  d_flat, w_flat = gradmtl.graddrop(G, rng=key)
  d_tree, w_tree = gradmtl.graddrop({"only": G}, rng=key)
  np.testing.assert_array_equal(d_tree["only"], d_flat)
  np.testing.assert_array_equal(w_tree, w_flat)


def test_graddrop_scaled_folds_the_row_scale_in():
  tree = _tree(6)
  scale = jnp.asarray([2.0, 0.0, 0.5, 1.0])
  key = jax.random.key(2)
  d, w = gradmtl.graddrop_scaled(tree, scale, rng=key)
  scaled = jax.tree.map(lambda g: g * scale.reshape((T,) + (1,) * (g.ndim - 1)), tree)
  d_ref, w_ref = gradmtl.graddrop(scaled, rng=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), d, d_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)
  assert w[1] == 1.0  # a zero row: nothing of it dropped (the step sets inactive weights to 0)


def test_no_t_by_p_matrix_in_the_leafwise_program():
  """The jitted leafwise methods never build a [T, P] array: no op output has P elements in a
  row (P = all parameters; the largest leaf has 24)."""
  tree = _tree(0)
  P = sum(math.prod(s) or 1 for s in SHAPES.values())
  for name in ("imgrad", "pcgrad", "graddrop"):
    text = jax.jit(gradmtl.METHODS[name]).lower(tree, **_options(name)).as_text()
    assert f"<{T}x{P}x" not in text and f"<{P}x" not in text, name
    # The same method on the flattened matrix does show it: the check can tell.
    flat = jax.jit(gradmtl.METHODS[name]).lower(gradmtl.flatten_task_grads(tree),
                                                 **_options(name)).as_text()
    assert f"<{T}x{P}xf32>" in flat, name
