"""The VITW train step: the gradient of the λ-weighted token cross-entropy (docs/method.md §1)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from visatb_jax.core import loss as loss_lib
from visatb_jax.train import state as state_lib
from visatb_jax.train import step as step_lib


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    accum_steps: int = 1,
    tla: bool = False,
    donate: bool = False,
    state_sharding: Any = None,
    frozen_sharding: Any = None,
    ce_chunk_size: int = 0,
    dropout_seed: int | None = None,
) -> Callable[..., tuple[state_lib.TrainState, dict[str, jax.Array]]]:
  """Jit-compiled `(state, frozen, batch, lam, lr) -> (state, metrics)`.

  `lam` is a float32 [T] argument, so a new λ never recompiles; `lr` scales the updates of
  `tx` (a unit-rate optimizer from `make_optimizer`), so the schedule never recompiles either.
  With `tla` (task-level averaging), task k's weight becomes lam_k / (count of task k over the
  whole global batch): with lam = 1 the loss is the mean over tasks of each task's mean token
  loss, and a fixed weight w_k keeps its share w_k / Σ w. The batch's leading axis is the global
  batch, sharded over the batch axes. `donate` lets XLA reuse the state's buffers.
  `ce_chunk_size` > 0 computes the cross-entropy over chunks of that many tokens (same loss and
  gradients, without the full [tokens, vocab] logits). `dropout_seed` (a model with LoRA dropout,
  in train mode): the masks of step s, micro-batch k come from fold_in(fold_in(key(dropout_seed),
  s), k), a pure function of the step, so a resumed run draws the same masks.

  Metrics: `step.step_metrics`.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

  def step(state: state_lib.TrainState, frozen: nnx.State, batch, lam: jax.Array, lr: jax.Array):
    lam = lam.astype(jnp.float32)
    if tla:
      # Counts over the global batch, before any micro-batch split.
      lam = lam * loss_lib.tla_lambda(batch["task_ids"], batch["loss_mask"], lam.shape[0])

    def micro(params, micro_batch, key):
      sums = step_lib.forward_sums(graphdef, params, frozen, micro_batch, lam,
                                   ce_chunk_size=ce_chunk_size, dropout_key=key)
      return sums.weighted, sums

    grad_fn = jax.grad(micro, has_aux=True)
    key = (None if dropout_seed is None
           else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
    grads, sums = step_lib.accumulate(
        lambda b, k: grad_fn(state.params, b, k), batch, accum_steps, mesh, key)
    # The one division of the step. A batch without loss tokens has zero sums: divide by 1.
    denom = jnp.where(sums.weight > 0, sums.weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    new_state = state_lib.apply_direction(state, tx, grads, lr)
    return new_state, step_lib.step_metrics(sums, batch, lam, grads)

  return step_lib.jit_step(step, mesh, state_sharding=state_sharding,
                           frozen_sharding=frozen_sharding, donate=donate)


@functools.lru_cache(maxsize=16)
def cached_train_step(graphdef: nnx.GraphDef, optimizer_spec: tuple[float, float], mesh: Mesh,
                      accum_steps: int, tla: bool, ce_chunk_size: int, state_sharding_flat,
                      frozen_sharding_flat, dropout_seed: int | None = None):
  """`make_train_step` with donation, memoised: every run of a pipeline with the same shapes
  reuses one compiled step (the sharding arguments as `step.flat_tree` gives them)."""
  return make_train_step(graphdef, state_lib.optimizer_from_spec(optimizer_spec), mesh=mesh,
                         accum_steps=accum_steps, tla=tla, donate=True,
                         ce_chunk_size=ce_chunk_size, dropout_seed=dropout_seed,
                         state_sharding=step_lib.unflat_tree(state_sharding_flat),
                         frozen_sharding=step_lib.unflat_tree(frozen_sharding_flat))
