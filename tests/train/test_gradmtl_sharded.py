"""The gradient-method step with its per-task gradients sharded like the parameters (FSDP and
tensor axes on the 8 simulated CPU devices of tests/conftest.py), the leafwise `combine`, and
the memory check made before any stage (`gradmtl_step.check_memory`, config.build)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from visatb_jax import train
from visatb_jax.core import gradmtl
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import runner
from visatb_jax.pipeline.errors import ConfigError
from visatb_jax.runtime import sharding
from visatb_jax.train import gradmtl_step

from conftest import micro_config
from test_train import TinyModel, assert_rel_close, grads_of, make_batch  # noqa: E402

LAM = np.array([2.0, 0.5], np.float32)


def _step(mesh, method, *, sharded, accum_steps=1):
  """One step of `method` from the same model, the state placed by the logical-axis rules
  (`sharded`) or replicated: (old state, new state, metrics, mtl state), all on the host."""
  tx = optax.sgd(1.0)  # the update is exactly −direction
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  state = train.init_train_state(params, tx)
  state_sh = sharding.param_shardings(state, mesh) if sharded else None
  frozen_sh = sharding.param_shardings(frozen, mesh) if sharded else None
  step = gradmtl_step.make_gradmtl_train_step(
      graphdef, tx, mesh=mesh, method=method, accum_steps=accum_steps,
      state_sharding=state_sh, frozen_sharding=frozen_sh)
  place = ((lambda x, s: jax.device_put(x, s)) if sharded
           else (lambda x, s: sharding.replicate(x, mesh)))
  mtl = sharding.replicate(gradmtl_step.init_mtl_state(method, len(LAM), seed=1), mesh)
  new, metrics, mtl = step(place(state, state_sh), place(frozen, frozen_sh),
                           sharding.shard_batch(make_batch(), mesh), jnp.asarray(LAM),
                           np.float32(1.0), mtl)
  if sharded:  # the parameters really are split over the devices
    assert any(x.sharding.shard_shape(x.shape) != x.shape for x in jax.tree.leaves(new.params))
  return state, jax.device_get(new), jax.device_get(metrics), jax.device_get(mtl)


@pytest.mark.parametrize("method", ["nash", "pcgrad", "graddrop", "imgrad"])
@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_fsdp_sharded_step_equals_the_unsharded_one(meshes, method):
  old1, new1, m1, s1 = _step(meshes[1], method, sharded=False)
  fsdp = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  old8, new8, m8, s8 = _step(fsdp, method, sharded=True, accum_steps=2)
  assert_rel_close(grads_of(old8, new8), grads_of(old1, new1), tol=1e-4)
  for key in ("loss", "per_task_loss", "grad_norm", "mtl_weights"):
    assert_rel_close(m8[key], m1[key], tol=1e-4)
  np.testing.assert_array_equal(s8.key, s1.key)
  assert_rel_close(s8.alpha, s1.alpha, tol=1e-4)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_multi_axis_sharded_step_equals_the_unsharded_one(meshes):
  old1, new1, m1, _ = _step(meshes[1], "mgda", sharded=False)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  old, new, m, _ = _step(mesh, "mgda", sharded=True)
  assert_rel_close(grads_of(old, new), grads_of(old1, new1), tol=1e-4)
  assert_rel_close(m["mtl_weights"], m1["mtl_weights"], tol=1e-4)


def test_per_task_gradients_keep_the_parameters_layout(meshes):
  """`task_gradients` under the step's constraint: every [T, ...] leaf split like its parameter,
  the task axis whole (no device holds T times a parameter)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  graphdef, params, frozen = train.split_model(TinyModel(nnx.Rngs(0)))
  state = train.init_train_state(params, optax.sgd(1.0))
  state_sh = sharding.param_shardings(state, mesh)
  task_sh = gradmtl_step._task_axis_shardings(state_sh, mesh)  # pylint: disable=protected-access
  batch = sharding.shard_batch(make_batch(), mesh)
  fn = jax.jit(sharding.under_mesh(lambda p, f, b: gradmtl_step.task_gradients(
      graphdef, p, f, b, jnp.asarray(LAM), accum_steps=2, mesh=mesh, grad_sharding=task_sh)[0],
      mesh))
  grads = fn(jax.device_put(params, state_sh.params), jax.device_put(frozen, sharding.replicated(
      mesh)), batch)
  split = 0
  for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(state_sh.params), strict=True):
    assert g.shape[0] == len(LAM)
    assert g.sharding.shard_shape(g.shape) == (len(LAM), *s.shard_shape(g.shape[1:]))
    split += s.shard_shape(g.shape[1:]) != g.shape[1:]
  assert split  # some leaf is actually split


# ------------------------------------------------------------------------ leafwise combine


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 4, 5)).astype(np.float32)),
          "b": jnp.asarray(rng.normal(size=(3, 5)).astype(np.float32) * 3.0),
          "s": jnp.asarray(rng.normal(size=(3,)).astype(np.float32))}


@pytest.mark.parametrize("method", sorted(gradmtl.METHODS))
def test_leafwise_combine_equals_the_flattened_combine(method):
  """`combine` on a tree with row scales and an inactive task: what the step did before, the
  flattened [T, P] matrix scaled row by row, the method on its active rows."""
  tree = _tree(1)
  scale = np.array([0.5, 7.0, 2.0], np.float32)
  active = np.array([True, False, True])
  state = gradmtl_step.init_mtl_state(method, 3, seed=4)
  d, w, new_state = jax.jit(lambda t, s, st, m=method: gradmtl_step.combine(
      t, active, m, mtl_state=st, row_scale=s))(tree, scale, state)
  G = np.asarray(gradmtl.flatten_task_grads(tree)) * scale[:, None]
  sub = G[active]
  _, rng = jax.random.split(jax.random.wrap_key_data(state.key))
  kwargs = {"rng": rng} if method in ("pcgrad", "graddrop") else {}
  if method == "nash":
    kwargs["prev_alpha"] = state.alpha[active]
  d_flat = np.asarray(jax.flatten_util.ravel_pytree(d)[0])
  k = gradmtl_step.direction_scale(method, None, 2)
  assert w[1] == 0.0
  if method == "graddrop":
    # Masked leaf by leaf with the same draws: the flattened mask over those draws.
    u = np.asarray(jax.flatten_util.ravel_pytree(
        gradmtl.graddrop_uniforms(rng, tree))[0])
    keep = (u < _purity(sub))[None]
    kept = np.where(sub > 0, keep, (sub < 0) & ~keep) * sub  # the inactive row takes no part
    np.testing.assert_allclose(d_flat, kept.sum(0), rtol=1e-5, atol=1e-6)
    return
  d_ref, w_ref = jax.jit(gradmtl.METHODS[method])(jnp.asarray(sub), **kwargs)
  np.testing.assert_allclose(w[active], k * np.asarray(w_ref), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(d_flat, k * np.asarray(d_ref), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(d_flat, w @ G, rtol=2e-4, atol=1e-5)
  if method == "nash":
    np.testing.assert_allclose(new_state.alpha[active], w_ref, rtol=1e-6)
    assert new_state.alpha[1] == state.alpha[1]


def _purity(G):
  pos, neg = np.maximum(G, 0).sum(0), np.maximum(-G, 0).sum(0)
  mass = pos + neg
  return np.where(mass > 0, pos / np.where(mass > 0, mass, 1), 0.5)


# ------------------------------------------------------------------------- memory check


def test_memory_need_arithmetic():
  need = gradmtl_step.memory_need(num_tasks=8, trainable=7_000_000_000, frozen=300_000_000,
                                  param_bytes=4, shards=64)
  assert need["per_task_gradients"] == 8 * 7e9 * 4 / 64  # 3.5 GB
  assert need["model_state"] == (3 * 7e9 + 3e8) * 4 / 64
  assert need["total"] == need["per_task_gradients"] + need["model_state"]


def test_parameter_counts_are_the_models():
  config = micro_config()
  trainable, frozen, param_bytes = gradmtl_step.parameter_counts(config.model, config.train)
  from visatb_jax.model import factory
  model = factory.build_model(config.model, factory.model_config(config.model))
  _, params, rest = train.split_model(model)
  assert trainable == sum(x.size for x in jax.tree.leaves(params)) > 0
  assert frozen == sum(x.size for x in jax.tree.leaves(rest)
                       if jnp.issubdtype(x.dtype, jnp.floating)) > 0
  assert param_bytes == 4


FAKE_7B = (7_000_000_000, 300_000_000, 4)


def _gradient_config(method="imgrad", **mesh):
  config = micro_config()
  config.weighting = method
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
  return config


def test_config_check_refuses_per_task_gradients_that_cannot_fit(monkeypatch):
  monkeypatch.setattr(gradmtl_step, "parameter_counts", lambda model, train: FAKE_7B)
  T = len(micro_config().task_order)
  with pytest.raises(ConfigError) as e:
    config_lib.build(_gradient_config(data=8), num_devices=8)  # nothing sharded: 140 GB
  line = str(e.value)
  assert "\n" not in line and line.startswith("config.weighting: gradient method 'imgrad'")
  assert (f"of {T} tasks take {T * 7e9 * 4 / 1e9:.1f} GB per device on 8 device(s) "
          f"({T} x 7,000,000,000 trainable parameters x 4 bytes / 1 FSDP x tensor shards)") in line
  assert "more than the 80 GB of one device" in line
  # The same model over 8 FSDP shards fits: 17.5 GB of gradients + 10.7 GB of state.
  config_lib.build(_gradient_config(fsdp=8), num_devices=8)
  # A baseline is named as one.
  config = _gradient_config(data=8)
  config.weighting, config.baselines = "visatb", ("ew", "graddrop")
  with pytest.raises(ConfigError, match=r"^config.baselines: gradient method 'graddrop'"):
    config_lib.build(config, num_devices=8)
  # No gradient method, or no device count: nothing to check.
  config.baselines = ("ew",)
  config_lib.build(config, num_devices=8)
  config_lib.build(_gradient_config(data=8))


def test_launch_refuses_before_any_stage(monkeypatch, tmp_path):
  monkeypatch.setattr(gradmtl_step, "parameter_counts", lambda model, train: FAKE_7B)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="gradient method 'imgrad'"):
    runner.run(_gradient_config(data=8), str(workdir), num_devices=8)
  assert not os.path.exists(workdir) or not os.listdir(workdir)
