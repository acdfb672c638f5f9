"""Llama-style decoder in Flax NNX with segment-aware causal attention and a functional KV cache.

Module paths match HF `LlamaModel` (`embed_tokens`, `layers.self_attn.{q,k,v,o}_proj`,
`layers.mlp.{gate,up,down}_proj`, `layers.input_layernorm`, `layers.post_attention_layernorm`,
`norm`) except for the layer index: the decoder layers are one `LlamaDecoderLayer` whose every
parameter has a leading [num_hidden_layers] axis, run by one `lax.scan` (`scan_layers`), so HF's
`layers.{i}.mlp.up_proj.weight` is row i of our `layers.mlp.up_proj.kernel` (`is_stacked`,
`layer_path`; hf_io and qwen2vl_io map the names). Parameter leaves use NNX names (`kernel`
[in, out], `bias`, `scale`, `embedding`).

Attention rule, shared by training and generation: a query at row slot q attends to key slot s iff
s <= q and both carry the same segment id. Padding (segment 0) therefore only sees padding, and
every query sees at least itself, so no softmax row is empty and padded rows stay finite.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from visatb_jax.model.config import TextConfig
from visatb_jax.runtime.sharding import with_logical_constraint as _constrain

_NEG = float(jnp.finfo(jnp.float32).min)  # Finite "minus infinity": masked scores never make NaN.

# Activation layouts (logical names, sharding.DEFAULT_RULES): rows over the batch axes, heads over
# `tensor`, the model dimension whole. Without them XLA's propagation follows the FSDP-sharded
# weights instead and keeps the whole global batch's attention scores on every device (the
# dry run measured 72 GiB per device for a 2-layer 7B-wide model on 64 devices, 2 rows each).
# No-ops outside a mesh context (sharding.with_logical_constraint).
_HIDDEN_AXES = ("batch", "length", None)
_Q_AXES = ("batch", "length", "heads", None)
_KV_AXES = ("batch", "length", "kv_heads", None)
_SCORE_AXES = ("batch", "kv_heads", None, "length", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Functional KV cache: passed into the decoder and returned updated, never mutated.

  All rows share one write cursor `index`, which fits left-padded prompt batches: prefill writes
  slots [0, L_prompt) for every row, then each decode step writes one slot for every row.

  Keys and values are stacked along a leading layer axis, as the layers' parameters are, so the
  decoder's layer scan carries them and writes each step's new slots in place.

  Attributes:
    keys: [num_layers, B, max_len, num_kv_heads, head_dim] (rotary embedding already applied).
    values: [num_layers, B, max_len, num_kv_heads, head_dim].
    segment_ids: int32 [B, max_len], segment of each written slot; 0 for padding and unwritten
      slots.
    index: int32 scalar, the next slot to write.
  """

  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, config: TextConfig, batch_size: int, max_len: int,
           dtype: Any = jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads,
             config.head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]


def dense(layer: nnx.Module, x: jax.Array) -> jax.Array:
  """`layer(x)` with the leading dimensions of x flattened into one.

  Why: XLA:CPU computes the weight gradient of a dense layer on [B, T, D] inputs (a contraction
  over two dimensions) about 3x slower than on [B * T, D] (measured on the demo's LM head:
  17.3 vs 5.9 ms); the values are the same.
  """
  lead = x.shape[:-1]
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*lead, y.shape[-1])


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, head_dim] for positions [B, T] (HF layout: freqs repeated twice)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim / 2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, heads, head_dim] with HF's rotate_half convention; math in float32.

  The gradient (x's only: cos and sin come from integer positions) is written out because
  autodiff's transpose of the split/concatenate is a sum of padded halves, which XLA:CPU ran at
  under 1 GB/s (1.75 ms of the demo model's 22 ms attention layer, forward + backward).
  """
  xf = x.astype(jnp.float32)
  return (xf * cos[:, :, None] + _rotate_half(xf) * sin[:, :, None]).astype(x.dtype)


def _apply_rope_fwd(x, cos, sin):
  return apply_rope(x, cos, sin), (cos, sin)


def _apply_rope_bwd(res, dy):
  # rotate_half is the matrix R = [[0, -I], [I, 0]] and R^T = -R: dx = dy*cos - R(dy*sin).
  cos, sin = res
  dyf = dy.astype(jnp.float32)
  dx = dyf * cos[:, :, None] - _rotate_half(dyf * sin[:, :, None])
  return dx.astype(dy.dtype), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def attention_mask(q_slots: jax.Array, q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """bool [B, T, S]: key slot s visible from query slot q[t] iff s <= q[t] and segments match.

  Args:
    q_slots: int32 [T], slot of each query in the row (arange for a full sequence; cache cursor +
      arange during generation).
    q_segments: int32 [B, T].
    k_segments: int32 [B, S], segment of each key slot.
  """
  k_slots = jnp.arange(k_segments.shape[1])
  causal = k_slots[None, None, :] <= q_slots[None, :, None]
  return causal & (q_segments[:, :, None] == k_segments[:, None, :])


def query_block_size(t: int) -> int:
  """Query rows per block of the training attention: at most 8 blocks, at least 64 rows each.

  Block [a, z) needs keys [0, z) only, so blocks skip most of the causally masked upper triangle
  that one [t, t] score matrix computes and throws away (8 blocks compute 56 % of it, 4 blocks
  62 %). Why not smaller: each block adds a few small ops. B1's tiny model (t = 256), forward +
  backward, in one process: 64 rows 11 % faster than one block, 32 rows slower than 64.
  """
  return max(64, -(-t // 8))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention of scaled q [b, kvh, g, t, hd] over k, v [b, kvh, s, hd]; mask [b, t, s].

  Both products run as plain batched matmuls over (row, kv head), with the group's queries
  stacked along the query length: written as one 5-d einsum, XLA:CPU took 2.5x longer for
  attention's forward + backward (BENCHMARKS.md, B1).
  """
  return _attend_with_exps(q, k, v, mask)[0]


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
  """[a, z) of each query block; `block` <= 0 or >= t: one block."""
  if block <= 0 or block >= t:
    return [(0, t)]
  return [(a, min(a + block, t)) for a in range(0, t, block)]


def _exp_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """e = exp(scores - row max), 0 where masked, float32 [b, kvh, g, t, s], and its row sums l
  [b, kvh, g, t, 1]: softmax = e / l. Args as `_attend`."""
  b, kvh, group, t, hd = q.shape
  scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kvh, group * t, hd), k,
                      preferred_element_type=jnp.float32)
  scores = _constrain(scores.reshape(b, kvh, group, t, k.shape[2]), _SCORE_AXES)
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
  return e, e.sum(axis=-1, keepdims=True)


def _attend_with_exps(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(`_attend`'s output, e, l) with e, l from `_exp_scores`: softmax normalised after the PV
  product, so no pass over the scores divides them."""
  e, l = _exp_scores(q, k, mask)
  o = jnp.einsum("bkqs,bksd->bkqd", _grouped(e).astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return (o.reshape(e.shape[:4] + v.shape[-1:]) / l).astype(v.dtype), e, l


def _grouped(x: jax.Array) -> jax.Array:
  """[b, kvh, g, t, ...] -> [b, kvh, g * t, ...]: a kv group's queries stacked along the length."""
  return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     block: int) -> jax.Array:
  """`_attend` over a full sequence (keys = the queries' own slots), in query blocks of `block`.

  Exact: every query sees only keys at slots <= its own (`mask` is causal), so block [a, z) loses
  nothing by reading keys [0, z) only; each block's softmax is over all the keys it may see.
  Args as `_attend`, with s = t; `block` <= 0 or >= t: one block.

  The gradient is written out (`_causal_attention_bwd`), as flash attention's is: softmax
  normalised after the PV product, dS = P * (dP - rowsum(dO * O)) with no score-sized reduction
  and no mask pass (P is 0 where masked), dK and dV made transposed ([.., hd, s], the product
  form XLA:CPU runs 3x faster than [.., s, hd]) and added into their key prefix in place.
  Autodiff's version took 22 ms of the demo model's attention layer where this takes 15
  (BENCHMARKS.md, B1).
  """
  return _causal_attention_fwd(q, k, v, mask, block)[0]


def _causal_attention_fwd(q, k, v, mask, block):
  outs, exps = [], []
  for a, z in _query_blocks(q.shape[3], block):
    o, e, l = _attend_with_exps(q[:, :, :, a:z], k[:, :, :z], v[:, :, :z], mask[:, a:z, :z])
    outs.append(o)
    exps.append((e, l))
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, out, exps)


def _causal_attention_bwd(block, res, dout):
  q, k, v, out, exps = res
  b, kvh, _, t, hd = q.shape
  f32 = jnp.float32
  dq, dk_t, dv_t = [], jnp.zeros((b, kvh, hd, t), f32), jnp.zeros((b, kvh, hd, t), f32)
  for (a, z), (e, l) in zip(_query_blocks(t, block), exps):
    do = dout[:, :, :, a:z].astype(f32) / l  # dO / l: P = e / l without a score-sized pass
    delta = jnp.sum(do * out[:, :, :, a:z].astype(f32), axis=-1, keepdims=True)
    dp = jnp.einsum("bkqd,bksd->bkqs", _grouped(do).astype(v.dtype), v[:, :, :z],
                    preferred_element_type=f32)
    ds = _grouped(e) * (dp - _grouped(delta))  # = P * (dP - rowsum(dP * P)), 0 where masked
    ds = _constrain(ds.reshape(e.shape), _SCORE_AXES)
    ds = _grouped(ds).astype(q.dtype)
    dq.append(jnp.einsum("bkqs,bksd->bkqd", ds, k[:, :, :z], preferred_element_type=f32)
              .reshape(e.shape[:4] + (hd,)).astype(q.dtype))
    dk_t = dk_t.at[..., :z].add(
        jnp.einsum("bkqs,bkqd->bkds", ds, _grouped(q[:, :, :, a:z]), preferred_element_type=f32))
    dv_t = dv_t.at[..., :z].add(
        jnp.einsum("bkqs,bkqd->bkds", _grouped(e).astype(v.dtype), _grouped(do).astype(v.dtype),
                   preferred_element_type=f32))
  return (jnp.concatenate(dq, axis=3), dk_t.swapaxes(-1, -2).astype(k.dtype),
          dv_t.swapaxes(-1, -2).astype(v.dtype), None)


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


class LlamaAttention(nnx.Module):
  """Grouped-query attention with rotary embeddings; einsum attention, float32 softmax."""

  def __init__(self, config: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    d, hd = config.hidden_size, config.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d, self.num_heads * hd, use_bias=config.attention_bias, **kw)
    self.k_proj = nnx.Linear(d, self.num_kv_heads * hd, use_bias=config.attention_bias, **kw)
    self.v_proj = nnx.Linear(d, self.num_kv_heads * hd, use_bias=config.attention_bias, **kw)
    self.o_proj = nnx.Linear(self.num_heads * hd, d, use_bias=False, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
               layer: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x [B, T, D] -> ([B, T, D], the updated stacked (keys, values) or None).

    Without `kv`, keys are this call's own T tokens and `mask` is [B, T, T]; with `kv`, the
    whole cache's stacked (keys, values) [L, B, max_len, kv_heads, head_dim], the new keys are
    written at slot `index` of layer `layer` (only those T slots: in place inside the layer
    scan), attention reads that layer's keys, and `mask` is [B, T, max_len].
    """
    b, t, _ = x.shape
    q = _constrain(dense(self.q_proj, x).reshape(b, t, self.num_heads, self.head_dim), _Q_AXES)
    k = _constrain(dense(self.k_proj, x).reshape(b, t, self.num_kv_heads, self.head_dim),
                   _KV_AXES)
    v = _constrain(dense(self.v_proj, x).reshape(b, t, self.num_kv_heads, self.head_dim),
                   _KV_AXES)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      new_kv = tuple(jax.lax.dynamic_update_slice(c, n[None].astype(c.dtype),
                                                  (layer, 0, index, 0, 0))
                     for c, n in zip(kv, (k, v)))
      k, v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False).astype(q.dtype)
              for c in new_kv)
    kvh, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    # Query head h reads kv head h // group (HF repeat_kv), hence the [kv, group] split of heads.
    q = (q * hd**-0.5).reshape(b, t, kvh, group, hd).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, t, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, s, hd]
    if kv is None:  # training: keys are this call's tokens, so the causal blocks apply
      out = causal_attention(q, k, v, mask, query_block_size(t))
    else:
      out = _attend(q, k, v, mask)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * hd)
    return dense(self.o_proj, out), new_kv


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nnx.Linear(d, f, **kw)
    self.up_proj = nnx.Linear(d, f, **kw)
    self.down_proj = nnx.Linear(f, d, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(self.down_proj, jax.nn.silu(dense(self.gate_proj, x)) * dense(self.up_proj, x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
    self.self_attn = LlamaAttention(config, **kw)
    self.post_attention_layernorm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps,
                                                **kw)
    self.mlp = LlamaMLP(config, **kw)

  def __call__(self, x, cos, sin, mask, kv=None, index=None, layer=None):
    x = _constrain(x, _HIDDEN_AXES)
    h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, layer)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), new_kv


LAYERS = "layers"
"""Attribute name of the stacked decoder layers (HF's `layers`, without the layer index)."""


def stacked_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                   rngs: nnx.Rngs) -> nnx.Module:
  """`make(rngs)` built `num_layers` times as one module whose Variables have a leading
  [num_layers] axis (Flax NNX's scan-over-layers pattern); each layer gets its own keys."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
  def build(rngs):
    return make(rngs)

  return build(rngs)


def _layer_name_index(path: Sequence[Any]) -> int | None:
  """Position of `LAYERS` in a parameter path of stacked layers (a name, not a layer index,
  follows it); None for any other path (e.g. the CLIP tower's per-layer `layers.0.…`)."""
  for i, p in enumerate(path[:-1]):
    nxt = path[i + 1]
    if str(p) == LAYERS and not isinstance(nxt, int) and not str(nxt).isdigit():
      return i
  return None


def is_stacked(path: Sequence[Any]) -> bool:
  """Whether the parameter at `path` holds every decoder layer, stacked on its first axis."""
  return _layer_name_index(path) is not None


def layer_path(path: Sequence[Any], layer: int) -> tuple[Any, ...]:
  """Path of layer `layer`'s row of a stacked parameter, spelled as HF's per-layer modules:
  `(..., "layers", "mlp", "up_proj", "kernel")` -> `(..., "layers", 3, "mlp", "up_proj",
  "kernel")`."""
  i = _layer_name_index(path)
  if i is None:
    raise ValueError(f"{'.'.join(map(str, path))} is not a parameter of stacked layers")
  return tuple(path[:i + 1]) + (layer,) + tuple(path[i + 1:])


def scan_layers(layers: LlamaDecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array,
                mask: jax.Array, *, remat: bool = False,
                policy: Callable[..., bool] | None = None, cache_kv: Any = None,
                index: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """The stacked layers as one `lax.scan` over their parameters' leading axis.

  The scan reads each layer's row of the stacked parameters in place, so no per-call copy of
  the stack exists, and the backward pass accumulates the gradients straight into their stacked
  layout. With `remat` each step is rematerialised (`jax.checkpoint`, `policy`): XLA's CPU
  scheduler (and any scheduler free to reorder) runs the recomputed forwards of an unrolled
  stack together, so remat saves nothing there (measured: the same temp size with and without
  it); inside a scan only one layer's activations are ever live, and the saved residuals are the
  layer inputs (or what `policy` keeps). The scan also compiles one layer instead of N.
  With `cache_kv` (the stacked keys, values of a `KVCache`) they ride in the carry and each
  layer writes its new slots at `index` in place; returns them updated (else None).
  Pure split/merge: the layers hold only parameters (and LoRA dropout keys that are only read),
  so nothing flows back into the graph.
  """
  graphdef, state = nnx.split(layers)
  num_layers = jax.tree.leaves(state)[0].shape[0]

  def body(carry, xs):
    h, kv = carry
    layer_state, i = xs
    h, kv = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, kv, index, i)
    return (h, kv), None

  if remat:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  # Without remat and without a cache (a small model's training step): unrolled, so each layer
  # reads its row of the stack by a static slice that XLA fuses into its matmuls.
  unroll = not remat and cache_kv is None
  (x, cache_kv), _ = jax.lax.scan(body, (x, cache_kv),
                                  (state, jnp.arange(num_layers, dtype=jnp.int32)),
                                  unroll=num_layers if unroll else 1)
  return x, cache_kv


class LlamaModel(nnx.Module):
  """Token embedding + decoder layers + final RMSNorm (HF `LlamaModel`)."""

  def __init__(self, config: TextConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: bool = False,
               remat_policy: Callable[..., bool] | None = None, rngs: nnx.Rngs):
    """Builds the decoder.

    Args:
      config: decoder shape.
      dtype: compute dtype (activations, matmuls); softmax and norms statistics stay float32.
      param_dtype: parameter storage dtype.
      remat: rematerialise each layer in the backward pass (`jax.checkpoint`) to save activation
        memory. Layers must stay parameter-only (no RNG / batch-stat updates) for this to be exact.
        (Layers are scanned with or without it.)
      remat_policy: optional `jax.checkpoint_policies` policy used when `remat` is set.
      rngs: parameter initialisation.
    """
    self.config = config
    self.dtype = dtype
    self.remat = remat
    self.remat_policy = remat_policy
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.layers = stacked_layers(
        lambda rngs: LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        config.num_hidden_layers, rngs)
    self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype: Any | None = None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + generated)."""
    return KVCache.init(self.config, batch_size, max_len, self.dtype if dtype is None else dtype)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on embeddings.

    Args:
      inputs_embeds: [B, T, D].
      positions: int32 [B, T], rotary positions (restart at 0 for every packed sample).
      segment_ids: int32 [B, T], 1, 2, ... per sample, 0 for padding.
      cache: None for a full-sequence pass (training); a `KVCache` to append these T tokens at
        `cache.index` and attend over everything cached so far (prefill / decode).

    Returns:
      (hidden [B, T, D] after the final norm, in the compute dtype; the updated cache or None).
    """
    cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
    return self.run_layers(inputs_embeds, cos, sin, segment_ids, cache)

  def run_layers(self, inputs_embeds: jax.Array, cos: jax.Array, sin: jax.Array,
                 segment_ids: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
    """The decoder after its rotary tables: masks, the layer scan, final norm.

    Split from `__call__` so that decoders with other rotary schemes (Qwen2-VL's M-RoPE) reuse
    everything else unchanged.

    Args:
      inputs_embeds: [B, T, D].
      cos: float32 [B, T, head_dim], rotary table of these T tokens.
      sin: float32 [B, T, head_dim].
      segment_ids: int32 [B, T], 1, 2, ... per sample, 0 for padding.
      cache: as `__call__`.

    Returns:
      As `__call__`.
    """
    t = inputs_embeds.shape[1]
    x = inputs_embeds.astype(self.dtype)
    segment_ids = segment_ids.astype(jnp.int32)
    if cache is None:
      mask = attention_mask(jnp.arange(t), segment_ids, segment_ids)
      index, new_segments = None, None
    else:
      if cache.max_len < t:
        raise ValueError(f"{t} tokens do not fit a cache of {cache.max_len} slots")
      index = cache.index
      new_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
      mask = attention_mask(index + jnp.arange(t), segment_ids, new_segments)

    # Remat only in training: generation has no backward pass, and the cache rides in the carry.
    x, kv = scan_layers(self.layers, x, cos, sin, mask, remat=self.remat and cache is None,
                        policy=self.remat_policy,
                        cache_kv=None if cache is None else (cache.keys, cache.values),
                        index=index)
    x = self.norm(x)
    if cache is None:
      return x, None
    return x, KVCache(keys=kv[0], values=kv[1], segment_ids=new_segments, index=index + t)


def default_positions_and_segments(input_ids: jax.Array, positions: jax.Array | None,
                                   segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """arange positions and a single segment per row where not given (unpacked rows)."""
  b, l = input_ids.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  if segment_ids is None:
    segment_ids = jnp.ones((b, l), jnp.int32)
  return positions, segment_ids


def make_lm_head(config: TextConfig, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs) -> nnx.Linear | None:
  """The output projection, or None when it is tied to the token embedding."""
  if config.tie_word_embeddings:
    return None
  # float32 accumulation: the loss reads these logits, and bf16 logits would lose precision.
  return nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                    param_dtype=param_dtype, preferred_element_type=jnp.float32, rngs=rngs)


def lm_logits(hidden: jax.Array, lm_head: nnx.Linear | None, embed_tokens: nnx.Embed) -> jax.Array:
  """float32 logits [..., V] from hidden states, via `lm_head` or (when None) tied embeddings."""
  if lm_head is not None:
    return dense(lm_head, hidden).astype(jnp.float32)
  table = embed_tokens.embedding[...].astype(hidden.dtype)
  return jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=jnp.float32)


class LlamaForCausalLM(nnx.Module):
  """Text-only causal LM (HF `LlamaForCausalLM`: `model` + `lm_head`)."""

  def __init__(self, config: TextConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: bool = False,
               remat_policy: Callable[..., bool] | None = None, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                            remat_policy=remat_policy, rngs=rngs)
    self.lm_head = make_lm_head(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids int32 [B, L] -> logits float32 [B, L, V]; default: arange positions, 1 segment."""
    positions, segment_ids = default_positions_and_segments(input_ids, positions, segment_ids)
    hidden, _ = self.model(self.model.embed_tokens(input_ids), positions, segment_ids)
    return lm_logits(hidden, self.lm_head, self.model.embed_tokens)
