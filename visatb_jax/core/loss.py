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
  padded to a multiple of c; padding carries no loss) and scanned block by block, so the logits
  live one block at a time. `chunk_size` is the tokens of one block on one device: c =
  ⌊chunk_size / rows⌋ (at least 1, at most L, then evened out so that the blocks split L with
  the least padding), rows being the rows one device holds (all of them without a mesh), so the
  live logits are O(chunk_size · V) per device on any mesh. Gradients flow to `hidden`, to `lam`
  and to whatever `logits_fn` closes over (the head kernel).

  The gradient is a custom VJP (`_scan_sums`): the backward pass scans the blocks again,
  recomputes each block's logits, forms their cotangent from the softmax in closed form and pulls
  it back through `logits_fn` to the block's hidden states and the head's parameters. Every sum
  is differentiable, the per-task NLL sums included (the per-task-gradient step differentiates
  them, train/gradmtl_step.py); the counts depend on nothing differentiable.

  Under a mesh (the train steps are traced under `sharding.under_mesh`) the rows are split over
  the devices: the scan runs in a `jax.shard_map` over the mesh axes that split the rows
  (`_row_axes`), each device on its own rows with the whole head. Chunking the flattened tokens
  instead made every device walk every chunk and XLA all-reduce each chunk's logits; and under
  plain autodiff each device accumulated its own float32 partial gradient of the whole head
  over the blocks, live until one cross-device sum after the loss (XLA:CPU scheduled that sum
  after the decoder's backward pass: +1.1 GiB per device on the 7B dry run). The head's
  parameters therefore enter the shard_map as shards (`_shard_dims`: split over those axes along
  their model dimension, which FSDP shards) and gathered inside it (XLA:CPU reuses the forward
  pass's gather in the backward pass), and each block's head gradient is reduce-scattered as soon as the block has
  made it: a device accumulates only its 1/n share, in the parameter's dtype, next to the
  hidden-state gradient of its own rows. The price: one reduce-scatter of the head's gradient
  per block instead of one all-reduce per call, (n − 1)/n of the head's bytes per block and
  device on the wire, against a [D, V] buffer kept live. The four sums, and the cotangent of
  parameters without a dimension that the devices divide, are summed once, after the loop.

  Args:
    hidden: [B, L, D] final-norm hidden states, any float dtype.
    logits_fn: [..., D] -> float32 [..., V], e.g. `model.logits` (called on [rows, c, D]). Under
      a mesh it is traced twice (`jax.closure_convert`), outside the shard_map to find the
      arrays it closes over and inside to run, and must read the same arrays both times.
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
  devices = math.prod(mesh.shape[a] for a in axes) if axes else 1
  width = _block_width(rows // devices, length, chunk_size)
  # The head's closed-over arrays, made explicit: a custom VJP may not close over what it
  # differentiates, and under a mesh they enter the shard_map as shards.
  head, consts = _explicit_head(logits_fn, hidden, rows // devices, width)
  if not axes:
    return _scan_sums(head, width, (), (None,) * len(consts), hidden, targets, loss_mask,
                      task_ids, lam, consts)
  # Fsdp-major (the reverse of the batch's order): a device's share of a parameter's gradient
  # is then a slice of the FSDP shard it holds, so XLA only gathers it over the data axis.
  order = axes[::-1]
  dims = _shard_dims(consts, hidden.shape[-1], devices)
  const_specs = tuple(P() if d is None else P(*(None,) * d, order) for d in dims)

  def local(h, t, m, ids, lam, shards):
    # Traced again in here: a function traced outside carries the automatic mesh into this
    # manual region and fails. Its arrays are the same objects, matched by identity.
    head, inner = _explicit_head(logits_fn, h, h.shape[0], width)
    where = {id(c): i for i, c in enumerate(consts)}
    if any(id(c) not in where for c in inner):
      raise RuntimeError("chunked_token_loss: logits_fn closed over different arrays when "
                         "traced twice; it must read its parameters, not create them")
    pick = [where[id(c)] for c in inner]
    return _scan_sums(head, width, order, tuple(dims[i] for i in pick), h, t, m, ids, lam,
                      tuple(shards[i] for i in pick))

  rows_spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows_spec,) * 4 + (P(), const_specs),
                       out_specs=P(), axis_names=set(axes))(
                           hidden, targets, loss_mask, task_ids, lam, consts)


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


def _explicit_head(logits_fn, hidden, rows, width):
  """(head, arrays): `logits_fn(h) == head(h, *arrays)`, the arrays being those it closes over
  that a transformation may differentiate (`jax.closure_convert`), traced on one block."""
  example = jnp.zeros((rows, width, hidden.shape[-1]), hidden.dtype)
  head, consts = jax.closure_convert(logits_fn, example)
  return head, tuple(consts)


def _shard_dims(consts: tuple[jax.Array, ...], model_dim: int, devices: int
                ) -> tuple[int | None, ...]:
  """For each head parameter, the dimension its shards split (None: passed whole).

  The dimension of the hidden states' size when the devices divide it (the model dimension,
  which the sharding rules put on fsdp, for the head kernel [D, V] and a tied table [V, D]
  alike), else the first dimension they divide. A scalar, or an array no dimension of which
  the devices divide, is passed whole and its gradient summed once, after the loop.
  """
  def dim(shape: tuple[int, ...]) -> int | None:
    fits = [i for i, s in enumerate(shape) if s % devices == 0]
    preferred = [i for i in fits if shape[i] == model_dim]
    return (preferred or fits or [None])[0]
  return tuple(dim(c.shape) for c in consts)


def _block_width(rows: int, length: int, chunk_size: int) -> int:
  """Columns per block: as many as `chunk_size` tokens over `rows` rows allow (1 to L), then
  spread evenly over the blocks that L needs, so that padding is under one column per block."""
  blocks = -(-length // max(1, min(chunk_size // max(rows, 1), length)))
  return -(-length // blocks)


def _columns(x: jax.Array, width: int, fill: float) -> jax.Array:
  """[rows, L, ...] -> [blocks, rows, width, ...]: the scanned axis leads, rows stay whole.

  L is padded to a multiple of `width` with `fill`.
  """
  rows, length = x.shape[:2]
  blocks = -(-length // width)
  x = jnp.pad(x, [(0, 0), (0, blocks * width - length)] + [(0, 0)] * (x.ndim - 2),
              constant_values=fill)
  return jnp.swapaxes(x.reshape((rows, blocks, width) + x.shape[2:]), 0, 1)


def _blocks(hidden, targets, loss_mask, task_ids, width):
  # Padding: zero hidden states (finite logits), mask 0 and task −1, so it adds exactly 0.
  return (_columns(hidden, width, 0), _columns(targets, width, 0),
          _columns(loss_mask, width, 0), _columns(task_ids, width, -1))


def _gather(consts, dims, axes):
  """The whole head parameters from this device's shards (a no-op without `axes`)."""
  return tuple(c if d is None or not axes else jax.lax.all_gather(c, axes, axis=d, tiled=True)
               for c, d in zip(consts, dims))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _scan_sums(head, width, axes, dims, hidden, targets, loss_mask, task_ids, lam, consts):
  """The four sums of this device's rows, scanned over [rows, width] blocks of the sequence and
  summed over the shard_map `axes` (none without a mesh).

  `head(h, *whole consts)` computes a block's logits; `consts` are the head's parameters, split
  along `dims` over `axes` (None: whole). Differentiable in hidden, lam and consts.
  """
  return _scan_sums_fwd(head, width, axes, dims, hidden, targets, loss_mask, task_ids, lam,
                        consts)[0]


def _scan_sums_fwd(head, width, axes, dims, hidden, targets, loss_mask, task_ids, lam, consts):
  # Varying like the rows they meet (no implicit cast inside a custom VJP).
  whole = tuple(_to_varying(c, axes) for c in _gather(consts, dims, axes))
  num_tasks = lam.shape[0]

  def body(carry, x):
    h, t, m, ids = x
    return jax.tree.map(jnp.add, carry, token_loss(head(h, *whole), t, m, ids, lam)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.float32))
  # shard_map checks that a loop keeps its carry's type: the zeros vary like the rows.
  init = jax.tree.map(lambda x: _to_varying(x, axes), init)
  sums, _ = jax.lax.scan(body, init, _blocks(hidden, targets, loss_mask, task_ids, width))
  if axes:
    sums = jax.tree.map(lambda s: jax.lax.psum(s, axes), sums)
  # Residuals: the inputs only (the shards, not the gathered head); the backward pass
  # recomputes every block's logits, so none of them outlives its block.
  return sums, (hidden, targets, loss_mask, task_ids, lam, consts)


def _scan_sums_bwd(head, width, axes, dims, residuals, cotangents):
  hidden, targets, loss_mask, task_ids, lam, consts = residuals
  d_weighted, d_weight, d_task_sum, _ = cotangents  # the counts depend on nothing
  num_tasks = lam.shape[0]
  # Typed as this device's own copy: the pullback then yields each device's partial cotangent,
  # which `reduce` sums explicitly (an invariant copy would get an all-reduce per block).
  whole = tuple(_to_varying(c, axes) for c in _gather(consts, dims, axes))

  def reduce(g, d):
    """A block's partial head gradient -> this device's share of its sum over the devices."""
    if d is None or not axes:
      return g  # summed after the loop
    return jax.lax.psum_scatter(g, axes, scatter_dimension=d, tiled=True)

  def body(carry, x):
    d_consts, d_lam = carry
    h, t, m, ids = x
    logits, pullback = jax.vjp(head, h, *whole)
    d_logits, d_lam_block = _nll_cotangents(logits, t, m, ids, lam, d_weighted, d_weight,
                                            d_task_sum)
    d_h, *d_whole = pullback(d_logits)
    d_consts = tuple(a + reduce(g, d) for a, g, d in zip(d_consts, d_whole, dims))
    return (d_consts, d_lam + d_lam_block), d_h

  init = (tuple(jnp.zeros(c.shape, c.dtype) for c in consts),
          jnp.zeros((num_tasks,), jnp.float32))
  init = jax.tree.map(lambda x: _to_varying(x, axes), init)
  (d_consts, d_lam), d_blocks = jax.lax.scan(
      body, init, _blocks(hidden, targets, loss_mask, task_ids, width))
  if axes:
    d_consts = tuple(jax.lax.psum(g, axes) if d is None else g for g, d in zip(d_consts, dims))
    d_lam = jax.lax.psum(d_lam, axes)
  # [blocks, rows, width, D] -> [rows, L, D], the padding dropped.
  rows, length = targets.shape
  d_hidden = jnp.swapaxes(d_blocks, 0, 1).reshape(rows, -1, hidden.shape[-1])[:, :length]
  return d_hidden, None, None, None, d_lam, d_consts


_scan_sums.defvjp(_scan_sums_fwd, _scan_sums_bwd)


def _nll_cotangents(logits, targets, loss_mask, task_ids, lam, d_weighted, d_weight,
                    d_task_sum):
  """(d logits, d λ) of one block, given the cotangents of the weighted NLL sum, the weight sum
  and the per-task NLL sums (`token_loss`'s first three outputs).

  Token t weighs c_t = mask_t · (d_weighted · λ_task(t) + d_task_sum[task(t)]) in the sums'
  linear combination, and d nll_t / d logits_t = softmax(logits_t) − onehot(target_t). A
  non-loss token gets exactly zero, by `where`, so that a non-finite logit there (padding)
  cannot poison the gradient, as in `token_loss`.
  """
  num_tasks = lam.shape[0]
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  nll = (lse - jnp.take_along_axis(z, targets[..., None], axis=-1))[..., 0]
  mask = loss_mask.astype(jnp.float32)
  valid = _valid(loss_mask, task_ids)
  task = jnp.clip(task_ids, 0, num_tasks - 1)
  coef = jnp.where(valid, mask * (d_weighted * lam[task] + d_task_sum[task]), 0.0)
  onehot = jnp.arange(z.shape[-1]) == targets[..., None]
  d_logits = jnp.where(valid[..., None],
                       coef[..., None] * (jnp.exp(z - lse) - onehot.astype(jnp.float32)), 0.0)
  # d weighted / d λ_k = Σ_k mask·nll and d weight / d λ_k = Σ_k mask, over task k's tokens.
  per_token = mask * (d_weighted * nll + d_weight)
  d_lam = jnp.sum(jnp.where(_task_onehot(task_ids, valid, num_tasks), per_token[..., None], 0.0),
                  axis=tuple(range(nll.ndim)))
  return d_logits.astype(logits.dtype), d_lam


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`x`, typed as varying over the shard_map `axes` it does not vary over yet (value unchanged;
  a no-op without axes)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  varying = manual.varying if manual is not None else getattr(aval, "vma", frozenset())
  missing = tuple(a for a in axes if a not in varying)
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)  # JAX before `pcast`


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
