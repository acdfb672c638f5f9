"""Tests of the gradient-method train step (visatb_jax/gradmtl_step.py) on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from visatb_jax import train
from visatb_jax.runtime import sharding
from visatb_jax.core import gradmtl
from visatb_jax.train import gradmtl_step
from visatb_jax.core import loss

# The tiny model of the train-step tests: embed + image feature + MLP + head; TRACES counts traces.
from test_train import (TRACES, TinyModel, assert_rel_close, grads_of,  # noqa: E402
                        make_batch)

# Two tasks: every method compiles one solver per possible number of active tasks.
ROWS, T = 8, 2  # the rows and tasks of test_train.make_batch
LAM = np.array([2.0, 0.5], np.float32)
METHODS = sorted(gradmtl.METHODS)


deltas = grads_of  # old params − new params: the update of a step (−direction under SGD(1))


def one_step(mesh, method, *, tx=None, accum_steps=1, batch=None, lam=LAM, options=None,
                 seed=0):
  """One gradient-method step from a fresh model: (old state, new state, metrics, mtl_state)."""
  tx = tx or optax.sgd(1.0)  # the update is exactly −direction
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(seed)))
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  step = gradmtl_step.make_gradmtl_train_step(graphdef, tx, mesh=mesh, method=method,
                                              method_options=options, accum_steps=accum_steps)
  mtl = sharding.replicate(gradmtl_step.init_mtl_state(method, len(lam), seed=1), mesh)
  batch = sharding.shard_batch(make_batch() if batch is None else batch, mesh)
  new, metrics, mtl = step(state, sharding.replicate(frozen, mesh), batch, jnp.asarray(lam),
                           np.float32(1.0), mtl)
  return state, new, jax.device_get(metrics), mtl


# ------------------------------------------------------------------------- per-task grads


def test_vjp_task_gradients_equal_separate_grads(meshes):
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  grads, (weighted, weight, task_sum, task_count) = jax.jit(
      lambda p: gradmtl_step.task_gradients(graphdef, p, frozen, batch, LAM))(params)

  def nll_sum(p, k):
    logits = nnx.merge(graphdef, p, frozen)(batch["input_ids"], images=batch["images"])
    return loss.token_loss(logits, batch["targets"], batch["loss_mask"], batch["task_ids"],
                           LAM)[2][k]

  grad_k = jax.jit(jax.grad(nll_sum), static_argnums=1)
  for k in range(T):
    ref = grad_k(params, k)
    assert_rel_close(jax.tree.map(lambda g, k=k: g[k], grads), ref)
  ref_sums = jax.jit(lambda p: loss.token_loss(
      nnx.merge(graphdef, p, frozen)(batch["input_ids"], images=batch["images"]),
      batch["targets"], batch["loss_mask"], batch["task_ids"], LAM))(params)
  for got, want in zip((weighted, weight, task_sum, task_count), ref_sums, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Only the trainable split is differentiated: nothing of the frozen vision tower.
  assert all(leaf.shape[0] == T for leaf in jax.tree.leaves(grads))
  assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(params))


# ---------------------------------------------------------------------------- combination


def test_combine_runs_the_method_on_active_rows_only():
  rng = np.random.default_rng(0)
  G = rng.normal(size=(3, 10)).astype(np.float32) * np.array([[1.0], [5.0], [0.2]], np.float32)
  active = np.array([True, False, True])
  sub = G[[0, 2]]
  # The two methods with step-supplied arguments; the others differ only in their scale
  # (test_combine_scales_and_empty_batch), and their solvers are costly to compile.
  for method in ("nash", "pcgrad"):
    state = gradmtl_step.init_mtl_state(method, 3, seed=3)
    d, w, new_state = jax.device_get(jax.jit(
        lambda G, a, s, m=method: gradmtl_step.combine(G, a, m, mtl_state=s))(G, active, state))
    kwargs = {}
    _, rng_sub = jax.random.split(jax.random.wrap_key_data(state.key))
    if method == "pcgrad":
      kwargs["rng"] = rng_sub
    if method == "nash":
      kwargs["prev_alpha"] = state.alpha[np.array([0, 2])]
    d_ref, w_ref = jax.jit(gradmtl.METHODS[method])(jnp.asarray(sub), **kwargs)
    scale = gradmtl_step.direction_scale(method, None, 2)
    np.testing.assert_allclose(d, scale * np.asarray(d_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w[[0, 2]], scale * np.asarray(w_ref), rtol=1e-5, atol=1e-6)
    assert w[1] == 0.0
    np.testing.assert_allclose(d, w @ G, rtol=1e-4, atol=1e-5)  # direction = weights @ G
    # The key advances every step; Nash-MTL keeps the α of the tasks that took part.
    assert not np.array_equal(new_state.key, state.key)
    if method == "nash":
      np.testing.assert_allclose(new_state.alpha[[0, 2]], w_ref, rtol=1e-6)
      assert new_state.alpha[1] == 1.0
    else:
      np.testing.assert_array_equal(new_state.alpha, state.alpha)


def test_combine_scales_and_empty_batch():
  G = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  assert [gradmtl_step.direction_scale(m, None, 3) for m in METHODS] == [3, 1, 3, 1, 1, 1]
  # PCGrad's "mean" reduction is scaled back to a sum; "sum" is not.
  key = gradmtl_step.init_mtl_state("pcgrad", 2)
  d_sum, _, _ = gradmtl_step.combine(G, np.array([True, True]), "pcgrad", mtl_state=key)
  d_mean, _, _ = gradmtl_step.combine(G, np.array([True, True]), "pcgrad",
                                      {"reduction": "mean"}, mtl_state=key)
  np.testing.assert_allclose(d_sum, [1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(d_mean, d_sum, rtol=1e-6)
  # No active task: a zero direction, zero weights, never NaN.
  state = gradmtl_step.init_mtl_state("nash", 2)
  d, w, _ = gradmtl_step.combine(G, np.array([False, False]), "nash", mtl_state=state)
  np.testing.assert_array_equal(d, 0.0)
  np.testing.assert_array_equal(w, 0.0)


def test_bad_method_and_reserved_options(meshes):
  graphdef, _, _ = train.split_model(TinyModel(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="unknown gradient method 'famo'"):
    gradmtl_step.make_gradmtl_train_step(graphdef, optax.sgd(1.0), mesh=meshes[1], method="famo")
  with pytest.raises(ValueError, match="prev_alpha"):
    gradmtl_step.make_gradmtl_train_step(graphdef, optax.sgd(1.0), mesh=meshes[1],
                                         method="nash", method_options={"prev_alpha": None})
  with pytest.raises(ValueError, match="num_tasks"):
    gradmtl_step.init_mtl_state("mgda", 0)


# ------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("make_tx", [lambda: optax.sgd(1.0),
                                     lambda: train.make_optimizer({"steps": 10, "lr": 1.0})])
@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_mgda_on_one_task_equals_the_plain_step(meshes, make_tx):
  # Only task 1 has tokens: MGDA's direction is that task's mean-loss gradient, exactly the
  # gradient of the EW step (whose λ cancels when one task is present).
  batch = make_batch(task_of_row=np.ones(ROWS, np.int64))
  lam = np.array([2.0, 1.0], np.float32)
  tx = make_tx()
  old, new, metrics, _ = one_step(meshes[1], "mgda", tx=tx, batch=batch, lam=lam)
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  mesh = meshes[1]
  ew = train.make_train_step(graphdef, tx, mesh=mesh)
  ew_new, ew_metrics = ew(sharding.replicate(train.init_train_state(params, tx), mesh),
                          sharding.replicate(frozen, mesh), sharding.shard_batch(batch, mesh),
                          jnp.asarray(lam), np.float32(1.0))
  assert_rel_close(deltas(old, new), deltas(old, ew_new))
  np.testing.assert_allclose(metrics["mtl_weights"], [0.0, 1.0], atol=1e-6)
  for key in ("loss", "per_task_loss", "per_task_count", "grad_norm", "weight_sum", "tokens",
              "lam"):
    np.testing.assert_allclose(metrics[key], ew_metrics[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_methods_train_without_nan(meshes, method):
  mesh = meshes[1]
  tx = optax.adam(0.05)
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  frozen = sharding.replicate(frozen, mesh)
  step = gradmtl_step.make_gradmtl_train_step(graphdef, tx, mesh=mesh, method=method)
  mtl = sharding.replicate(gradmtl_step.init_mtl_state(method, T, seed=0), mesh)
  full = sharding.shard_batch(make_batch(), mesh)
  # Task 1 absent from this batch: it must get weight 0 and no NaN anywhere.
  partial = sharding.shard_batch(make_batch(1, task_of_row=np.zeros(ROWS, np.int64)), mesh)
  lam = jnp.ones((T,), jnp.float32)
  losses = []
  for i in range(8):
    batch = partial if i == 3 else full
    state, metrics, mtl = step(state, frozen, batch, lam, np.float32(1.0), mtl)
    metrics = jax.device_get(metrics)
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), (i, metrics)
    if i == 3:
      assert metrics["per_task_count"][1] == 0 and metrics["mtl_weights"][1] == 0.0
      assert metrics["mtl_weights"][0] > 0
    else:
      losses.append(float(np.sum(metrics["per_task_loss"])))
  assert losses[-1] < losses[0] - 0.1, losses
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_sharded_and_accumulated_steps_equal_single_device(meshes):
  # Nash-MTL: the solver is not invariant to a rescaled row, and its α is state.
  old1, new1, m1, s1 = one_step(meshes[1], "nash")
  old8, new8, m8, s8 = one_step(meshes[8], "nash")
  # Two micro-batches of 4 rows, each spread over the 8 devices.
  olda, newa, ma, sa = one_step(meshes[8], "nash", accum_steps=2)
  assert len(jax.tree.leaves(new8.params)[0].sharding.device_set) == 8
  for o, n, m, s in ((old8, new8, m8, s8), (olda, newa, ma, sa)):
    assert_rel_close(deltas(o, n), deltas(old1, new1))
    for key in ("loss", "per_task_loss", "per_task_count", "grad_norm", "mtl_weights"):
      assert_rel_close(m[key], m1[key])
    assert_rel_close(s.alpha, s1.alpha)
  # Sensitive: the per-task mean losses are not the batch's plain token mean.
  assert abs(m1["loss"] - np.mean(m1["per_task_loss"])) > 1e-3


def test_new_lambda_does_not_recompile(meshes):
  mesh = meshes[8]
  tx = optax.sgd(0.1)
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  frozen = sharding.replicate(frozen, mesh)
  step = gradmtl_step.make_gradmtl_train_step(graphdef, tx, mesh=mesh, method="mgda")
  mtl = sharding.replicate(gradmtl_step.init_mtl_state("mgda", T), mesh)
  batch = sharding.shard_batch(make_batch(), mesh)
  TRACES["n"] = 0
  results = []
  for lam in ([1.0, 1.0], [3.0, 0.2], [0.5, 0.0]):
    _, metrics, mtl = step(state, frozen, batch, np.array(lam, np.float32), np.float32(0.1), mtl)
    results.append(jax.device_get(metrics))
  assert TRACES["n"] == 1  # one forward in the one trace: no per-task forward passes
  assert step._cache_size() == 1  # pylint: disable=protected-access
  weights = [tuple(np.round(m["mtl_weights"], 6)) for m in results]
  assert len(set(weights)) == 3  # λ is actually used
  assert results[2]["mtl_weights"][1] == 0.0  # λ = 0 takes the task out of the combination


def test_mtl_state_is_checkpointable(tmp_path):
  state = gradmtl_step.init_mtl_state("nash", T, seed=7)
  state = state.replace(alpha=jnp.array([0.5, 1.5], jnp.float32))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "mtl", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "mtl", gradmtl_step.init_mtl_state("nash", T, seed=0))
  assert isinstance(restored, gradmtl_step.GradMTLState)
  np.testing.assert_array_equal(restored.alpha, state.alpha)
  np.testing.assert_array_equal(restored.key, state.key)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_chunked_cross_entropy_gives_the_same_step(meshes, accum):
  """ce_chunk_size on the per-task-gradient step: the same per-task gradients, loss and update
  as the full-logits step, on a (tiny) real LLaVA."""
  from visatb_jax.model.llava import LlavaForConditionalGeneration
  from test_train import _llava_batch, _tiny_llava_config
  config, batch = _tiny_llava_config(), _llava_batch()
  results = []
  for chunk in (0, 7):
    graphdef, params, frozen = train.split_model(
        LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    grads, sums = jax.jit(lambda p, g=graphdef, f=frozen, c=chunk: gradmtl_step.task_gradients(
        g, p, f, batch, LAM, accum_steps=accum, mesh=meshes[1], ce_chunk_size=c))(params)
    tx = optax.sgd(1.0)
    step = gradmtl_step.make_gradmtl_train_step(graphdef, tx, mesh=meshes[1], method="mgda",
                                                accum_steps=accum, ce_chunk_size=chunk)
    state = train.init_train_state(params, tx)
    new, metrics, _ = step(state, frozen, batch, jnp.asarray(LAM), np.float32(1.0),
                           gradmtl_step.init_mtl_state("mgda", T))
    results.append((jax.device_get(sums), grads, jax.device_get(metrics), deltas(state, new)))
  (s_full, g_full, m_full, d_full), (s_chunk, g_chunk, m_chunk, d_chunk) = results
  np.testing.assert_allclose(s_chunk.task_sum, s_full.task_sum, rtol=1e-6)
  np.testing.assert_array_equal(s_chunk.task_count, s_full.task_count)
  assert_rel_close(g_chunk, g_full)
  np.testing.assert_allclose(m_chunk["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_chunk["per_task_loss"], m_full["per_task_loss"], rtol=1e-6)
  assert_rel_close(d_chunk, d_full)
