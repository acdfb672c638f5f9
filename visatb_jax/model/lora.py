"""LoRA adapters on the language model of the NNX LLaVA / Qwen2-VL: apply, train, merge for export.

`apply_lora` swaps the targeted `nnx.Linear` layers of `model.language_model` in place for
`LoRALinear`, a subclass of Flax's `nnx.LoRALinear` (hence of `nnx.Linear`). The base weights keep
their paths and Hugging Face names (`...self_attn.q_proj.kernel`); the adapter adds
`...q_proj.lora.{lora_a, lora_b}` of variable type `nnx.LoRAParam` (a subclass of `nnx.Param`), so
an optimizer can select it with a filter, and, with dropout, the dropout key
`...q_proj.lora_dropout.key` (a `LoRADropoutKey`, not a parameter). The layer computes

    y = x @ W + b + (alpha / rank) * dropout(x) @ A @ B,    A [in, rank], B [rank, out]

with B initialised to zero, so a fresh adapter leaves the model's output unchanged.

Dropout (on the adapter input only) is off by default: the layers are built in eval mode. Turn it
on with `model.train()` and off again with `model.eval()` (NNX's `deterministic` flag; the model
has no other dropout). Each layer draws its mask from a key it stores and only reads: the forward
pass mutates nothing, so it runs under `jax.grad`, `lax.scan` and the decoder's rematerialisation
however the model was split and merged. The same key gives the same masks, so a train step must
refresh the keys for every (micro-)batch: `with_dropout_key(state, key)` on split state (pure, for
jitted steps) or `reseed_dropout(model, key)` on a module.

`merge_lora` folds the adapters into the base kernels and restores plain `nnx.Linear` layers (what
`hf_io.save_pretrained` exports); `merged_params` gives the same values without changing the model.

The decoder's layers are stacked (llama.py: every parameter has a leading layer axis), so an
adapted Linear there holds stacked adapters too: `lora_a` [L, in, rank], `lora_b` [L, rank, out],
one dropout key per layer [L]; the layer scan hands each layer its row, and merging folds every
layer's own A·B into its own kernel row.

Both models work unchanged: Qwen2-VL's `language_model` is llama.py's decoder (`Qwen2VLTextModel`),
with the same Linear names (its q/k/v biases stay on the base layer). Only the vision tower and the
projector differ in name, which `vision_tower_filter` / `projector_filter` cover.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# The Linear layers of a Llama decoder layer (HF names, as PEFT's `target_modules`).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Path = tuple[Any, ...]


class LoRALinear(nnx.LoRALinear):
  """`nnx.LoRALinear` with the LoRA scaling `alpha / rank` and dropout on the adapter input.

  State: `kernel` [in, out] and `bias` exactly as `nnx.Linear`; `lora.lora_a` [in, rank] and
  `lora.lora_b` [rank, out] as `nnx.LoRAParam`; with `lora_dropout_rate > 0`, `lora_dropout` is a
  `LoRADropout` holding its key.
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int, lora_alpha: float,
               lora_dropout_rate: float = 0.0, lora_param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs, **linear_kwargs: Any):
    """Builds the layer (fresh base weights; use `apply_lora` to adapt an existing Linear).

    Args:
      in_features: input width.
      out_features: output width.
      lora_rank: adapter rank r.
      lora_alpha: the update is scaled by alpha / r.
      lora_dropout_rate: dropout rate on the adapter input (active only in train mode).
      lora_param_dtype: storage dtype of A and B.
      rngs: base and adapter initialisation (`params`), dropout key (`dropout`, else default).
      **linear_kwargs: `nnx.Linear` options (use_bias, dtype, param_dtype, precision, ...).
    """
    super().__init__(in_features, out_features, lora_rank=lora_rank,
                     lora_dtype=linear_kwargs.get("dtype"), lora_param_dtype=lora_param_dtype,
                     rngs=rngs, **linear_kwargs)
    self.lora_rank = lora_rank
    self.lora_alpha = lora_alpha
    self.lora_scaling = lora_alpha / lora_rank
    self.lora_dropout = _make_dropout(lora_dropout_rate, rngs)

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
    h = x if self.lora_dropout is None else self.lora_dropout(x)
    return y + (self.lora(h) * self.lora_scaling).astype(y.dtype)

  def delta_kernel(self, row: int | None = None) -> jax.Array:
    """scaling · A · B [in, out] in float32: what merging adds to the kernel ([L, in, out] for
    stacked layers, batched per layer; `row`: that layer's only)."""
    a, b = self.lora.lora_a[...], self.lora.lora_b[...]
    if row is not None:
      a, b = a[row], b[row]
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return self.lora_scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

  def merged_kernel(self, row: int | None = None) -> jax.Array:
    """kernel + scaling · A · B in the kernel's dtype and placement (the model is unchanged);
    `row`: that layer's kernel of stacked layers only (an export computes one layer at a
    time)."""
    kernel = self.kernel[...]
    if row is not None:
      kernel = kernel[row]
    merged = (kernel.astype(jnp.float32) + self.delta_kernel(row)).astype(kernel.dtype)
    if isinstance(kernel, jax.Array) and not isinstance(kernel, jax.core.Tracer):
      merged = jax.device_put(merged, kernel.sharding)
    return merged


class LoRADropoutKey(nnx.Variable):
  """The PRNG key of one adapter's dropout: model state, never a parameter."""


class LoRADropout(nnx.Dropout):
  """`nnx.Dropout` (eval mode at first) whose mask comes from a stored key that it only reads."""

  def __init__(self, rate: float, *, key: jax.Array):
    super().__init__(rate, deterministic=True)
    self.key = LoRADropoutKey(key)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    return super().__call__(x, deterministic=deterministic, rngs=self.key[...])


def _make_dropout(rate: float, rngs: nnx.Rngs) -> LoRADropout | None:
  return None if rate == 0.0 else LoRADropout(rate, key=rngs.dropout())


def _make_adapter(n_in: int, rank: int, n_out: int, dtype: Any, dropout: float,
                  rngs: nnx.Rngs, layers: int | None) -> tuple[nnx.LoRA, LoRADropout | None]:
  """A fresh adapter (A, B) and its dropout; `layers`: stacked, one per layer (own A, own key),
  as the stacked decoder layers it adapts."""

  def make(rngs):
    return (nnx.LoRA(n_in, rank, n_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs),
            _make_dropout(dropout, rngs))

  if layers is None:
    return make(rngs)

  @nnx.split_rngs(splits=layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=layers)
  def stacked(rngs):
    return make(rngs)

  return stacked(rngs)


def _linear_kwargs(linear: nnx.Linear) -> dict[str, Any]:
  """The `nnx.Linear` constructor arguments that `linear` was built with (those it stores)."""
  params = inspect.signature(nnx.Linear.__init__).parameters
  skip = ("self", "in_features", "out_features", "rngs")
  return {k: v for k, v in vars(linear).items() if k in params and k not in skip}


def lora_linear_from(linear: nnx.Linear, *, rank: int, alpha: float, dropout: float,
                     rngs: nnx.Rngs) -> LoRALinear:
  """A `LoRALinear` around `linear`'s own weights (shared Variables, nothing copied); a Linear
  of stacked layers (kernel [L, in, out]) gets stacked adapters."""
  kwargs = _linear_kwargs(linear)
  n_in, n_out = linear.in_features, linear.out_features
  lead = linear.kernel[...].shape[:-2]
  # Built abstractly so no second kernel is ever allocated, then given the real weights and a
  # concrete adapter.
  layer = nnx.eval_shape(lambda: LoRALinear(n_in, n_out, lora_rank=rank, lora_alpha=alpha,
                                            lora_dropout_rate=dropout, rngs=nnx.Rngs(0),
                                            **kwargs))
  layer.kernel, layer.bias = linear.kernel, linear.bias
  layer.lora, layer.lora_dropout = _make_adapter(n_in, rank, n_out, linear.dtype, dropout, rngs,
                                                 lead[0] if lead else None)
  return layer


def plain_linear_from(layer: LoRALinear) -> nnx.Linear:
  """An `nnx.Linear` whose kernel is `layer`'s merged kernel (a new Variable); same bias."""
  kwargs = _linear_kwargs(layer)
  n_in, n_out = layer.in_features, layer.out_features
  linear = nnx.eval_shape(lambda: nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0), **kwargs))
  linear.kernel = layer.kernel.replace(layer.merged_kernel())  # Keeps the Variable's metadata.
  linear.bias = layer.bias
  return linear


# ---------------------------------------------------------------- walking the module tree


def _get(node: Any, key: Any) -> Any:
  return node[key] if isinstance(key, int) else getattr(node, key)


def _set(node: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    node[key] = value
  else:
    setattr(node, key, value)


def _replace(root: nnx.Module, path: Path, value: nnx.Module) -> None:
  parent = root
  for key in path[:-1]:
    parent = _get(parent, key)
  _set(parent, path[-1], value)


def lora_layers(model: nnx.Module) -> dict[Path, LoRALinear]:
  """{module path: layer} of every `LoRALinear` in `model`, in graph order."""
  return {tuple(p): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def has_dropout(model: nnx.Module) -> bool:
  """True when some adapter of `model` applies dropout (it then needs fresh keys every step)."""
  return any(isinstance(v, LoRADropoutKey) for _, v in nnx.to_flat_state(nnx.state(model)))


def has_lora(model: nnx.Module) -> bool:
  """Whether `model` holds any LoRA adapter (a `LoRALinear` or an `nnx.LoRAParam`)."""
  return bool(lora_layers(model)) or any(
      isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model)))


# ---------------------------------------------------------------- public API


def _check_options(rank: Any, alpha: Any, dropout: Any, target_modules: Sequence[str]) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"lora alpha must be a positive number, got {alpha!r}")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
  if isinstance(target_modules, str):
    raise TypeError(f"lora target_modules must be a sequence of names, got the string "
                     f"{target_modules!r}")
  unknown = sorted(set(target_modules) - set(LORA_TARGETS))
  if unknown:
    raise ValueError(f"unknown lora target_modules {unknown}; valid: {list(LORA_TARGETS)}")
  if not target_modules:
    raise ValueError(f"lora target_modules is empty; valid: {list(LORA_TARGETS)}")


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               target_modules: Sequence[str] = LORA_TARGETS, rngs: nnx.Rngs) -> nnx.Module:
  """Adds LoRA adapters to the targeted Linear layers of `model.language_model`, in place.

  Only the language model is adapted (not the vision tower, projector or `lm_head`). The base
  weights are shared, not copied; B starts at zero, so the model's output is unchanged.

  Args:
    model: a `LlavaForConditionalGeneration` or `Qwen2VLForConditionalGeneration` (anything
      with a `language_model` submodule).
    rank: adapter rank r (>= 1).
    alpha: scaling numerator; the update is scaled by alpha / r.
    dropout: dropout rate on the adapter input, in [0, 1); active only after `model.train()`.
    target_modules: Linear names inside the decoder layers, a subset of `LORA_TARGETS`.
    rngs: initialises A (`params` stream, He-uniform) and seeds the dropout streams.

  Returns:
    `model` itself.

  Raises:
    ValueError: bad rank / alpha / dropout, unknown target names (listing the valid ones), or a
      model that already has LoRA.
    TypeError: `target_modules` given as one string, or a model without `language_model`.
  """
  _check_options(rank, alpha, dropout, target_modules)
  lm = getattr(model, "language_model", None)
  if not isinstance(lm, nnx.Module):
    raise TypeError(f"{type(model).__name__} has no language_model submodule to adapt")
  if has_lora(model):
    raise ValueError("the model already has LoRA adapters; merge_lora it before applying again")
  targets = set(target_modules)
  found = [(tuple(p), m) for p, m in nnx.iter_graph(lm)
           if type(m) is nnx.Linear and p and p[-1] in targets]
  missing = sorted(targets - {p[-1] for p, _ in found})
  if missing:
    raise ValueError(f"lora target_modules {missing} match no Linear layer of the language model")
  for path, linear in found:
    _replace(lm, path, lora_linear_from(linear, rank=rank, alpha=float(alpha),
                                        dropout=float(dropout), rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel (W + alpha/r · A·B) and removes it, in place.

  The result is a plain model again: `nnx.Linear` layers, no `nnx.LoRAParam`, no dropout state,
  the same parameter paths as a model that never had LoRA, and the same outputs as the adapted
  model in eval mode. Without adapters it does nothing.

  Returns:
    `model` itself.
  """
  for path, layer in lora_layers(model).items():
    _replace(model, path, plain_linear_from(layer))
  return model


def merged_params(model: nnx.Module
                  ) -> Iterator[tuple[Path, nnx.Variable, Callable[..., jax.Array]]]:
  """The variables of `model` as `merge_lora` would leave them, without changing `model`.

  Yields (path, variable, value getter) for every variable except the adapters' (`lora.*`,
  `lora_dropout.*` of each `LoRALinear`); a LoRA layer's kernel getter returns the merged kernel,
  computed only when called (one kernel at a time, for streaming exports). A getter takes an
  optional row: `get(i)` is layer i's value of a variable of stacked layers (for a LoRA kernel,
  only that layer is merged), `get()` the whole value.
  """
  layers = lora_layers(model)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    path = tuple(path)
    if _is_adapter(path, layers):
      continue
    owner = layers.get(path[:-1])
    if owner is not None and path[-1] == "kernel":
      yield path, var, owner.merged_kernel
    else:
      yield path, var, _row_getter(var)


def _row_getter(var: nnx.Variable) -> Callable[..., jax.Array]:
  def get(row: int | None = None) -> jax.Array:
    value = var.get_value()
    return value if row is None else value[row]
  return get


def _is_adapter(path: Path, layers: dict[Path, LoRALinear]) -> bool:
  """Whether `path` lies under the `lora` or `lora_dropout` part of a LoRA layer."""
  return any(path[i] in ("lora", "lora_dropout") and path[:i] in layers
             for i in range(1, len(path)))


def _as_key(key: jax.Array | int) -> jax.Array:
  if isinstance(key, int):
    return jax.random.key(key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(key)  # A raw uint32 `PRNGKey`.
  return key


def with_dropout_key(state: nnx.State, key: jax.Array | int) -> nnx.State:
  """`state` with every `LoRADropoutKey` replaced by `fold_in(key, i)` (i-th in path order);
  a stacked one ([L] keys, one per decoder layer) by L keys split from it.

  Pure (builds new Variables, mutates nothing), so a jitted train step can refresh the masks of
  the frozen / non-trainable state it was given, e.g. with `jax.random.fold_in(seed_key, step)`
  and again per accumulation micro-batch. A state without dropout keys comes back unchanged.
  """
  key = _as_key(key)
  out, i = [], 0
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, LoRADropoutKey):
      new = jax.random.fold_in(key, i)
      shape = var.get_value().shape
      var = var.replace(jax.random.split(new, shape) if shape else new)
      i += 1
    out.append((path, var))
  return nnx.from_flat_state(out)


def reseed_dropout(model: nnx.Module, key: jax.Array | int) -> None:
  """In place: the keys `with_dropout_key` would give (same masks for the same key)."""
  nnx.update(model, with_dropout_key(nnx.state(model, LoRADropoutKey), key))


# ---------------------------------------------------------------- what the optimizer updates


lora_filter: nnx.filterlib.Filter = nnx.LoRAParam
"""The adapter parameters (every `nnx.LoRAParam`)."""

projector_filter: nnx.filterlib.Filter = nnx.Any(
    nnx.PathContains("multi_modal_projector"),
    nnx.All(nnx.PathContains("visual"), nnx.PathContains("merger")))
"""The vision-to-text projector: LLaVA's `multi_modal_projector`, Qwen2-VL's `visual.merger`."""

vision_tower_filter: nnx.filterlib.Filter = nnx.Any(
    nnx.PathContains("vision_tower"),
    # Qwen2-VL's merger lives inside `visual` but plays the projector's part: never frozen with
    # the tower, so that both models train the same pieces.
    nnx.All(nnx.PathContains("visual"), nnx.Not(nnx.PathContains("merger"))))
"""The vision encoder without its projector: LLaVA's `vision_tower`, Qwen2-VL's `visual` less
`merger`."""


def trainable_filter(freeze_vision_tower: bool = True, lora: bool = False
                     ) -> nnx.filterlib.Filter:
  """nnx filter for the parameters the optimizer updates.

  Without `lora`: every `nnx.Param`, except the vision tower's when it is frozen (the trainer's
  current rule). With `lora`: the adapters (`nnx.LoRAParam`) and the whole projector (trained
  fully, as in LLaVA's LoRA recipe), plus the vision tower when it is not frozen; the rest of the
  language model (base kernels, embeddings, norms, `lm_head`) stays frozen and therefore holds no
  optimizer state. Tower and projector as `vision_tower_filter` / `projector_filter` (LLaVA and
  Qwen2-VL).
  """
  if not lora:
    if freeze_vision_tower:
      return nnx.All(nnx.Param, nnx.Not(vision_tower_filter))
    return nnx.Param
  parts = [lora_filter, nnx.All(nnx.Param, projector_filter)]
  if not freeze_vision_tower:
    parts.append(nnx.All(nnx.Param, vision_tower_filter))
  return nnx.Any(*parts)
