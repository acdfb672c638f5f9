"""The core every train step is built on: forward sums, micro-batch accumulation, metrics, jit.

The VITW loss is summed over the whole global batch of an optimizer step — every device and every
accumulation micro-batch — and divided exactly once (docs/method.md §1), so a sharded or
accumulated step equals the single-device full-batch step. `vitw_step` differentiates the
weighted sum; `gradmtl_step` differentiates each task's sum. Both use the pieces below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from visatb_jax.core import loss as loss_lib
from visatb_jax.model import llava
from visatb_jax.model import lora as lora_lib
from visatb_jax.runtime import sharding as sharding_lib

Batch = Mapping[str, Any]


class LossSums(NamedTuple):
  """The VITW sums of a (micro-)batch; nothing divided (core/loss.py's contract)."""
  weighted: jax.Array    # Σ λ_task · nll
  weight: jax.Array      # Σ λ_task
  task_sum: jax.Array    # [T] Σ nll per task
  task_count: jax.Array  # [T] loss tokens per task


def micro_batches(batch: Batch, accum_steps: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[B, ...] → [A, B/A, ...] where micro-batch k holds rows k, k+A, k+2A, ...

  Strided rather than contiguous so that, with rows sharded contiguously over the batch axes,
  every micro-batch is spread over all devices without moving any row.
  """
  def split(x):
    rows = x.shape[0]
    x = x.reshape(rows // accum_steps, accum_steps, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return sharding_lib.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2), mesh)
  return {k: split(v) for k, v in batch.items()}


def model_inputs(model: Any, batch: Batch) -> dict[str, Any]:
  """`hidden_states` keyword arguments from a Batch: each model family reads its own image arrays
  (`batch_inputs`: Qwen2-VL's per-row slots and grids); a model without one reads LLaVA's keys."""
  read = getattr(model, "batch_inputs", llava.LlavaForConditionalGeneration.batch_inputs)
  return read(batch)


def forward_sums(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: Batch,
                 lam: jax.Array, *, ce_chunk_size: int = 0,
                 dropout_key: jax.Array | None = None) -> LossSums:
  """Model forward + VITW sums on one (micro-)batch.

  With `ce_chunk_size`, the LM head and the cross-entropy run over chunks of that many tokens, so
  the [tokens, vocab] logits never exist at once (loss.chunked_token_loss). `dropout_key` gives
  the LoRA adapters' dropout masks of this micro-batch (model/lora.py).
  """
  if dropout_key is not None:
    frozen = lora_lib.with_dropout_key(frozen, dropout_key)
  model = nnx.merge(graphdef, params, frozen)
  inputs = model_inputs(model, batch)
  if ce_chunk_size:
    hidden = model.hidden_states(batch["input_ids"], **inputs)
    sums = loss_lib.chunked_token_loss(hidden, model.logits, batch["targets"], batch["loss_mask"],
                                       batch["task_ids"], lam, chunk_size=ce_chunk_size)
  else:
    logits = model(batch["input_ids"], **inputs)
    sums = loss_lib.token_loss(logits, batch["targets"], batch["loss_mask"], batch["task_ids"], lam)
  return LossSums(*sums)


def accumulate(fn: Callable[[Batch, jax.Array | None], Any], batch: Batch, accum_steps: int,
               mesh: Mesh, key: jax.Array | None = None) -> Any:
  """Σ_k fn(micro-batch k, fold_in(key, k)) over the `accum_steps` micro-batches (a pytree sum).

  One micro-batch calls `fn` on the batch itself; more run as a `lax.scan`, whose carry starts at
  zeros shaped like `fn`'s output (traced abstractly, never computed).
  """
  def micro_key(k):
    return None if key is None else jax.random.fold_in(key, k)

  if accum_steps == 1:
    return fn(batch, micro_key(0))
  micro = micro_batches(batch, accum_steps, mesh)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda b: fn(b, micro_key(0)), first)
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    micro_batch, k = xs
    return jax.tree.map(jnp.add, carry, fn(micro_batch, micro_key(k))), None

  sums, _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
  return sums


def loss_tokens(batch: Batch) -> jax.Array:
  return jnp.sum((batch["loss_mask"] > 0) & (batch["task_ids"] >= 0))


def step_metrics(sums: LossSums, batch: Batch, lam: jax.Array, direction: Any) -> dict[str, Any]:
  """The metrics every step reports: loss, per_task_loss [T], per_task_count [T], grad_norm (of
  the update direction, before clipping), weight_sum, tokens (loss tokens), lam [T] (the λ
  actually used)."""
  return {
      "loss": loss_lib.safe_divide(sums.weighted, sums.weight),
      "per_task_loss": loss_lib.per_task_mean(sums.task_sum, sums.task_count),
      "per_task_count": sums.task_count,
      "grad_norm": optax.tree.norm(direction),
      "weight_sum": sums.weight,
      "tokens": loss_tokens(batch),
      "lam": lam,
  }


def jit_step(step: Callable[..., Any], mesh: Mesh, *, state_sharding: Any, frozen_sharding: Any,
             extra_in: int = 0, extra_out: int = 0, donate: bool = False,
             donate_extra: tuple[int, ...] = ()) -> Callable[..., Any]:
  """`step(state, frozen, batch, lam, lr, *extra)` jitted on `mesh`, traced under it.

  State and frozen take their shardings (None: replicated), the batch its rows on the batch axes,
  λ, lr and the `extra_in` trailing arguments (a method's carried state) are replicated; outputs
  are (state, metrics, *extra_out) with the state in its sharding and the rest replicated.
  `donate` lets XLA reuse the state's buffers (and those of `donate_extra` argument indices).
  """
  repl, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  state_sh = repl if state_sharding is None else state_sharding
  frozen_sh = repl if frozen_sharding is None else frozen_sharding
  return jax.jit(sharding_lib.under_mesh(step, mesh),
                 in_shardings=(state_sh, frozen_sh, data, repl, repl) + (repl,) * extra_in,
                 out_shardings=(state_sh, repl) + (repl,) * extra_out,
                 donate_argnums=((0,) + tuple(donate_extra)) if donate else ())


def flat_tree(tree: Any) -> tuple[Any, tuple[Any, ...]]:
  """A hashable (treedef, leaves) form of a pytree of shardings, for compile caches."""
  return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))


def unflat_tree(flat: tuple[Any, tuple[Any, ...]]) -> Any:
  return jax.tree.unflatten(*flat)
