"""The chunked cross-entropy's custom VJP (issue 31): its gradients equal autodiff of the unfused
loss, and under a mesh no device keeps a float32 gradient of the whole LM head.

Every sum is checked with its own random cotangent, so each term of the backward pass (the
weighted NLL sum, the weight sum, the per-task NLL sums) is tested, as is the per-task vjp
vmapped over one-hot cotangents that train/gradmtl_step.py takes. Runs on the 8 simulated CPU
devices of tests/conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.core import loss
from visatb_jax.runtime import cost
from visatb_jax.runtime import sharding

from loss_inputs import random_inputs

TASKS = 3
# Less LLVM optimisation: the programs run once, their compilation is what costs time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _inputs(rows, length, d, v, seed=0):
  """(kernel, bias, hidden, λ), (targets, mask, task ids), and a cotangent for each sum."""
  rng = np.random.default_rng(seed)
  (kernel, bias, hidden), (targets, mask, task_ids, lam) = random_inputs(rng, rows, length, d, v)
  cts = (np.float32(rng.normal()), np.float32(rng.normal()),
         rng.normal(size=TASKS).astype(np.float32), rng.normal(size=TASKS).astype(np.float32))
  return (kernel, bias, hidden, lam), (targets, mask, task_ids), cts


def _sums(params, batch, chunk):
  """The four sums: the chunked loss with `chunk`, the full logits (token_loss) with None."""
  kernel, bias, hidden, lam = params
  head = lambda h: jnp.dot(h, kernel, preferred_element_type=jnp.float32) + bias
  if chunk is None:
    return loss.token_loss(head(hidden), *batch, lam)
  return loss.chunked_token_loss(hidden, head, *batch, lam, chunk_size=chunk)


def _grads(params, batch, cts, chunk):
  """The sums, and the gradient of Σ cotangent · sum w.r.t. kernel, bias, hidden and λ."""
  def f(params):
    sums = _sums(params, batch, chunk)
    return sum(jnp.vdot(c, s) for c, s in zip(cts, sums)), sums
  (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
  return sums, grads


def _task_grads(params, batch, chunk):
  """The per-task gradient step's pattern: one vjp of the per-task NLL sums, vmapped over the T
  one-hot cotangents: [T, *param.shape] per parameter."""
  _, vjp_fn = jax.vjp(lambda p: _sums(p, batch, chunk)[2], params)
  return jax.vmap(vjp_fn)(jnp.eye(TASKS))[0]


def _assert_rel_close(got, want, rtol, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  err = np.max(np.abs(got - want)) / scale
  assert err <= rtol, (what, err)


def _assert_all_close(got, want, rtol=1e-5, zero=()):
  """Gradients of (kernel, bias, hidden, λ) alike; those named in `zero` are exactly zero."""
  names = ("kernel", "bias", "hidden", "lam")
  for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
    if name in zero:
      assert np.all(np.asarray(g) == 0) and np.all(np.asarray(w) == 0), name
      continue
    assert np.any(np.asarray(w) != 0), name  # a zero reference would test nothing
    _assert_rel_close(g, w, rtol, name)


# ------------------------------------------------------------------------------- one device


# 111 = 3 × 37 tokens: blocks of 8 columns need padding, 37 is one block per row, 1000 is capped.
@pytest.mark.parametrize("chunk", [8, 37, 1000])
def test_vjp_equals_autodiff_of_full_logits(chunk):
  params, batch, cts = _inputs(3, 37, 16, 50)
  want_sums, want = jax.jit(_grads, static_argnums=3)(params, batch, cts, None)
  got_sums, got = jax.jit(_grads, static_argnums=3)(params, batch, cts, chunk)
  for g, w in zip(got_sums, want_sums):
    _assert_rel_close(g, w, 1e-5)
  _assert_all_close(got, want)
  # Non-loss tokens: exactly zero hidden gradient, as with the full logits.
  assert np.all(np.asarray(got[2])[batch[1] == 0] == 0)


def test_per_task_vjp_vmapped_equals_autodiff():
  params, batch, _ = _inputs(3, 37, 16, 50, seed=1)
  want = jax.jit(_task_grads, static_argnums=2)(params, batch, None)
  got = jax.jit(_task_grads, static_argnums=2)(params, batch, 8)
  _assert_all_close(got, want, zero=("lam",))  # λ does not enter the per-task sums


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 3), length=st.integers(1, 13), d=st.integers(1, 6),
       v=st.integers(2, 9), chunk=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_vjp_equals_autodiff_random_shapes(rows, length, d, v, chunk, seed):
  params, batch, cts = _inputs(rows, length, d, v, seed)
  grads = jax.jit(_grads, static_argnums=3)
  want_sums, want = grads(params, batch, cts, None)
  got_sums, got = grads(params, batch, cts, chunk)
  for g, w in zip(got_sums, want_sums):
    _assert_rel_close(g, w, 1e-5)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    _assert_rel_close(g, w, 1e-5)


def test_bfloat16_parameters_get_bfloat16_gradients():
  """The head's gradient accumulates in the parameter's dtype, as autodiff's does."""
  params, batch, cts = _inputs(2, 20, 16, 40, seed=2)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params[:3]) + (params[3],)
  _, want = _grads(params, batch, cts, None)
  _, got = jax.jit(_grads, static_argnums=3)(bf16, batch, cts, 16)
  for g, w in zip(jax.tree.leaves(got)[:3], jax.tree.leaves(want)[:3]):
    assert g.dtype == jnp.bfloat16
    _assert_rel_close(g, w, 0.05)


# ----------------------------------------------------------------------------- on a mesh


def _on_mesh(mesh_config, rows, v, fn, *extra):
  """`fn(params, batch, *extra)` jitted under an 8-device mesh, inputs placed as the train step
  places them (rows over the batch axes, the head by the LM head's logical axes, the rest
  replicated)."""
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:8])
  spec = lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))
  d, length = 32, 37
  params_sh = (spec(("embed", "vocab"), (d, v)), spec(("vocab",), (v,)),
               spec(("batch", "length", "embed"), (rows, length, d)), NamedSharding(mesh, P()))
  row = spec(("batch", "length"), (rows, length))
  repl = (NamedSharding(mesh, P()),) * len(extra)
  return jax.jit(sharding.under_mesh(fn, mesh), in_shardings=(params_sh, (row,) * 3) + repl)


@pytest.mark.parametrize("mesh_config, rows, v", [
    ({"fsdp": 8}, 16, 200),                        # the 7B layout; bias [200] sharded too
    ({"data": 2, "fsdp": 4}, 16, 203),             # bias [203]: no dimension 8 divides
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, 200),  # rows over all three axes
])
def test_sharded_vjp_equals_single_device_autodiff(mesh_config, rows, v):
  params, batch, cts = _inputs(rows, 37, 32, v)
  want_sums, want = jax.jit(_grads, static_argnums=3)(params, batch, cts, None)
  want_tasks = jax.jit(_task_grads, static_argnums=2)(params, batch, None)

  step = _on_mesh(mesh_config, rows, v, lambda p, b, c: _grads(p, b, c, 16), cts)
  got_sums, got = step(params, batch, cts)
  for g, w in zip(got_sums, want_sums):
    _assert_rel_close(g, w, 1e-5)
  _assert_all_close(got, want)
  task_step = _on_mesh(mesh_config, rows, v, lambda p, b: _task_grads(p, b, 16))
  _assert_all_close(task_step(params, batch), want_tasks, zero=("lam",))


def test_no_device_keeps_a_float32_gradient_of_the_whole_head():
  """Compiled for 8-way FSDP: the backward loop's state holds the head's gradient as this
  device's 1/8 share [D/8, V], reduce-scattered block by block, and no all-reduce of the head's
  shape runs (autodiff kept a [D, V] accumulator per device and all-reduced it after the loop)."""
  rows, d, v = 16, 32, 200
  params, batch, cts = _inputs(rows, 37, d, v)
  step = _on_mesh({"fsdp": 8}, rows, v, lambda p, b, c: _grads(p, b, c, 16), cts)
  module = cost.parse_hlo(step.lower(params, batch, cts).compile(_FAST_COMPILE).as_text())
  loops = [i for insts in module.computations.values() for i in insts if i.opcode == "while"]
  assert len(loops) == 2  # forward and backward scans

  def head_arrays(shape, dims):
    return sum(1 for dtype, s in cost.array_shapes(shape) if dtype == "f32" and tuple(s) == dims)

  # Each loop holds the gathered head (its weights, not a gradient) and nothing else of its shape.
  assert [head_arrays(i.shape, (d, v)) for i in loops] == [1, 1]
  assert max(head_arrays(i.shape, (d // 8, v)) for i in loops) == 1  # the gradient's share
  counts = cost.execution_counts(module)
  ops = cost.collectives(module, counts)
  for c in ops:
    if c.kind == "all-reduce":
      assert not any(v in dims for _, dims in cost.array_shapes(c.shape)), c.shape
  scatters = [c for c in ops if c.kind == "reduce-scatter" and head_arrays(c.shape, (d // 8, v))]
  assert scatters and all(c.runs == 5 for c in scatters)  # once per block (5 blocks)
