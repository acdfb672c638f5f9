"""The chunked cross-entropy on a mesh: same sums and gradients as on one device, and no
collective per chunk (the 7B dry run's largest avoidable collective, issue #20) but the
reduce-scatter of the head's gradient that keeps 1/n of it per device (issue 31,
tests/core/test_loss_vjp.py).

Runs on the 8 simulated CPU devices of tests/conftest.py. Under a mesh `chunked_token_loss`
scans each device's own rows inside a shard_map; before, it scanned over chunks of the
flattened [B, L] tokens, so every device walked every chunk and XLA all-reduced each chunk's
[tokens, V] logits, and a scan keeping the sharded rows still all-reduced the head's [D, V]
weight gradient once per chunk.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.core import loss
from visatb_jax.runtime import cost
from visatb_jax.runtime import sharding

from loss_inputs import random_inputs

# 37 columns: blocks of 8 columns leave 3 of padding. V is distinctive, so that a collective
# carrying the vocabulary is recognised by its shape.
ROWS, LEN, D, V, TASKS = 16, 37, 32, 200, 3
CHUNK = 16  # tokens per block and device: 2 rows x 8 columns on 8 devices
# Less LLVM optimisation: the programs run once, their compilation is what costs time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _inputs(rows=ROWS, seed=0):
  return random_inputs(np.random.default_rng(seed), rows, LEN, D, V)


def _loss_and_grads(params, batch):
  """The four sums and d(weighted sum) / d(kernel, bias, hidden); the head closes over the
  differentiated kernel and bias, as `model.logits` closes over the model's."""
  def weighted(params):
    kernel, bias, hidden = params
    head = lambda h: jnp.dot(h, kernel, preferred_element_type=jnp.float32) + bias
    sums = loss.chunked_token_loss(hidden, head, *batch, chunk_size=CHUNK)
    return sums[0], sums
  (_, sums), grads = jax.value_and_grad(weighted, has_aux=True)(params)
  return sums, grads


def _shardings(mesh, rows):
  """FSDP layout of the train step: rows over the batch axes, the head as the LM head's rules
  shard it (model dimension over fsdp, vocabulary over tensor)."""
  spec = lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))
  params = (spec(("embed", "vocab"), (D, V)), spec(("vocab",), (V,)),
            spec(("batch", "length", "embed"), (rows, LEN, D)))
  row = spec(("batch", "length"), (rows, LEN))
  return params, (row, row, row, NamedSharding(mesh, P()))


def _compiled(mesh, rows=ROWS):
  params_sh, batch_sh = _shardings(mesh, rows)
  step = jax.jit(sharding.under_mesh(_loss_and_grads, mesh), in_shardings=(params_sh, batch_sh),
                 out_shardings=(NamedSharding(mesh, P()), params_sh))
  params, batch = _inputs(rows)
  return step.lower(params, batch).compile(_FAST_COMPILE), params, batch


def _assert_rel_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  assert np.max(np.abs(got - want)) / scale <= rtol, np.max(np.abs(got - want)) / scale


@pytest.mark.parametrize("mesh_config, rows", [
    ({"fsdp": 8}, ROWS),                             # the 7B layout: rows over all 8 devices
    ({"data": 2, "fsdp": 2, "tensor": 2}, ROWS),     # rows over data x fsdp, split over tensor too
    ({"data": 2, "fsdp": 4}, 12),                    # 12 rows: only `data` divides them
])
def test_sharded_equals_single_device(mesh_config, rows):
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:8])
  compiled, params, batch = _compiled(mesh, rows)
  params_sh, batch_sh = _shardings(mesh, rows)
  got_sums, got_grads = compiled(jax.device_put(params, params_sh), jax.device_put(batch, batch_sh))
  # Reference: one device, no mesh, and the full logits (token_loss), not the chunked loss.
  def reference(params, batch):
    kernel, bias, hidden = params
    def weighted(params):
      kernel, bias, hidden = params
      sums = loss.token_loss(hidden @ kernel + bias, *batch)
      return sums[0], sums
    (_, sums), grads = jax.value_and_grad(weighted, has_aux=True)(params)
    return sums, grads
  want_sums, want_grads = jax.jit(reference)(params, batch)
  for g, w in zip(got_sums, want_sums):
    _assert_rel_close(g, w, 1e-5)
  np.testing.assert_array_equal(got_sums[1], want_sums[1])  # weights: no logits involved
  np.testing.assert_array_equal(got_sums[3], want_sums[3])
  assert np.all(np.asarray(want_sums[3]) > 0)  # every task present
  for g, w in zip(got_grads, want_grads):
    _assert_rel_close(g, w, 1e-5)
  mask = batch[1]
  assert np.all(np.asarray(got_grads[2])[mask == 0] == 0)  # non-loss tokens: zero gradient


def test_no_collective_per_chunk_and_none_of_logits_size():
  """Compiled for 8-way FSDP: every collective runs once per call except the reduce-scatter of
  each block's head gradient (the custom VJP's, issue 31: each device keeps its 1/8 share, so
  none holds the whole gradient), and the only arrays they move with the vocabulary dimension
  are the head's parameters (kernel [D, V], bias [V]: gathered, their gradients reduced), never
  logits ([rows or tokens, V])."""
  mesh = sharding.make_mesh({"fsdp": 8}, jax.devices()[:8])
  compiled, _, _ = _compiled(mesh)
  module = cost.parse_hlo(compiled.as_text())
  counts = cost.execution_counts(module)
  ops = cost.collectives(module, counts)
  assert ops, "expected the head's gather and the gradient reduction"
  shares = ((D // 8, V), (V // 8,))
  for c in ops:
    per_block = c.kind == "reduce-scatter" and all(
        dims in shares for _, dims in cost.array_shapes(c.shape))
    assert c.runs == (5 if per_block else 1), (c.kind, c.shape, c.runs, c.op_name)
    for dtype, dims in cost.array_shapes(c.shape):
      if V in dims:
        assert dims in ((D, V), (V,)) + shares, (c.kind, c.shape, c.op_name)
  head_bytes = (D + 1) * V * 4
  with_vocab = [c for c in ops if any(V in dims for _, dims in cost.array_shapes(c.shape))]
  assert sum(c.buffer_bytes for c in with_vocab) <= 3 * head_bytes  # gathers + 1 reduction
  assert sum(c.buffer_bytes for c in ops) <= 3 * head_bytes + 1024

  # Each device computes its own rows' logits only: the head's matmuls (forward, recomputed
  # forward, the two gradients) cover 1/8 of the padded tokens, 5 blocks of 2 rows x 8 columns.
  loops = [i for insts in module.computations.values() for i in insts if i.opcode == "while"]
  assert sorted(cost.trip_count(i) for i in loops) == [5, 5]  # forward and backward scans
  padded_tokens = ROWS * 40
  flops = cost.matmul_flops(module, counts)
  assert flops == 4 * 2 * (padded_tokens // 8) * D * V, flops


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_real_model_head_on_a_mesh():
  """`model.logits` of a tiny LLaVA with tied embeddings (an NNX module closing over the
  embedding table, FSDP-sharded) through the shard_map: the same loss and gradients as the
  full logits on one device."""
  from flax import nnx
  from test_loss import tiny_tied_llava
  graphdef, params = nnx.split(tiny_tied_llava())
  rng = np.random.default_rng(0)
  rows, length = 4, 12
  ids = jnp.asarray(rng.integers(5, 64, (rows, length)), jnp.int32)
  mask = jnp.asarray((rng.random((rows, length)) < 0.7).astype(np.float32))
  batch = (jnp.roll(ids, -1, axis=1), mask,
           jnp.where(mask > 0, jnp.asarray(rng.integers(0, 2, (rows, length))), -1),
           jnp.array([1.5, 0.5]))

  def f(params, ids, batch, chunked):
    m = nnx.merge(graphdef, params)
    if chunked:
      return loss.chunked_token_loss(m.hidden_states(ids), m.logits, *batch, chunk_size=10)[0]
    return loss.token_loss(m(ids), *batch)[0]

  want, want_g = jax.jit(jax.value_and_grad(f), static_argnums=3)(params, ids, batch, False)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
  row = sharding.batch_sharding(mesh)
  in_sh = (sharding.param_shardings(params, mesh), row,
           (row, row, row, NamedSharding(mesh, P())))
  step = jax.jit(sharding.under_mesh(jax.value_and_grad(f), mesh), static_argnums=3,
                 in_shardings=in_sh)
  got, got_g = step(*jax.device_put((params, ids, batch), in_sh), True)
  _assert_rel_close(got, want, 1e-5)
  pairs = list(zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
  nonzero = [(g, w) for g, w in pairs if np.any(np.asarray(w) != 0)]
  assert len(nonzero) >= 10  # the language model's and the (tied) table's
  for g, w in nonzero:
    _assert_rel_close(g, w, 1e-5)
