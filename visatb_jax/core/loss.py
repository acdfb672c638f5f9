"""VITW: token-level task-weighted cross-entropy (docs/method.md §1).

Every function here returns *sums*, never means: the train step divides the weighted
NLL sum by the weight sum exactly once, over the global batch of one optimizer step
(all devices, all accumulation micro-batches). Dividing per shard or per micro-batch
would silently reweight the tokens, which is the bug this module exists to avoid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


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
  """`token_loss(logits_fn(hidden), ...)` without ever holding the [B, L, V] logits.

  The chunks run along the sequence: the rows are cut into [rows, c] blocks of columns (L
  padded to a multiple of c; padding carries no loss) and scanned block by block, each block
  rematerialised in the backward pass, so the logits live one block at a time. `chunk_size` is
  the tokens of one block on one device: c = ⌊chunk_size / rows⌋ (at least 1, at most L, then
  evened out so that the blocks split L with the least padding), rows being the rows one
  device holds (all of them without a mesh), so the live logits are O(chunk_size · V) per
  device on any mesh. Gradients flow to `hidden` and to whatever `logits_fn` closes over (the
  head kernel).

  Under a mesh (the train steps are traced under `sharding.under_mesh`) the rows are split
  over the devices. Chunking the flattened [B, L] tokens scanned over that split axis: every
  device walked every chunk, and XLA all-reduced each chunk's float32 logits. Blocks that keep
  the split rows are not enough either: XLA then reduces the head's weight gradient across
  devices once per block (a loop carry holds no unreduced partial sums). So the scan runs in a
  `jax.shard_map` over the mesh axes that split the rows (`_row_axes`): each device scans its
  own rows with the whole head (the FSDP gather of its weights, once), and the four sums and
  the head's gradient are summed over the devices once, after the loop. The price: from the
  loss's backward pass until that sum, each device holds its own float32 [D, V] partial
  gradient of the head, besides the gathered head. Nothing else is communicated.

  Args:
    hidden: [B, L, D] final-norm hidden states, any float dtype.
    logits_fn: [..., D] -> float32 [..., V], e.g. `model.logits` (called on [rows, c, D]).
    targets: int [B, L], the token predicted at each position.
    loss_mask: [B, L], 1 on assistant tokens (already shifted), 0 elsewhere.
    task_ids: int [B, L], task index where `loss_mask` is 1, −1 elsewhere.
    lam: float32 [T], the weight of each task.
    chunk_size: tokens per block and device (see above).

  Returns:
    The four sums of `token_loss`, equal up to float32 summation order.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if targets.ndim != 2 or hidden.shape[:-1] != targets.shape:
    raise ValueError(f"hidden {hidden.shape} does not match targets {targets.shape} "
                     "(expected [B, L, D] and [B, L])")
  lam = jnp.asarray(lam, jnp.float32)
  rows, length = targets.shape
  mesh, axes = _row_axes(rows)
  if not axes:
    return _column_scan(hidden, logits_fn, targets, loss_mask, task_ids, lam,
                        _block_width(rows, length, chunk_size))
  width = _block_width(rows // math.prod(mesh.shape[a] for a in axes), length, chunk_size)

  def local(h, t, m, ids, lam):
    # The head's closed-over arrays, made explicit and typed as this device's own copy: their
    # cotangents then accumulate locally in the scan and are summed over the devices once, by
    # the transpose of `_to_varying`. (Used as closed over, JAX 0.10 builds their zero
    # cotangent on the outer, automatic mesh inside this manual region and fails.)
    example = jnp.zeros((h.shape[0], width, h.shape[-1]), h.dtype)
    head, consts = jax.closure_convert(logits_fn, example)
    consts = [_to_varying(c, axes) for c in consts]
    sums = _column_scan(h, lambda x: head(x, *consts), t, m, ids, lam, width, varying=axes)
    return jax.tree.map(lambda s: jax.lax.psum(s, axes), sums)

  rows_spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec,) * 4 + (P(),), out_specs=P(),
                       axis_names=set(axes))(hidden, targets, loss_mask, task_ids, lam)


def _row_axes(rows: int) -> tuple[jax.sharding.AbstractMesh | None, tuple[str, ...]]:
  """(context mesh, the mesh axes that split the rows of the chunked loss); () without a mesh.

  The axes: those of size > 1 in mesh order, the longest prefix whose size product divides
  `rows`. The batch is sharded over a prefix of them (data, fsdp), so each device's share is
  a slice of the rows it already holds; a further axis (tensor) splits those rows too, which
  for the LM head and the cross-entropy is plain data parallelism. () when no mesh is set, or
  when one of its axes is not automatic (inside a shard_map, or an explicit mesh): the scan
  then runs as traced, XLA partitioning it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
    return None, ()
  axes: list[str] = []
  for name in mesh.axis_names:
    size = mesh.shape[name]
    if size == 1:
      continue
    if rows % (math.prod(mesh.shape[a] for a in axes) * size):
      break
    axes.append(name)
  return mesh, tuple(axes)


def _block_width(rows: int, length: int, chunk_size: int) -> int:
  """Columns per block: as many as `chunk_size` tokens over `rows` rows allow (1 to L), then
  spread evenly over the blocks that L needs, so that padding is under one column per block."""
  blocks = -(-length // max(1, min(chunk_size // max(rows, 1), length)))
  return -(-length // blocks)


def _column_scan(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                 targets: jax.Array, loss_mask: jax.Array, task_ids: jax.Array, lam: jax.Array,
                 width: int, varying: tuple[str, ...] = ()
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The four sums over [rows, width] blocks of the sequence, scanned and rematerialised.

  `varying`: the shard_map axes the inputs vary over, which the scan's zero carry must vary
  over too (shard_map checks that a loop keeps its carry's type).
  """
  num_tasks = lam.shape[0]
  rows, length = targets.shape
  blocks = -(-length // width)
  pad = blocks * width - length

  def columns(x: jax.Array, fill: float) -> jax.Array:
    """[rows, L, ...] -> [blocks, rows, width, ...]: the scanned axis leads, rows stay whole."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.swapaxes(x.reshape((rows, blocks, width) + x.shape[2:]), 0, 1)

  # Padding: zero hidden states (finite logits), mask 0 and task −1, so it adds exactly 0.
  xs = (columns(hidden, 0), columns(targets, 0), columns(loss_mask, 0), columns(task_ids, -1))

  # Remat: the backward pass recomputes this block's logits rather than storing every
  # block's. prevent_cse is unnecessary under scan (and would only block optimisations).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block_sums(h, t, m, ids):
    return token_loss(logits_fn(h), t, m, ids, lam)

  def body(carry, x):
    return jax.tree.map(jnp.add, carry, block_sums(*x)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.float32))
  if varying:
    init = jax.tree.map(lambda x: _to_varying(x, varying), init)
  sums, _ = jax.lax.scan(body, init, xs)
  return sums


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`x`, typed as varying over the shard_map `axes` (its value unchanged)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # JAX before `pcast`


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
