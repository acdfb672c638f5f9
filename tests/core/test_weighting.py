"""Tests of the dynamic loss-weighting strategies (visatb_jax/weighting.py, docs/method.md §9)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import weighting

T = 4
RNG = jax.random.key(0)
FIXED = {"fixed_mask": [False, True, False, False], "fixed_values": [0, 1.0, 0, 0]}
# Small windows so that every dynamic rule is active within a dozen steps.
OPTIONS = {
    "ew": {},
    "static": {"lam": [2.0, 1.0, 0.5, 0.5]},
    "rlw": {},
    "dwa": {"window": 2},
    "igb": {"base_start": 1, "base_end": 3},
    "uw": {"lr": 0.05},
}


def _n_softmax(scores):
  e = np.exp(np.asarray(scores, np.float64) - np.max(scores))
  return len(scores) * e / e.sum()


def _run(strategy, losses, counts=None, rng=RNG, state=None):
  """Feeds the rows of `losses` as steps 0, 1, ...; returns the λ after each and the state."""
  update = jax.jit(strategy.update)
  state = strategy.init(len(losses[0])) if state is None else state
  lams = []
  for step, loss in enumerate(losses):
    count = None if counts is None else jnp.asarray(counts[step], jnp.float32)
    lam, state = update(state, jnp.asarray(loss, jnp.float32), step, rng, count)
    np.testing.assert_array_equal(lam, state["lam"])
    lams.append(np.asarray(lam))
  return np.stack(lams), state


def _random_losses(steps, seed=0):
  return np.random.default_rng(seed).uniform(0.5, 3.0, size=(steps, T)).astype(np.float32)


def test_registry():
  assert set(weighting.STRATEGIES) == {"ew", "static", "rlw", "dwa", "igb", "uw"}
  for name, options in OPTIONS.items():
    assert weighting.get_strategy(name, **options).name == name
  with pytest.raises(ValueError, match="unknown weighting strategy"):
    weighting.get_strategy("gradnorm")
  with pytest.raises(TypeError):
    weighting.get_strategy("dwa", windw=3)
  with pytest.raises(ValueError):
    weighting.get_strategy("dwa", window=0)
  with pytest.raises(ValueError):
    weighting.get_strategy("igb", base_start=5, base_end=5)
  with pytest.raises(ValueError, match="together"):
    weighting.get_strategy("ew", fixed_mask=[True, False, False, False])
  for bad_lr in (0.0, -1e-2, float("nan")):
    with pytest.raises(ValueError, match="uw lr"):
      weighting.get_strategy("uw", lr=bad_lr)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("fixed", [False, True])
def test_lambda_averages_one_over_free_tasks(name, fixed):
  strategy = weighting.get_strategy(name, **OPTIONS[name], **(FIXED if fixed else {}))
  state = strategy.init(T)
  lams, _ = _run(strategy, _random_losses(9), state=state)
  lams = np.concatenate([np.asarray(state["lam"])[None], lams])
  free = ~np.asarray(FIXED["fixed_mask"]) if fixed else np.ones(T, bool)
  assert np.all(lams > 0)
  np.testing.assert_allclose(lams[:, free].mean(axis=1), 1.0, rtol=1e-6)
  if fixed:
    np.testing.assert_array_equal(lams[:, ~free], 1.0)
  if name in ("rlw", "dwa", "igb", "uw"):
    # The rule is really active by the end, not stuck at ones.
    assert np.abs(lams[-1] - 1.0).max() > 1e-3


def test_ew_is_ones():
  lams, _ = _run(weighting.get_strategy("ew"), _random_losses(3))
  np.testing.assert_array_equal(lams, 1.0)
  lams, _ = _run(weighting.get_strategy("ew", **FIXED), _random_losses(3))
  np.testing.assert_array_equal(lams, 1.0)  # fixed value 1.0, others 1.0
  with pytest.raises(ValueError, match="unknown weighting strategy 'tla'"):
    weighting.get_strategy("tla")  # TLA's λ is made in the train step (train/vitw_step.py)


def test_static_normalises_and_keeps_fixed():
  lam = [3.0, 5.0, 1.0, 2.0]
  state = weighting.get_strategy("static", lam=lam, **FIXED).init(T)
  # Free tasks 0, 2, 3 sum to 6 → scale 3/6; the fixed task keeps 1.0.
  np.testing.assert_allclose(state["lam"], [1.5, 1.0, 0.5, 1.0], rtol=1e-6)
  state = weighting.get_strategy("static", lam=lam, normalize=False).init(T)
  np.testing.assert_array_equal(state["lam"], lam)
  with pytest.raises(ValueError, match="3 entries for 4 tasks"):
    weighting.get_strategy("static", lam=[1.0, 1.0, 1.0]).init(T)
  with pytest.raises(ValueError):
    weighting.get_strategy("static", lam=[1.0, float("nan"), 1.0, 1.0])
  with pytest.raises(ValueError, match="shape"):
    weighting.get_strategy("static", lam=[1.0] * 3, fixed_mask=[True, False],
                           fixed_values=[1.0, 0.0]).init(3)


def _dwa_reference(losses, counts=None, *, window, temperature=2.0, fixed_mask=None,
                   fixed_values=None):
  """Sliding-window DWA written out in numpy: the λ returned after each step (for the next).

  Each task keeps the list of its observed losses (present: count > 0 and finite); once it has
  2·window of them, w_k = mean(last window) / mean(the window before), else w_k = 1; λ over the
  free tasks is N_free · softmax(w / T), and exactly 1 until some free task has 2·window losses.
  """
  losses = np.asarray(losses, np.float64)
  num_tasks = losses.shape[1]
  fixed = np.zeros(num_tasks, bool) if fixed_mask is None else np.asarray(fixed_mask, bool)
  values = np.zeros(num_tasks) if fixed_values is None else np.asarray(fixed_values, np.float64)
  observed = [[] for _ in range(num_tasks)]
  out = []
  for step, loss in enumerate(losses):
    for k in range(num_tasks):
      if np.isfinite(loss[k]) and (counts is None or counts[step][k] > 0):
        observed[k].append(loss[k])
    ready = np.array([len(o) >= 2 * window for o in observed])
    lam = np.ones(num_tasks)
    if np.any(ready & ~fixed):
      w = np.array([np.mean(o[-window:]) / np.mean(o[-2 * window:-window]) if r else 1.0
                    for o, r in zip(observed, ready)])
      lam[~fixed] = _n_softmax(w[~fixed] / temperature)
    lam[fixed] = values[fixed]
    out.append(lam)
  return np.stack(out)


def test_dwa_hand_computed_window_one():
  # window=1: w_k = L_k(s) / L_k(s − 1), the per-step rule; λ for step s + 1.
  dwa = weighting.get_strategy("dwa", window=1)
  lams, state = _run(dwa, [[2, 4], [1, 4], [1, 2], [3, 1]])
  np.testing.assert_array_equal(lams[0], 1.0)  # one loss each: nothing to compare yet
  for s, w in [(1, [1 / 2, 4 / 4]), (2, [1 / 1, 2 / 4]), (3, [3 / 1, 1 / 2])]:
    e = np.exp(np.asarray(w) / 2)
    np.testing.assert_allclose(lams[s], 2 * e / e.sum(), rtol=1e-6)
  np.testing.assert_array_equal(state["seen"], [4, 4])


def test_dwa_hand_computed_sliding_window():
  dwa = weighting.get_strategy("dwa", window=2)
  losses = [[2, 4], [2, 4], [1, 4], [1, 4],
            [9, 0], [0.5, 2], [1, 3]]
  counts = [[1, 1]] * 4 + [[1, 0], [1, 1], [1, 1]]   # task 1 absent at step 4
  lams, _ = _run(dwa, losses, counts)
  np.testing.assert_array_equal(lams[:3], 1.0)   # fewer than 4 losses per task
  # After step 3: task 0 (1 + 1)/2 over (2 + 2)/2 = 1/2; task 1 (4 + 4)/(4 + 4) = 1.
  np.testing.assert_allclose(lams[3], _n_softmax([0.25, 0.5]), rtol=1e-6)
  # After step 4 (task 1 absent, its ratio unchanged): task 0 (1 + 9)/2 over (2 + 1)/2 = 10/3.
  np.testing.assert_allclose(lams[4], _n_softmax([10 / 3 / 2, 0.5]), rtol=1e-6)
  # After step 5: task 0 (9 + 0.5)/(1 + 1) = 4.75; task 1's last four: 4, 4, 4, 2 → 6/8.
  np.testing.assert_allclose(lams[5], _n_softmax([4.75 / 2, 0.75 / 2]), rtol=1e-6)
  # After step 6: task 0 (0.5 + 1)/(1 + 9) = 0.15; task 1 (2 + 3)/(4 + 4) = 5/8.
  np.testing.assert_allclose(lams[6], _n_softmax([0.075, 0.3125]), rtol=1e-6)
  np.testing.assert_allclose(lams, _dwa_reference(losses, counts, window=2), rtol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_dwa_matches_numpy_reference(window):
  rng = np.random.default_rng(window)
  steps = 40
  # Decreasing losses with noise, tasks absent now and then, a NaN loss.
  losses = (np.linspace(3, 1, steps)[:, None] * rng.uniform(0.7, 1.3, (steps, T))
            ).astype(np.float32)
  losses[7, 2] = np.nan
  counts = (rng.uniform(size=(steps, T)) > 0.2).astype(np.float32)
  counts[:, 3] = 0
  counts[25:, 3] = 1                                  # task 3 joins late
  options = {"window": window, "temperature": 1.5, **FIXED}
  lams, _ = _run(weighting.get_strategy("dwa", **options), losses, counts)
  expected = _dwa_reference(losses, counts, **options)
  np.testing.assert_allclose(lams, expected, rtol=2e-6)
  assert np.abs(expected[-1] - 1).max() > 1e-2      # the rule is active, not stuck at ones


def test_dwa_at_window_boundaries_is_per_epoch_dwa():
  # Every task present at every step, `window` steps per "epoch": the λ of the first step of
  # epoch e ≥ 2 is the paper's DWA from the mean losses of epochs e − 1 and e − 2.
  window, epochs = 4, 5
  losses = _random_losses(window * epochs, seed=3)
  lams, _ = _run(weighting.get_strategy("dwa", window=window), losses)
  means = losses.reshape(epochs, window, T).astype(np.float64).mean(axis=1)
  for e in range(2, epochs):
    np.testing.assert_allclose(lams[e * window - 1], _n_softmax(means[e - 1] / means[e - 2] / 2),
                               rtol=1e-6)
  np.testing.assert_array_equal(lams[:2 * window - 1], 1.0)


def test_dwa_fixed_task_and_nan_loss():
  dwa = weighting.get_strategy("dwa", window=1, fixed_mask=[False, False, True],
                               fixed_values=[0.0, 0.0, 1.0])
  # A NaN loss counts as absent: task 1's step-2 NaN leaves its last ratio (1/2) in place.
  lams, _ = _run(dwa, [[1, 2, 5], [2, 1, 5], [4, float("nan"), 5]])
  np.testing.assert_array_equal(lams[0], [1, 1, 1])
  np.testing.assert_allclose(lams[1], [*_n_softmax(np.array([2, 0.5]) / 2), 1.0], rtol=1e-6)
  np.testing.assert_allclose(lams[2], [*_n_softmax(np.array([2, 0.5]) / 2), 1.0], rtol=1e-6)


def test_dwa_neutral_ratio_for_unready_or_zero_losses():
  dwa = weighting.get_strategy("dwa", window=1)
  # Task 1 is seen once only, task 2 has an earlier loss of 0: both get the neutral ratio 1.
  lams, _ = _run(dwa, [[1, 1, 0], [2, 1, 3], [4, 1, 1]], counts=[[1, 1, 1], [1, 0, 1],
                                                                  [1, 0, 1]])
  np.testing.assert_allclose(lams[1], _n_softmax(np.array([2, 1, 1]) / 2), rtol=1e-6)
  np.testing.assert_allclose(lams[2], _n_softmax(np.array([2, 1, 1 / 3]) / 2), rtol=1e-6)


def test_igb_hand_computed_base():
  igb = weighting.get_strategy("igb", base_start=2, base_end=4)
  losses = [[100, 100], [100, 100],   # before the base window: ignored
            [1, 2], [3, 7],           # base window; task 1 absent at step 3
            [4, 1], [float("nan"), 3]]
  counts = [[1, 1]] * 3 + [[1, 0], [1, 1], [0, 1]]
  lams, _ = _run(igb, losses, counts)
  np.testing.assert_array_equal(lams[:3], 1.0)  # λ of steps 1..3
  # Base: task 0 (1 + 3)/2 = 2, task 1 = 2 (its step-3 loss had no tokens).
  np.testing.assert_allclose(lams[3], _n_softmax([3 / 2, 2 / 2]), rtol=1e-6)
  np.testing.assert_allclose(lams[4], _n_softmax([4 / 2, 1 / 2]), rtol=1e-6)
  # Task 0 absent at step 5: its last seen loss (4) stands in.
  np.testing.assert_allclose(lams[5], _n_softmax([4 / 2, 3 / 2]), rtol=1e-6)


def test_rlw_deterministic_given_rng_and_varies():
  rlw = weighting.get_strategy("rlw")
  update = jax.jit(rlw.update)
  state = rlw.init(T)
  loss = jnp.ones((T,), jnp.float32)
  lam3, _ = update(state, loss, 3, RNG)
  lam3_again, _ = update(state, loss, 3, RNG)
  lam4, _ = update(state, loss, 4, RNG)
  lam3_other, _ = update(state, loss, 3, jax.random.key(1))
  np.testing.assert_array_equal(lam3, lam3_again)
  assert np.abs(lam3 - lam4).max() > 1e-3  # a fresh z every step, even with the same key
  assert np.abs(lam3 - lam3_other).max() > 1e-3
  z = jax.random.normal(jax.random.fold_in(RNG, 4), (T,), jnp.float32)
  np.testing.assert_allclose(lam3, _n_softmax(np.asarray(z)), rtol=1e-5)
  # Over many steps λ is spread around 1, as N·softmax of standard normals is.
  lams, _ = _run(rlw, np.ones((40, T), np.float32))
  assert lams.std() > 0.2 and abs(lams.mean() - 1) < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_state_round_trips_through_tree(name):
  strategy = weighting.get_strategy(name, **OPTIONS[name])
  losses = _random_losses(8, seed=1)
  lams, state = _run(strategy, losses[:5])
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)  # arrays only: orbax-checkpointable
  assert jax.tree.structure(strategy.init(T)) == treedef
  # Through host numpy and back, as a checkpoint would.
  restored = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])
  rest_direct, _ = _run(strategy, losses[5:], state=state)
  rest_restored, _ = _run(strategy, losses[5:], state=restored)
  np.testing.assert_array_equal(rest_direct, rest_restored)


def test_jit_matches_eager():
  dwa = weighting.get_strategy("dwa", window=2)
  losses = _random_losses(6, seed=2)
  jitted, _ = _run(dwa, losses)
  state, eager = dwa.init(T), []
  for step, loss in enumerate(losses):
    lam, state = dwa.update(state, jnp.asarray(loss), step, RNG)
    eager.append(np.asarray(lam))
  np.testing.assert_allclose(jitted, np.stack(eager), rtol=1e-6)
  lam, _ = weighting.jit_update(dwa, dwa.init(T), losses[0], 0, RNG)
  np.testing.assert_array_equal(lam, 1.0)


@settings(max_examples=25, deadline=None)
@given(scores=st.lists(st.floats(-30, 30), min_size=5, max_size=5),
       free=st.lists(st.booleans(), min_size=5, max_size=5).filter(any))
def test_n_softmax_mean_one(scores, free):
  free = np.asarray(free)
  lam = np.asarray(weighting.n_softmax(jnp.asarray(scores, jnp.float32), jnp.asarray(free)))
  assert np.all(np.isfinite(lam)) and np.all(lam[free] >= 0)
  assert math.isclose(lam[free].mean(), 1.0, rel_tol=1e-5)
  np.testing.assert_array_equal(lam[~free], 0.0)


# -------------------------------------------------------------------------------------- UW


def _uw_run(losses, counts=None, **options):
  """The UW states after each of the steps 0, 1, ... fed with the rows of `losses`."""
  uw = weighting.get_strategy("uw", **options)
  update = jax.jit(uw.update)
  state, states = uw.init(len(losses[0])), []
  for step, loss in enumerate(losses):
    count = None if counts is None else jnp.asarray(counts[step], jnp.float32)
    _, state = update(state, jnp.asarray(loss, jnp.float32), step, RNG, count)
    states.append(jax.tree.map(np.asarray, state))
  return states


def test_uw_gradient_is_the_analytical_one():
  """∂/∂s_t Σ exp(−s)·L + s = 1 − exp(−s_t)·L_t on active tasks, 0 on the others (even NaN)."""
  rng = np.random.default_rng(3)
  log_var = jnp.asarray(rng.normal(size=6), jnp.float32)
  loss = rng.uniform(0.1, 5.0, size=6).astype(np.float32)
  active = np.array([True, True, False, True, False, True])
  loss[4] = np.nan  # an absent task's loss may be anything
  grad = jax.grad(weighting.uw_objective)(log_var, jnp.asarray(loss), jnp.asarray(active))
  expected = np.where(active, 1.0 - np.exp(-np.asarray(log_var, np.float64)) * loss, 0.0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lr,steps,tol",
                         [(weighting.UW_LR, 700, 2e-3), (0.05, 300, 1e-4)])
def test_uw_reaches_the_known_optimum_s_equals_log_loss(lr, steps, tol):
  """For constant losses the minimiser of Σ exp(−s)·L + s is s_t = log L_t, so λ ∝ 1/L."""
  losses = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
  final = _uw_run(np.tile(losses, (steps, 1)), lr=lr)[-1]
  np.testing.assert_allclose(final["log_var"], np.log(losses), atol=tol)
  np.testing.assert_allclose(final["lam"], _n_softmax(-np.log(losses)), rtol=10 * tol)
  np.testing.assert_allclose(final["lam"], 4 * (1 / losses) / np.sum(1 / losses), rtol=10 * tol)


def test_uw_adam_is_optax_adam_on_the_analytical_gradient():
  """With every task present, s follows optax.adam(lr) on the gradient 1 − exp(−s)·L."""
  lr, losses = 0.05, _random_losses(25, seed=4)
  states = _uw_run(losses, lr=lr)
  tx = optax.adam(lr)
  s = jnp.zeros((T,), jnp.float32)
  opt_state = tx.init(s)
  for loss, state in zip(losses, states):
    grad = 1.0 - jnp.exp(-s) * loss
    updates, opt_state = tx.update(grad, opt_state, s)
    s = optax.apply_updates(s, updates)
    np.testing.assert_allclose(state["log_var"], s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["lam"], _n_softmax(-np.asarray(s)), rtol=1e-5)


def test_uw_fixed_and_absent_tasks_keep_their_state():
  losses = _random_losses(6, seed=5)
  counts = np.ones_like(losses)
  counts[3:, 2] = 0  # task 2 absent from step 3 on (its loss there is reported as 0)
  losses[3:, 2] = 0.0
  states = _uw_run(losses, counts, lr=0.05, **FIXED)
  fixed = np.asarray(FIXED["fixed_mask"])
  for state in states:
    np.testing.assert_array_equal(state["log_var"][fixed], 0.0)  # a fixed task has no s
    np.testing.assert_array_equal(state["adam_count"][fixed], 0)
    np.testing.assert_array_equal(state["lam"][fixed], 1.0)
    np.testing.assert_allclose(state["lam"][~fixed], _n_softmax(-state["log_var"][~fixed]),
                               rtol=1e-6)
  for key in ("log_var", "adam_mu", "adam_nu", "adam_count"):
    for state in states[3:]:
      np.testing.assert_array_equal(state[key][2], states[2][key][2])
  np.testing.assert_array_equal(states[-1]["adam_count"], [6, 0, 3, 6])
  assert np.all(np.abs(states[-1]["log_var"][[0, 3]] - states[2]["log_var"][[0, 3]]) > 1e-3)
