"""Tests of the VITW token loss (docs/method.md §1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.core import loss


def _two_class_logits(probs):
  """[1, L, 2] logits whose class-0 probability is `probs[t]` (nll of target 0 = −log p)."""
  p = np.asarray(probs, np.float64)
  return jnp.asarray(np.stack([np.log(p), np.log1p(-p)], -1)[None], jnp.float32)


def _random_batch(seed, b=4, l=16, v=32, num_tasks=3, present=None):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(b, l, v)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, size=(b, l)), jnp.int32)
  mask = (rng.random((b, l)) < 0.6).astype(np.float32)
  tasks = rng.choice(present if present is not None else num_tasks, size=(b, l))
  task_ids = np.where(mask > 0, tasks, -1).astype(np.int32)
  return logits, targets, jnp.asarray(mask), jnp.asarray(task_ids)


def test_hand_computed_two_tasks():
  # Tokens: two of task 0 with p = 1/2 (nll ln 2 each), one of task 1 with p = 1/4
  # (nll 2 ln 2), and a padding token with NaN logits that must not leak anywhere.
  logits = _two_class_logits([0.5, 0.5, 0.25, 0.5]).at[0, 3].set(jnp.nan)
  targets = jnp.zeros((1, 4), jnp.int32)
  mask = jnp.array([[1, 1, 1, 0]], jnp.float32)
  task_ids = jnp.array([[0, 0, 1, -1]], jnp.int32)
  lam = jnp.array([2.0, 0.5], jnp.float32)
  weighted, weight, task_sum, task_count = loss.token_loss(logits, targets, mask, task_ids, lam)
  ln2 = math.log(2)
  # weighted = 2·ln2 + 2·ln2 + 0.5·2ln2 = 5 ln2;  weight = 2 + 2 + 0.5 = 4.5
  np.testing.assert_allclose(weighted, 5 * ln2, rtol=1e-6)
  np.testing.assert_allclose(weight, 4.5, rtol=0)
  # L_VITW = 5 ln2 / 4.5 = (10/9) ln2 ≈ 0.7702, whereas plain mean CE = 4 ln2 / 3 ≈ 0.9242.
  np.testing.assert_allclose(weighted / weight, 10 / 9 * ln2, rtol=1e-6)
  # Per task, unweighted: task 0 = ln2 + ln2, task 1 = 2 ln2; counts 2 and 1.
  np.testing.assert_allclose(task_sum, [2 * ln2, 2 * ln2], rtol=1e-6)
  np.testing.assert_array_equal(task_count, [2.0, 1.0])
  np.testing.assert_allclose(loss.per_task_mean(task_sum, task_count), [ln2, 2 * ln2], rtol=1e-6)


def test_minus_one_task_id_never_indexes_last_task():
  # A −1 task id with a (contract-violating) nonzero mask must get weight 0,
  # not wrap around to lam[-1].
  logits = _two_class_logits([0.5, 0.5])
  mask = jnp.ones((1, 2), jnp.float32)
  task_ids = jnp.array([[0, -1]], jnp.int32)
  _, weight, _, task_count = loss.token_loss(
      logits, jnp.zeros((1, 2), jnp.int32), mask, task_ids, jnp.array([1.0, 7.0]))
  assert float(weight) == 1.0
  np.testing.assert_array_equal(task_count, [1.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_jit", [False, True])
def test_lambda_one_is_mean_ce_bit_for_bit(dtype, use_jit):
  logits, targets, mask, task_ids = _random_batch(0)
  logits = logits.astype(dtype)

  def vitw(logits, targets, mask, task_ids):
    weighted, weight, _, _ = loss.token_loss(logits, targets, mask, task_ids, jnp.ones(3))
    return weighted / weight

  def mean_ce(logits, targets, mask):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(nll * mask) / jnp.sum(mask)

  if use_jit:
    vitw, mean_ce = jax.jit(vitw), jax.jit(mean_ce)
  got, want = vitw(logits, targets, mask, task_ids), mean_ce(logits, targets, mask)
  assert got.dtype == jnp.float32
  assert jnp.array_equal(got, want), (float(got), float(want))


def test_tla_equals_mean_of_per_task_means():
  # Task 2 of 3 is absent: it must get a finite λ and drop out of the mean.
  logits, targets, mask, task_ids = _random_batch(1, present=[0, 1])
  lam = loss.tla_lambda(task_ids, mask, 3)
  assert np.all(np.isfinite(lam)) and float(lam[2]) == 0.0
  weighted, weight, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam)
  # By hand, in float64: the mean over present tasks of each task's mean token loss.
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets), np.float64)
  ids, m = np.asarray(task_ids), np.asarray(mask)
  means = [nll[(ids == k) & (m > 0)].mean() for k in (0, 1)]
  np.testing.assert_allclose(weighted / weight, np.mean(means), rtol=1e-5)
  # λ_k is exactly 1 / count_k.
  np.testing.assert_allclose(lam[:2], [1 / np.sum((ids == k) & (m > 0)) for k in (0, 1)], rtol=1e-7)


def test_per_task_mean_is_nan_free():
  out = loss.per_task_mean(jnp.array([3.0, 0.0, 5.0]), jnp.array([2.0, 0.0, 0.0]))
  np.testing.assert_array_equal(out, [1.5, 0.0, 0.0])


def test_per_task_nan_stays_in_its_task():
  # Task 1's tokens have NaN logits: its sum is NaN, task 0's stays finite (divergence reports).
  logits = _two_class_logits([0.5, 0.5, 0.5]).at[0, 2].set(jnp.nan)
  _, _, task_sum, _ = loss.token_loss(
      logits, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)), jnp.array([[0, 0, 1]]),
      jnp.ones(2))
  assert np.isfinite(task_sum[0]) and np.isnan(task_sum[1])


def test_sums_add_over_row_splits():
  # The contract that makes global normalisation possible: the sums of two halves of a
  # batch add up to the sums of the whole batch.
  logits, targets, mask, task_ids = _random_batch(2)
  lam = jnp.array([2.0, 0.5, 1.0])
  whole = loss.token_loss(logits, targets, mask, task_ids, lam)
  halves = [loss.token_loss(logits[s], targets[s], mask[s], task_ids[s], lam)
            for s in (slice(0, 2), slice(2, 4))]
  for w, a, b in zip(whole, *halves):
    np.testing.assert_allclose(w, a + b, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 3))
def test_vitw_invariant_to_lambda_scale(scale, seed):
  logits, targets, mask, task_ids = _random_batch(seed)
  lam = jnp.array([2.0, 0.5, 1.0])
  w1, s1, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam)
  w2, s2, _, _ = loss.token_loss(logits, targets, mask, task_ids, lam * scale)
  np.testing.assert_allclose(w1 / s1, w2 / s2, rtol=1e-5)


# ------------------------------------------------------------------ chunked cross-entropy


def _hidden_batch(seed, b=3, l=37, d=16, v=50, num_tasks=3):
  """Hidden states, a head kernel and a batch with −1 task ids and whole padding rows."""
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, size=(b, l)), jnp.int32)
  mask = (rng.random((b, l)) < 0.6).astype(np.float32)
  mask[-1, l // 2:] = 0  # a padded tail
  task_ids = np.where(mask > 0, rng.integers(0, num_tasks, size=(b, l)), -1).astype(np.int32)
  return hidden, kernel, targets, jnp.asarray(mask), jnp.asarray(task_ids)


def _sums(chunk_size, kernel, hidden, targets, mask, task_ids, lam):
  """The four sums, full logits when chunk_size is None; the weighted sum is differentiated."""
  head = lambda h: h @ kernel  # closes over the differentiated kernel
  if chunk_size is None:
    out = loss.token_loss(head(hidden), targets, mask, task_ids, lam)
  else:
    out = loss.chunked_token_loss(hidden, head, targets, mask, task_ids, lam, chunk_size=chunk_size)
  return out[0], out


def _assert_rel_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.max(np.abs(want)), 1e-30)
  assert np.max(np.abs(got - want)) / scale <= rtol, np.max(np.abs(got - want)) / scale


# 111 = 3 × 37 tokens: 37 and 111 divide it, 8 and 50 do not, 1000 is capped at the token count.
@pytest.mark.parametrize("chunk_size", [8, 37, 50, 111, 1000])
def test_chunked_equals_token_loss_values_and_grads(chunk_size):
  hidden, kernel, targets, mask, task_ids = _hidden_batch(0)
  lam = jnp.array([2.0, 0.5, 1.0])
  grad = jax.value_and_grad(_sums, argnums=(1, 2), has_aux=True)
  (_, want), (want_dk, want_dh) = grad(None, kernel, hidden, targets, mask, task_ids, lam)
  (_, got), (got_dk, got_dh) = jax.jit(grad, static_argnums=0)(
      chunk_size, kernel, hidden, targets, mask, task_ids, lam)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float32
    _assert_rel_close(g, w, 1e-5)
  np.testing.assert_array_equal(got[1], want[1])  # weights: no logits involved, exact
  np.testing.assert_array_equal(got[3], want[3])
  assert float(want[1]) > 0 and np.all(np.asarray(want[3]) > 0)  # every task present
  _assert_rel_close(got_dk, want_dk, 1e-5)
  _assert_rel_close(got_dh, want_dh, 1e-5)
  # Non-loss tokens get exactly zero gradient, as with the full logits.
  assert np.all(np.asarray(got_dh)[np.asarray(mask) == 0] == 0)


def test_chunked_grads_through_nnx_module_closure():
  # logits_fn is an NNX module merged from the differentiated state, as `model.logits` is
  # in the train step: checkpoint + scan must carry its closed-over parameters' gradients.
  hidden, _, targets, mask, task_ids = _hidden_batch(1)
  head = nnx.Linear(16, 50, use_bias=True, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(head)
  lam = jnp.array([1.0, 3.0, 0.25])

  def f(state, hidden, chunk_size):
    module = nnx.merge(graphdef, state)
    if chunk_size is None:
      out = loss.token_loss(module(hidden), targets, mask, task_ids, lam)
    else:
      out = loss.chunked_token_loss(hidden, module, targets, mask, task_ids, lam,
                                    chunk_size=chunk_size)
    return out[0]

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
  want, (want_ds, want_dh) = grad(state, hidden, None)
  got, (got_ds, got_dh) = grad(state, hidden, 16)
  _assert_rel_close(got, want, 1e-5)
  _assert_rel_close(got_dh, want_dh, 1e-5)
  for g, w in zip(jax.tree.leaves(got_ds), jax.tree.leaves(want_ds)):
    assert np.any(np.asarray(w) != 0)
    _assert_rel_close(g, w, 1e-5)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_chunked_grads_match_full_model():
  # Whole LLaVA (tied embeddings: the table is both the input embedding and the head that
  # logits_fn closes over): hidden_states + chunked loss == model(...) + token_loss.
  model = tiny_tied_llava()
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 64, (2, 12)), jnp.int32)
  targets = jnp.roll(ids, -1, axis=1)
  mask = jnp.asarray((rng.random((2, 12)) < 0.7).astype(np.float32))
  task_ids = jnp.where(mask > 0, jnp.asarray(rng.integers(0, 2, (2, 12))), -1)
  lam = jnp.array([1.5, 0.5])

  def f(params, chunked):
    m = nnx.merge(graphdef, params)
    if chunked:
      return loss.chunked_token_loss(m.hidden_states(ids), m.logits, targets, mask, task_ids,
                                     lam, chunk_size=5)[0]
    return loss.token_loss(m(ids), targets, mask, task_ids, lam)[0]

  grad = jax.jit(jax.value_and_grad(f), static_argnums=1)
  (want, want_g), (got, got_g) = grad(params, False), grad(params, True)
  _assert_rel_close(got, want, 1e-5)
  pairs = list(zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
  nonzero = [(g, w) for g, w in pairs if np.any(np.asarray(w) != 0)]
  assert len(nonzero) >= 10  # the language model's and the (tied) table's, not the vision tower's
  for g, w in nonzero:
    _assert_rel_close(g, w, 1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_chunked_lambda_one_is_mean_ce(use_jit):
  hidden, kernel, targets, mask, task_ids = _hidden_batch(2)

  def vitw(hidden):
    weighted, weight, _, _ = loss.chunked_token_loss(
        hidden, lambda h: h @ kernel, targets, mask, task_ids, jnp.ones(3), chunk_size=16)
    return weighted / weight

  def mean_ce(hidden):
    nll = optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, targets)
    return jnp.sum(nll * mask) / jnp.sum(mask)

  if use_jit:
    vitw, mean_ce = jax.jit(vitw), jax.jit(mean_ce)
  np.testing.assert_allclose(vitw(hidden), mean_ce(hidden), rtol=1e-6)


def test_chunked_non_loss_nan_does_not_poison_sums():
  # NaN hidden states on a padding token and on a −1 token: every sum stays finite and
  # equal to the sums without them; a NaN on a task-1 loss token stays in task 1.
  hidden, kernel, targets, mask, task_ids = _hidden_batch(3)
  lam = jnp.array([2.0, 0.5, 1.0])
  head = lambda h: h @ kernel
  clean = loss.chunked_token_loss(hidden, head, targets, mask, task_ids, lam, chunk_size=8)
  off = np.argwhere(np.asarray(mask) == 0)[:2]
  dirty = hidden.at[tuple(off.T)].set(jnp.nan)
  for got, want in zip(loss.chunked_token_loss(dirty, head, targets, mask, task_ids, lam,
                                               chunk_size=8), clean):
    np.testing.assert_array_equal(got, want)
  t1 = tuple(np.argwhere(np.asarray(task_ids) == 1)[0])
  _, _, task_sum, _ = loss.chunked_token_loss(
      hidden.at[t1].set(jnp.nan), head, targets, mask, task_ids, lam, chunk_size=8)
  assert np.isnan(task_sum[1]) and np.isfinite(task_sum[0]) and np.isfinite(task_sum[2])


def test_chunked_rejects_bad_input():
  hidden, kernel, targets, mask, task_ids = _hidden_batch(0)
  head = lambda h: h @ kernel
  with pytest.raises(ValueError, match="chunk_size"):
    loss.chunked_token_loss(hidden, head, targets, mask, task_ids, jnp.ones(3), chunk_size=0)
  with pytest.raises(ValueError, match="does not match targets"):
    loss.chunked_token_loss(hidden[:, 1:], head, targets, mask, task_ids, jnp.ones(3))


def test_chunked_compiled_memory_is_a_fraction_of_full_logits():
  # Compiled, never run: loss+grad temporaries of 4096 tokens × 8192 vocab. Full logits need
  # two [tokens, V] float32 buffers (128 MiB); chunks of 256 need O(256 × V).
  tokens, d, v = 4096, 32, 8192
  spec = jax.ShapeDtypeStruct
  args = (spec((d, v), jnp.float32), spec((2, tokens // 2, d), jnp.float32),
          spec((2, tokens // 2), jnp.int32), spec((2, tokens // 2), jnp.float32),
          spec((2, tokens // 2), jnp.int32), spec((3,), jnp.float32))

  def temp_bytes(chunk_size):
    grad = jax.grad(lambda *a: _sums(chunk_size, *a)[0], argnums=(0, 1))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(None), temp_bytes(256)
  assert full >= tokens * v * 4  # at least the logits themselves
  assert chunked <= full / 8, (chunked, full)


def tiny_tied_llava():
  """A LLaVA of a few thousand parameters whose LM head is the input embedding table."""
  from visatb_jax.model import config as model_config
  from visatb_jax.model import llava
  cfg = model_config.LlavaConfig.from_dict({
      "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                 "num_hidden_layers": 1, "num_attention_heads": 2},
      "text": {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "tie_word_embeddings": True},
      "image_token_id": 4})
  return llava.LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
