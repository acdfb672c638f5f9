"""Dynamic loss-weighting strategies as pure `(init, update)` pairs (docs/method.md §9).

Every strategy produces the per-task weights λ [T] that enter the VITW loss
(`loss.token_loss`). Its state is a flat dict of arrays, so it is a pytree that orbax can
checkpoint next to the model, and `update` is a pure, jit-safe function of arrays.

Contract (the same for every strategy)::

  strategy = get_strategy("dwa", window=50)
  state = strategy.init(num_tasks)          # state["lam"]: the λ of step 0
  for step in range(steps):
    lam = state["lam"]                       # λ used by this train step
    ... metrics = train_step(..., lam) ...
    lam, state = strategy.update(state, metrics["per_task_loss"], step, rng,
                                 per_task_count=metrics["per_task_count"])
    # `lam` (== new state["lam"]) is the λ of step + 1.

`update(state, per_task_loss, step, rng, per_task_count=None)` takes the per-task mean
losses *measured at* train step `step` (0-based) and returns the λ for step `step + 1`,
together with the new state. Keeping that λ inside the state means a resumed run reads
the right λ from the restored state without replaying any step.

Absent tasks. A task with no loss tokens in a batch has no loss at that step. It is treated
as absent when `per_task_count[k] == 0` (when counts are given) or when its loss is not
finite (NaN/inf). Absent tasks take no part in any running average; strategies fall back
to the last value they saw. Note that `train.py`'s metrics report 0 (not NaN) for absent
tasks, so callers should pass `per_task_count`.

Fixed-weight tasks (docs/method.md §5, e.g. the text-only chat task at 1.0). Every strategy
accepts `fixed_mask` (bool [T]) and `fixed_values` (float [T], read only where the mask is
set): fixed tasks always get their value, and the dynamic rule runs over the other tasks
only, normalised so that their λ averages 1 (for the softmax rules: N_free · softmax over
the N_free non-fixed tasks).

Strategies: `ew`, `static`, `rlw`, `dwa`, `igb`, `uw`; see `get_strategy`. (TLA's λ needs each
task's count over the global batch, which only the train step sees: it is made there,
`train/vitw_step.py`.) UW's learned log-variances s and their Adam moments are strategy state
like any other, so they are checkpointed with the model and restored on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

State = dict[str, jax.Array]
InitFn = Callable[[int], State]
UpdateFn = Callable[..., tuple[jax.Array, State]]

DWA_TEMPERATURE = 2.0
# UW's own Adam (see `_uw`): optax's defaults for the moments, a learning rate for s alone.
UW_LR = 1e-2
UW_ADAM_B1, UW_ADAM_B2, UW_ADAM_EPS = 0.9, 0.999, 1e-8


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A loss-weighting strategy: a pure `(init, update)` pair and its registry name.

  `init(num_tasks) -> state` and
  `update(state, per_task_loss, step, rng, per_task_count=None) -> (lam, state)`,
  with the contract of the module docstring. Options are bound when the strategy is built
  (`get_strategy`), so `update` is jit-safe as it is.
  """

  name: str
  init: InitFn
  update: UpdateFn


# ------------------------------------------------------------------------ small helpers


@dataclasses.dataclass(frozen=True)
class _Fixed:
  """Fixed-weight tasks, as host numpy arrays (static configuration, not state)."""

  mask: np.ndarray | None
  values: np.ndarray | None

  def check(self, num_tasks: int) -> None:
    if self.mask is None:
      return
    if self.mask.shape != (num_tasks,) or self.values.shape != (num_tasks,):
      raise ValueError(
          f"fixed_mask and fixed_values must have shape ({num_tasks},), got "
          f"{self.mask.shape} and {self.values.shape}")

  def free(self, num_tasks: int) -> jax.Array:
    """Bool [T]: tasks the dynamic rule decides."""
    if self.mask is None:
      return jnp.ones((num_tasks,), bool)
    return jnp.asarray(~self.mask)

  def apply(self, lam: jax.Array) -> jax.Array:
    """Overwrites the fixed tasks' entries of `lam` with their fixed values."""
    if self.mask is None:
      return lam
    return jnp.where(jnp.asarray(self.mask), jnp.asarray(self.values, jnp.float32), lam)


def _make_fixed(fixed_mask: Any, fixed_values: Any) -> _Fixed:
  if fixed_mask is None and fixed_values is None:
    return _Fixed(None, None)
  if fixed_mask is None or fixed_values is None:
    raise ValueError("fixed_mask and fixed_values must be given together")
  mask = np.asarray(fixed_mask, bool)
  values = np.asarray(fixed_values, np.float32)
  if mask.ndim != 1 or values.shape != mask.shape:
    raise ValueError(f"fixed_mask {mask.shape} and fixed_values {values.shape} must be [T]")
  if np.any(mask & ~np.isfinite(values)):
    raise ValueError("fixed_values must be finite where fixed_mask is set")
  return _Fixed(mask, values)


def n_softmax(scores: jax.Array, free: jax.Array) -> jax.Array:
  """N_free · softmax(scores) over the `free` tasks; 0 elsewhere (to be overwritten).

  The result averages exactly 1 over the free tasks, the normalisation of docs/method.md §5.
  """
  scores = jnp.where(free, scores.astype(jnp.float32), -jnp.inf)
  n_free = jnp.sum(free).astype(jnp.float32)
  # With no free task at all, softmax of all −inf is NaN; the `where` keeps it out.
  return jnp.where(free, n_free * jax.nn.softmax(scores), 0.0)


def _mean_one(lam: jax.Array, free: jax.Array) -> jax.Array:
  """Rescales `lam` so that it averages 1 over the free tasks."""
  total = jnp.sum(jnp.where(free, lam, 0.0))
  n_free = jnp.sum(free).astype(jnp.float32)
  scale = jnp.where(total > 0, n_free / jnp.where(total > 0, total, 1.0), 1.0)
  return jnp.where(free, lam * scale, 0.0)


def present_tasks(per_task_loss: jax.Array, per_task_count: jax.Array | None) -> jax.Array:
  """Bool [T]: the task had loss tokens at this step and a finite loss."""
  present = jnp.isfinite(per_task_loss)
  if per_task_count is not None:
    present &= jnp.asarray(per_task_count) > 0
  return present


def _safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator where both are finite and denominator > 0, else 1 (neutral)."""
  ok = jnp.isfinite(numerator) & jnp.isfinite(denominator) & (denominator > 0)
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 1.0)


def _ones(num_tasks: int, fixed: _Fixed) -> jax.Array:
  return fixed.apply(jnp.ones((num_tasks,), jnp.float32))


def _inputs(per_task_loss: Any, step: Any) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(per_task_loss, jnp.float32), jnp.asarray(step, jnp.int32)


# ------------------------------------------------------------------------- EW, static


def _constant(name: str, lam_of: Callable[[int], jax.Array]) -> Strategy:
  """A strategy whose λ never changes; its state is just that λ."""

  def init(num_tasks: int) -> State:
    return {"lam": lam_of(num_tasks)}

  def update(state, per_task_loss, step, rng, per_task_count=None):
    del per_task_loss, step, rng, per_task_count
    return state["lam"], dict(state)

  return Strategy(name, init, update)


def _ew(fixed: _Fixed) -> Strategy:
  """EW: λ = 1 (plain mean CE over all loss tokens); fixed tasks keep their value."""

  def lam_of(num_tasks: int) -> jax.Array:
    fixed.check(num_tasks)
    return _ones(num_tasks, fixed)

  return _constant("ew", lam_of)


def _static(lam: Any, fixed: _Fixed, normalize: bool) -> Strategy:
  """Static λ (e.g. VisATB's `compute_lambda`), optionally rescaled to mean 1 over free tasks."""
  given = np.asarray(lam, np.float32)
  if given.ndim != 1 or not np.all(np.isfinite(given)) or np.any(given < 0):
    raise ValueError(f"static lam must be a finite, non-negative [T] vector, got {lam!r}")

  def lam_of(num_tasks: int) -> jax.Array:
    if given.shape != (num_tasks,):
      raise ValueError(f"static lam has {given.shape[0]} entries for {num_tasks} tasks")
    fixed.check(num_tasks)
    out = jnp.asarray(given)
    if normalize:
      out = _mean_one(out, fixed.free(num_tasks))
    return fixed.apply(out)

  return _constant("static", lam_of)


# ------------------------------------------------------------------------------- RLW


def _rlw(fixed: _Fixed) -> Strategy:
  """RLW (random loss weighting): λ = N · softmax(z), z ~ N(0, I) drawn anew every step.

  z is drawn from `fold_in(rng, step + 1)` (the step the λ is for), so λ is a deterministic
  function of (rng, step) and changes every step even when the caller passes the same key
  each time. The λ of step 0 (from `init`, which has no key) is 1.
  """

  def init(num_tasks: int) -> State:
    fixed.check(num_tasks)
    return {"lam": _ones(num_tasks, fixed)}

  def update(state, per_task_loss, step, rng, per_task_count=None):
    del per_task_count
    per_task_loss, step = _inputs(per_task_loss, step)
    num_tasks = per_task_loss.shape[0]
    z = jax.random.normal(jax.random.fold_in(rng, step + 1), (num_tasks,), jnp.float32)
    lam = fixed.apply(n_softmax(z, fixed.free(num_tasks)))
    return lam, {"lam": lam}

  return Strategy("rlw", init, update)


# ------------------------------------------------------------------------------- DWA


def _dwa(fixed: _Fixed, window: int, temperature: float, start: int | None = None) -> Strategy:
  """DWA (Liu et al., MTAN 2019) on sliding windows, updated every step.

  The paper's rule, λ_k(t) = N · softmax_k(w_k(t−1) / T) with w_k(t−1) = L_k(t−1) / L_k(t−2),
  takes L_k(t) as task k's mean training loss over epoch t. Training here lasts about one epoch,
  so an "epoch" becomes a window of `window` steps that slides by one step at every update:

      w_k = mean of task k's last `window` losses / mean of the `window` losses before those,

  and the λ returned after step s (for step s + 1) is N · softmax(w / T) over the free tasks.
  Both means are over the steps at which task k was present (unweighted by token counts, like
  the release's per-batch average): an absent step is skipped, not counted as a loss, so the two
  windows are the task's last 2·`window` observed losses, and a task absent now keeps the ratio
  of the losses it last saw. window=1 compares a task's last two losses (the per-step rule).
  With `window` steps per epoch and every task present at every step, the λ of the first step
  of each epoch is exactly the paper's per-epoch DWA. A task with fewer than 2·`window`
  observed losses (or a non-positive earlier mean) gets the neutral ratio 1; λ is exactly 1
  until some free task has 2·`window` observations.

  `start` (None: 2·`window` − 1) starts earlier, as the VisATB release does (window 25, λ
  dynamic after 25 steps): a task's ratio is used once it has more than `start` observed losses
  (start >= window), the earlier mean then being over the losses it has (at least one). The
  release fills the missing part of its earlier window with its buffer's initial value 1.0
  instead, a loss-scale-dependent artefact that is not reproduced.

  State: `history` [2·window, T], each task's last 2·window observed losses in a ring indexed
  by its own `seen` count [T] (the slot of its next loss is seen % (2·window)).
  """
  size = 2 * window
  start = size - 1 if start is None else start

  def init(num_tasks: int) -> State:
    fixed.check(num_tasks)
    return {"lam": _ones(num_tasks, fixed),
            "history": jnp.zeros((size, num_tasks), jnp.float32),
            "seen": jnp.zeros((num_tasks,), jnp.int32)}

  def update(state, per_task_loss, step, rng, per_task_count=None):
    del rng
    per_task_loss, _ = _inputs(per_task_loss, step)
    num_tasks = per_task_loss.shape[0]
    present = present_tasks(per_task_loss, per_task_count)
    slots = jnp.arange(size)[:, None]
    write = present[None, :] & (slots == (state["seen"] % size)[None, :])
    history = jnp.where(write, per_task_loss[None, :], state["history"])
    seen = state["seen"] + present.astype(jnp.int32)
    # Age 0 is the task's newest loss; only read once the task has filled its ring.
    age = (seen[None, :] - 1 - slots) % size
    recent = jnp.sum(jnp.where(age < window, history, 0.0), axis=0) / window
    # Before the ring is full, only the ages below `seen` hold losses (at least one once ready).
    earlier_n = jnp.clip(seen - window, 1, window)
    earlier = jnp.sum(jnp.where((age >= window) & (age < seen[None, :]), history, 0.0),
                      axis=0) / earlier_n
    ready = seen > start
    ratio = jnp.where(ready, _safe_ratio(recent, earlier), 1.0)
    free = fixed.free(num_tasks)
    dynamic = fixed.apply(n_softmax(ratio / temperature, free))
    lam = jnp.where(jnp.any(ready & free), dynamic, _ones(num_tasks, fixed))
    return lam, {"lam": lam, "history": history, "seen": seen}

  return Strategy("dwa", init, update)


# ------------------------------------------------------------------------------- IGB


def _igb(fixed: _Fixed, base_start: int, base_end: int) -> Strategy:
  """IGBv1 (Dai et al. 2023): λ_k = N · softmax(L_k / L_k,base).

  L_k,base is task k's mean loss over the steps [base_start, base_end) at which it was
  present (default 100–200); L_k is its loss at the current step (the last one observed if
  it is absent now). Before step `base_end` λ = 1. A task never present in the base window
  gets the neutral ratio 1.
  """

  def init(num_tasks: int) -> State:
    fixed.check(num_tasks)
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"lam": _ones(num_tasks, fixed), "base_sum": zeros, "base_count": zeros,
            "last": jnp.full((num_tasks,), jnp.nan, jnp.float32)}

  def update(state, per_task_loss, step, rng, per_task_count=None):
    del rng
    per_task_loss, step = _inputs(per_task_loss, step)
    present = present_tasks(per_task_loss, per_task_count)
    in_base = present & (step >= base_start) & (step < base_end)
    base_sum = state["base_sum"] + jnp.where(in_base, per_task_loss, 0.0)
    base_count = state["base_count"] + in_base.astype(jnp.float32)
    last = jnp.where(present, per_task_loss, state["last"])
    seen = base_count > 0
    base = jnp.where(seen, base_sum / jnp.where(seen, base_count, 1.0), jnp.nan)
    free = fixed.free(per_task_loss.shape[0])
    dynamic = fixed.apply(n_softmax(_safe_ratio(last, base), free))
    # λ is for step + 1: dynamic once the whole base window has been observed.
    lam = jnp.where(step + 1 >= base_end, dynamic, state["lam"])
    return lam, {"lam": lam, "base_sum": base_sum, "base_count": base_count, "last": last}

  return Strategy("igb", init, update)


# -------------------------------------------------------------------------------- UW


def uw_objective(log_var: jax.Array, per_task_loss: jax.Array, active: jax.Array) -> jax.Array:
  """Σ_t exp(−s_t)·L_t + s_t over the `active` tasks (Kendall, Gal & Cipolla 2018).

  The form with s_t = log σ_t² and no ½: LibMTL writes ½(exp(−s)·L + s), the same function up to
  a constant factor, hence the same minimiser s_t = log L_t, and the factor cancels in Adam's
  normalised step and in VITW's division by Σλ. Inactive tasks add nothing and get no gradient.
  """
  # Zero the inactive losses before they enter: a NaN there would turn the masked gradient NaN.
  loss = jnp.where(active, per_task_loss, 0.0)
  terms = jnp.exp(-log_var) * loss + log_var
  return jnp.sum(jnp.where(active, terms, 0.0))


def _adam_step(param: jax.Array, grad: jax.Array, mu: jax.Array, nu: jax.Array,
               count: jax.Array, lr: float,
               active: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """optax.adam's update, element by element, applied only where `active`.

  Each task keeps its own step count, so its bias correction counts only the steps it was
  present at: an absent task's s stays where it is instead of drifting on stale momentum.
  """
  new_count = count + active.astype(jnp.int32)
  new_mu = UW_ADAM_B1 * mu + (1.0 - UW_ADAM_B1) * grad
  new_nu = UW_ADAM_B2 * nu + (1.0 - UW_ADAM_B2) * grad * grad
  steps = jnp.maximum(new_count, 1).astype(jnp.float32)
  mu_hat = new_mu / (1.0 - UW_ADAM_B1 ** steps)
  nu_hat = new_nu / (1.0 - UW_ADAM_B2 ** steps)
  new_param = param - lr * mu_hat / (jnp.sqrt(nu_hat) + UW_ADAM_EPS)
  return tuple(jnp.where(active, new, old) for new, old in
               ((new_param, param), (new_mu, mu), (new_nu, nu), (new_count, count)))


def _uw(fixed: _Fixed, lr: float) -> Strategy:
  """UW (uncertainty weighting, Kendall et al. 2018) inside VITW.

  One log-variance s_t per free task, learned by minimising `uw_objective` on the per-task
  mean losses L_t of each step: ∂/∂s_t = 1 − exp(−s_t)·L_t, so s_t tends to log L_t. The task
  weights are exp(−s_t) rescaled to average 1 over the free tasks, i.e. λ = N_free·softmax(−s),
  used as token weights in VITW like every other dynamic λ (the paper's release runs all its
  dynamic baselines that way); fixed tasks keep their value and have no s.

  s has its own Adam at a constant rate `lr` rather than the model's optimizer: at the model's
  2e-5 (cosine to 0, clipped jointly with the model's gradient) s could move only a few
  hundredths in a one-epoch run, and UW would be EW. s starts at 0 (σ = 1), so λ = 1 at step 0
  like every other method; λ depends only on the differences between the s_t.

  State: `log_var` [T] (s), its Adam moments `adam_mu`, `adam_nu` [T] and per-task step counts
  `adam_count` [T], and `lam`.
  """

  def init(num_tasks: int) -> State:
    fixed.check(num_tasks)
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {"lam": _ones(num_tasks, fixed), "log_var": zeros, "adam_mu": zeros,
            "adam_nu": zeros, "adam_count": jnp.zeros((num_tasks,), jnp.int32)}

  def update(state, per_task_loss, step, rng, per_task_count=None):
    del rng
    per_task_loss, _ = _inputs(per_task_loss, step)
    free = fixed.free(per_task_loss.shape[0])
    active = present_tasks(per_task_loss, per_task_count) & free
    grad = jax.grad(uw_objective)(state["log_var"], per_task_loss, active)
    log_var, mu, nu, count = _adam_step(state["log_var"], grad, state["adam_mu"],
                                        state["adam_nu"], state["adam_count"], lr, active)
    lam = fixed.apply(n_softmax(-log_var, free))
    return lam, {"lam": lam, "log_var": log_var, "adam_mu": mu, "adam_nu": nu,
                 "adam_count": count}

  return Strategy("uw", init, update)


# --------------------------------------------------------------------------- registry


def _ew_factory(*, fixed_mask=None, fixed_values=None) -> Strategy:
  return _ew(_make_fixed(fixed_mask, fixed_values))


def _static_factory(*, lam: Sequence[float], fixed_mask=None, fixed_values=None,
                    normalize: bool = True) -> Strategy:
  return _static(lam, _make_fixed(fixed_mask, fixed_values), normalize)


def _rlw_factory(*, fixed_mask=None, fixed_values=None) -> Strategy:
  return _rlw(_make_fixed(fixed_mask, fixed_values))


def _dwa_factory(*, window: int = 50, temperature: float = DWA_TEMPERATURE,
                 start: int | None = None, fixed_mask=None, fixed_values=None) -> Strategy:
  if int(window) < 1:
    raise ValueError(f"dwa window must be >= 1, got {window}")
  if not temperature > 0:
    raise ValueError(f"dwa temperature must be > 0, got {temperature}")
  if start is not None and int(start) < int(window):
    raise ValueError(f"dwa start must be >= window ({window}), got {start}")
  return _dwa(_make_fixed(fixed_mask, fixed_values), int(window), float(temperature),
              None if start is None else int(start))


def _igb_factory(*, base_start: int = 100, base_end: int = 200, fixed_mask=None,
                 fixed_values=None) -> Strategy:
  if not 0 <= int(base_start) < int(base_end):
    raise ValueError(f"igb needs 0 <= base_start < base_end, got {base_start}, {base_end}")
  return _igb(_make_fixed(fixed_mask, fixed_values), int(base_start), int(base_end))


def _uw_factory(*, lr: float = UW_LR, fixed_mask=None, fixed_values=None) -> Strategy:
  if not (math.isfinite(float(lr)) and float(lr) > 0):
    raise ValueError(f"uw lr must be a finite number > 0, got {lr}")
  return _uw(_make_fixed(fixed_mask, fixed_values), float(lr))


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "ew": _ew_factory,
    "static": _static_factory,
    "rlw": _rlw_factory,
    "dwa": _dwa_factory,
    "igb": _igb_factory,
    "uw": _uw_factory,
}


def get_strategy(name: str, **options: Any) -> Strategy:
  """The strategy `name` with its options.

  Options (all keyword-only; every strategy also takes `fixed_mask`/`fixed_values`):
    ew:     none.
    static: lam [T] (required); normalize=True rescales the non-fixed entries to mean 1.
    rlw:    none; the randomness comes from the `rng` passed to `update`.
    dwa:    window=50 (steps per loss mean; the two windows slide every step), temperature=2.0,
            start=None (dynamic after 2·window − 1 observed losses; the release: 25).
    igb:    base_start=100, base_end=200 (the base-loss window, in steps).
    uw:     lr=1e-2 (the Adam learning rate of the log-variances s, constant).

  Raises:
    ValueError: unknown name or invalid option value. TypeError: unknown option.
  """
  if name not in STRATEGIES:
    raise ValueError(f"unknown weighting strategy {name!r}; known: {sorted(STRATEGIES)}")
  return STRATEGIES[name](**options)


@functools.partial(jax.jit, static_argnums=(0,))
def _jitted_update(strategy: Strategy, state, per_task_loss, step, rng, per_task_count):
  return strategy.update(state, per_task_loss, step, rng, per_task_count)


def jit_update(strategy: Strategy, state: State, per_task_loss: Any, step: Any, rng: jax.Array,
               per_task_count: Any = None) -> tuple[jax.Array, State]:
  """`strategy.update` under `jax.jit` (compiled once per strategy and shape)."""
  return _jitted_update(strategy, state, per_task_loss, step, rng, per_task_count)
