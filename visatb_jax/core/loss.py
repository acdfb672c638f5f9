"""VITW: token-level task-weighted cross-entropy (docs/method.md §1).

Every function here returns *sums*, never means: the train step divides the weighted
NLL sum by the weight sum exactly once, over the global batch of one optimizer step
(all devices, all accumulation micro-batches). Dividing per shard or per micro-batch
would silently reweight the tokens, which is the bug this module exists to avoid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def _valid(loss_mask: jax.Array, task_ids: jax.Array) -> jax.Array:
  """Tokens that carry loss: masked in and with a real task id."""
  return (loss_mask > 0) & (task_ids >= 0)


def _task_onehot(task_ids: jax.Array, valid: jax.Array, num_tasks: int) -> jax.Array:
  """Bool [..., T]: token belongs to task k and carries loss (−1 never matches)."""
  return (task_ids[..., None] == jnp.arange(num_tasks)) & valid[..., None]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token −log p(target), float32 [B, L], whatever the logits dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)


def token_loss(
    logits: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    task_ids: jax.Array,
    lam: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """VITW numerator and denominator, plus per-task sums; nothing is divided.

  Args:
    logits: [B, L, V], any float dtype (log-softmax is taken in float32).
    targets: int [B, L], the token predicted at each position.
    loss_mask: [B, L], 1 on assistant tokens (already shifted), 0 elsewhere.
    task_ids: int [B, L], task index where `loss_mask` is 1, −1 elsewhere.
    lam: float32 [T], the weight of each task.

  Returns:
    weighted_nll_sum: Σ λ_task(t)·mask(t)·nll(t), float32 scalar.
    weight_sum: Σ λ_task(t)·mask(t), float32 scalar.
    per_task_nll_sum: float32 [T], unweighted Σ nll over each task's tokens.
    per_task_count: float32 [T], Σ mask over each task's tokens.
  """
  lam = jnp.asarray(lam, jnp.float32)
  num_tasks = lam.shape[0]
  nll = token_nll(logits, targets)
  mask = loss_mask.astype(jnp.float32)
  valid = _valid(loss_mask, task_ids)
  # Clip the index so that −1 never wraps around to the last task; `where` then drops it.
  lam_tok = lam[jnp.clip(task_ids, 0, num_tasks - 1)]
  weight = jnp.where(valid, lam_tok * mask, 0.0)
  # `where` rather than a product so that a non-finite logit on a non-loss token (padding)
  # cannot poison the sum. With λ = 1 and a 0/1 mask this is elementwise identical to
  # nll * mask, hence bit-for-bit the plain masked-mean CE after the single division.
  weighted_nll_sum = jnp.sum(jnp.where(valid, nll * weight, 0.0))
  weight_sum = jnp.sum(weight)
  onehot = _task_onehot(task_ids, valid, num_tasks)
  # Per task via a masked broadcast, not a one-hot matmul: NaN · 0 would leak a
  # diverging task's NaN into every other task's sum and hide which one diverged.
  per_task_nll_sum = jnp.sum(
      jnp.where(onehot, (nll * mask)[..., None], 0.0), axis=tuple(range(nll.ndim)))
  per_task_count = jnp.sum(
      jnp.where(onehot, mask[..., None], 0.0), axis=tuple(range(nll.ndim)))
  return weighted_nll_sum, weight_sum, per_task_nll_sum, per_task_count


def chunked_token_loss(
    hidden: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    loss_mask: jax.Array,
    task_ids: jax.Array,
    lam: jax.Array,
    *,
    chunk_size: int = 1024,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`token_loss(logits_fn(hidden), ...)` without ever holding the [tokens, V] logits.

  Tokens are flattened, padded to a multiple of the chunk (padding carries no loss) and
  scanned chunk by chunk; each chunk is rematerialised in the backward pass, so the
  logits live only one chunk at a time: peak memory O(chunk_size · V), not O(tokens · V).
  Gradients flow to `hidden` and to whatever `logits_fn` closes over (the head kernel).

  Args:
    hidden: [B, L, D] final-norm hidden states, any float dtype.
    logits_fn: [n, D] -> float32 [n, V], e.g. `model.logits`.
    targets: int [B, L], the token predicted at each position.
    loss_mask: [B, L], 1 on assistant tokens (already shifted), 0 elsewhere.
    task_ids: int [B, L], task index where `loss_mask` is 1, −1 elsewhere.
    lam: float32 [T], the weight of each task.
    chunk_size: tokens per chunk (capped at the number of tokens).

  Returns:
    The four sums of `token_loss`, equal up to float32 summation order.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if hidden.shape[:-1] != targets.shape:
    raise ValueError(f"hidden {hidden.shape} does not match targets {targets.shape} "
                     "(expected [B, L, D] and [B, L])")
  lam = jnp.asarray(lam, jnp.float32)
  num_tasks = lam.shape[0]
  n = targets.size
  chunk = max(1, min(chunk_size, n))
  pad = -n % chunk

  def flat(x: jax.Array, fill: float) -> jax.Array:
    x = x.reshape((n,) + x.shape[targets.ndim:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((-1, chunk) + x.shape[1:])

  # Padding: zero hidden states (finite logits), mask 0 and task −1, so it adds exactly 0.
  xs = (flat(hidden, 0), flat(targets, 0), flat(loss_mask, 0), flat(task_ids, -1))

  # Remat: the backward pass recomputes this chunk's logits rather than storing every
  # chunk's. prevent_cse is unnecessary under scan (and would only block optimisations).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(h, t, m, ids):
    return token_loss(logits_fn(h), t, m, ids, lam)

  def body(carry, x):
    return jax.tree.map(jnp.add, carry, chunk_sums(*x)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.float32))
  sums, _ = jax.lax.scan(body, init, xs)
  return sums


def task_counts(task_ids: jax.Array, loss_mask: jax.Array, num_tasks: int) -> jax.Array:
  """float32 [T]: Σ mask over each task's loss tokens (global when the arrays are)."""
  valid = _valid(loss_mask, task_ids)
  onehot = _task_onehot(task_ids, valid, num_tasks)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(jnp.where(onehot, mask[..., None], 0.0),
                 axis=tuple(range(task_ids.ndim)))


def tla_lambda(task_ids: jax.Array, loss_mask: jax.Array, num_tasks: int) -> jax.Array:
  """Task-level averaging as VITW weights: λ_k = 1 / (count of task k in the batch).

  With these weights L_VITW = Σ_k mean_k / K_present, i.e. the mean over the tasks
  present in the batch of each task's mean token loss. Absent tasks get λ = 0
  (they have no tokens, so any finite value would do; inf would not).
  """
  counts = task_counts(task_ids, loss_mask, num_tasks)
  return jnp.where(counts > 0, 1.0 / jnp.where(counts > 0, counts, 1.0), 0.0)


def per_task_mean(per_task_nll_sum: jax.Array, per_task_count: jax.Array) -> jax.Array:
  """Mean token loss per task; 0 (not NaN) for tasks without tokens."""
  present = per_task_count > 0
  return jnp.where(present, per_task_nll_sum / jnp.where(present, per_task_count, 1.0), 0.0)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, 0 where the denominator is 0 (a batch without loss tokens)."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)
