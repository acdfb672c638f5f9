"""Batched greedy decoding with a KV cache, jit-compiled once per (model structure, shapes).

Prompts are LEFT-padded so that every row's last prompt token sits in the same column and all rows
share one cache cursor. Positions restart at 0 on each row's first real token; padding gets
segment 0, real tokens segment 1, so real tokens never attend to padding.

Output convention: `[B, max_new_tokens]` int32 generated tokens; the EOS token itself is NOT
included — it and everything after it are `pad_id`.

With a mesh, the prompt rows are split over the mesh's batch axes (every device of every host
decodes its own rows; each process supplies the shards its devices hold from the same host array),
the model's activation constraints apply, and the generated tokens come back replicated, so every
process holds the whole batch's answers.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from visatb_jax.runtime import sharding as sharding_lib


def check_prompt(prompt_ids: Any, prompt_mask: Any,
                 max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) as int32 numpy after checking they are left-padded prompts [B, L].

  Shared by every greedy decoder (this module, qwen2vl), hence public.

  Raises:
    ValueError: shapes differ or are not 2-D, max_new_tokens < 1, a mask value other than 0 / 1,
      or a row that is not left-padded or has no real token (the rows are named).
  """
  ids = np.asarray(prompt_ids, np.int32)
  mask = np.asarray(prompt_mask, np.int32)
  if ids.ndim != 2 or ids.shape != mask.shape:
    raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [B, L]")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not np.isin(mask, (0, 1)).all():
    raise ValueError("prompt_mask must hold only 0 and 1")
  # Left padding <=> the mask never drops from 1 back to 0 along a row.
  bad = np.nonzero((np.diff(mask, axis=1) < 0).any(axis=1) | (mask.sum(axis=1) == 0))[0]
  if bad.size:
    raise ValueError(f"rows {bad.tolist()} are not left-padded prompts with at least one real "
                     "token")
  return ids, mask


def _prompt_positions(mask: jax.Array) -> jax.Array:
  """0 on the first real token of each left-padded row; padding clamps to 0."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _greedy(model, prompt_ids, prompt_mask, images, positions, eos_id, pad_id, *,
            max_new_tokens: int, decode_kernels=None):
  """Traceable greedy decoding: prefill, then a while_loop of one-token decode steps.

  `positions`: the prompt's, [B, L] or M-RoPE [B, 3, L]; None: from the mask.
  `decode_kernels`: {module path "a/b/0/c": kernel [out, in] (stacked layers' [L, out, in])}; the
  decode loop multiplies those
  layers with them (`_with_decode_kernels`, XLA:CPU's faster form). None: the model as it is.
  """
  b, prompt_len = prompt_ids.shape
  # The last generated token is never fed back, hence max_new_tokens - 1 decode slots.
  cache = model.init_cache(b, prompt_len + max_new_tokens - 1)
  if positions is None:
    positions = _prompt_positions(prompt_mask)
  embeds = model.embed_inputs(prompt_ids, images)
  logits, cache = model.decode(embeds, positions, prompt_mask, cache, last_only=True)
  # Left padding puts every row's last prompt token in the last column. Token i - 1 (just
  # produced) sits at that token's position + i, in every component.
  last = positions[..., -1]
  if decode_kernels:
    model = _with_decode_kernels(model, decode_kernels)
  return decode_greedily(model, logits, cache, lambda i: (last + i)[..., None], eos_id,
                         pad_id, max_new_tokens=max_new_tokens)


# Decoding on XLA:CPU: each step multiplies a few rows (B tokens) by every weight matrix, so it is
# bound by reading the weights. XLA:CPU reads an [in, out] kernel for x [B, in] @ kernel at about
# 5.5 GB/s (B = 8, one core, 100M model's shapes), but an [out, in] kernel for kernel @ x^T at
# 8-11 GB/s; hence the decode loop's dense layers use transposed copies of their kernels
# (B4 at 100M, 8 rows, 32 tokens: decode step 79 -> 59 ms on one core, 45 -> 36 ms on two,
# 2026-12-02). Transposing is slow (1.2-2 GB/s: 0.21-0.35 s for the 100M model's 416 MB of
# kernels on one core), so the copies are made once per set of parameters and kept while those
# parameters live (`_decode_kernels`): evaluation decodes batch after batch with one model.
# Only for calls of at least _TRANSPOSE_MIN_NEW_TOKENS tokens (a one-off call pays the transpose:
# at 4 tokens it took 16 % longer, at 16 tokens 8 % less) and kernels of at least
# _TRANSPOSE_MIN_BYTES (smaller ones stay in the core's cache; transposing them made the demo
# model's decoding 6 % slower; for the stacked decoder layers the size of one layer's kernel,
# which is what each step of the layer scan multiplies). The copies cost their size in memory,
# hence the bound on their total and the single cached set.
_TRANSPOSE_MIN_NEW_TOKENS = 16
_TRANSPOSE_MIN_BYTES = 256 << 10
_TRANSPOSE_MAX_BYTES = 2 << 30


def _kernel_first_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
  """`nnx.Linear`'s product for a kernel stored [out, in]: kernel @ lhs^T, moved to [..., out]."""
  if out_sharding is not None:
    raise ValueError("a transposed decoding kernel takes no out_sharding")
  (lhs_contract, _), _ = dimension_numbers
  y = jax.lax.dot_general(rhs, lhs, (((1,), lhs_contract), ((), ())), precision=precision,
                          preferred_element_type=preferred_element_type)
  # The barrier keeps XLA from folding the transpose into the dot, which swaps its operands
  # back to the slow form.
  return jnp.moveaxis(jax.lax.optimization_barrier(y), 0, -1)


def _transposable_linears(model) -> list[tuple[str, nnx.Linear]]:
  """(path as "a/b/0/c", layer) of the plain `nnx.Linear` layers of at least
  `_TRANSPOSE_MIN_BYTES` (per layer, for stacked layers) whose kernels the CPU decode loop uses
  transposed; none when they exceed `_TRANSPOSE_MAX_BYTES` in all. LoRA and other subclasses are
  left as they are."""
  nbytes = lambda m: m.kernel[...].size * m.kernel[...].dtype.itemsize  # noqa: E731
  # One layer's [in, out] of a stacked kernel [L, in, out]: what each layer-scan step reads.
  layer_nbytes = lambda m: nbytes(m) // math.prod(m.kernel[...].shape[:-2])  # noqa: E731
  linears = [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
             if type(m) is nnx.Linear and m.dot_general is jax.lax.dot_general
             and layer_nbytes(m) >= _TRANSPOSE_MIN_BYTES]
  if sum(nbytes(m) for _, m in linears) > _TRANSPOSE_MAX_BYTES:
    return []
  return linears


def _with_decode_kernels(model, decode_kernels):
  """A copy of `model` (traced) whose layers at `decode_kernels`' paths hold those [out, in]
  kernels and multiply with `_kernel_first_dot`: the same values, the form XLA:CPU decodes
  faster. `model` itself is unchanged."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  for path, m in nnx.iter_modules(copy):
    key = "/".join(map(str, path))
    if key in decode_kernels:
      m.kernel = nnx.Param(decode_kernels[key])
      m.dot_general = _kernel_first_dot
  return copy


class _DecodeKernelCache:
  """The transposed kernels of the last decoded model, kept while its kernels live.

  Keyed by the kernel arrays themselves (jax arrays are immutable: a training step or a load
  makes new ones, which miss), held through weak references so a dead model's copies are freed
  with it. One set at a time bounds the memory to `_TRANSPOSE_MAX_BYTES`.
  """

  def __init__(self):
    # Re-entrant: a weak reference dies (and calls `_drop`) whenever the collector runs.
    self._lock = threading.RLock()
    self._refs: tuple = ()
    self._copies: dict = {}

  def get(self, model) -> dict:
    linears = _transposable_linears(model)
    kernels = [m.kernel[...] for _, m in linears]
    if not kernels:
      return {}
    with self._lock:
      if (len(self._refs) == len(kernels)
          and all(r() is k for r, k in zip(self._refs, kernels))):
        return self._copies
    copies = {path: _transpose(k) for (path, _), k in zip(linears, kernels)}
    with self._lock:
      self._refs = tuple(weakref.ref(k, self._drop) for k in kernels)
      self._copies = copies
    return copies

  def _drop(self, dead_ref):
    with self._lock:
      if dead_ref in self._refs:
        self._refs, self._copies = (), {}

  def clear(self):
    with self._lock:
      self._refs, self._copies = (), {}


# The last two axes only: a stacked kernel [L, in, out] becomes [L, out, in], each layer's row
# what `_kernel_first_dot` multiplies inside the layer scan.
_transpose = jax.jit(lambda k: jnp.swapaxes(k, -1, -2))
_decode_kernels = _DecodeKernelCache()


def decode_greedily(model, prefill_logits, cache, position_of, eos_id, pad_id, *,
                    max_new_tokens: int) -> jax.Array:
  """The tokens [B, max_new_tokens] after a prefill: a while_loop of one-token decode steps that
  stops when every row has produced `eos_id` (then padded with `pad_id`).

  `position_of(i)`: the positions of the token produced at step i - 1, the model's layout (the
  LLaVA decoder's [B, 1], Qwen2-VL's M-RoPE [B, 3, 1]).
  """
  b = prefill_logits.shape[0]
  tok = jnp.argmax(prefill_logits[:, -1], axis=-1).astype(jnp.int32)
  done = tok == eos_id
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(jnp.where(done, pad_id, tok))

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, done = carry
    logits, cache = model.decode(model.embed_inputs(tok[:, None]), position_of(i),
                                 jnp.ones((b, 1), jnp.int32), cache)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    finished = done | (tok == eos_id)
    out = out.at[:, i].set(jnp.where(finished, pad_id, tok))
    return i + 1, tok, cache, out, finished

  carry = (jnp.asarray(1, jnp.int32), tok, cache, out, done)
  return jax.lax.while_loop(cond, body, carry)[3]


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, max_new_tokens: int, mesh: Mesh | None = None):
  """One jitted pure function per model structure, output length and mesh; jax.jit caches per
  shape. eos_id and pad_id are traced arguments, so changing them never recompiles.
  `decode_kernels` ({path: [out, in] kernel}, possibly empty) are what the decode loop uses in
  place of those layers' kernels.
  """

  def run(state, decode_kernels, prompt_ids, prompt_mask, images, positions, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    return _greedy(model, prompt_ids, prompt_mask, images, positions, eos_id, pad_id,
                   max_new_tokens=max_new_tokens, decode_kernels=decode_kernels)

  if mesh is None:
    return jax.jit(run)
  # Replicated tokens: every process can read the whole batch's answers.
  return jax.jit(sharding_lib.under_mesh(run, mesh),
                 out_shardings=sharding_lib.replicated(mesh))


def _decode_kernels_for(model, max_new_tokens: int, mesh: Mesh | None) -> dict:
  """The transposed kernels for decoding on CPU devices (`_decode_kernels`); {} elsewhere (TPU
  and GPU compile the untouched model) and for short calls."""
  devices = jax.devices() if mesh is None else mesh.devices.flat
  if (max_new_tokens < _TRANSPOSE_MIN_NEW_TOKENS
      or not all(d.platform == "cpu" for d in devices)):
    return {}
  return _decode_kernels.get(model)


def _on_mesh(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array (the same on every process) as a global array split over the batch axes."""
  sh = jax.sharding.NamedSharding(
      mesh, sharding_lib.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh))
  return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def greedy_generate(model: nnx.Module, prompt_ids: Any, prompt_mask: Any, images: Any = None, *,
                    max_new_tokens: int, eos_id: int, pad_id: int, positions: Any = None,
                    mesh: Mesh | None = None) -> np.ndarray:
  """Greedy decoding of a batch of left-padded prompts with a KV cache.

  Args:
    model: a `LlavaForConditionalGeneration` or `Qwen2VLForConditionalGeneration` (anything
      with `init_cache`, `embed_inputs`, `decode`).
    prompt_ids: int [B, L], left-padded.
    prompt_mask: int [B, L], 1 on real tokens, 0 on (left) padding.
    images: what `model.embed_inputs` takes (LLaVA: float32 [B, M, H, W, 3]; Qwen2-VL:
      `RowImages`, or a packed `VisionBatch` without a mesh), or None.
    max_new_tokens: tokens to generate per row.
    eos_id: stops a row; not included in the output (a negative id never stops).
    pad_id: fills a row after its EOS.
    positions: the prompt's positions, int [B, L] or M-RoPE [B, 3, L] (`qwen2vl_image.get_rope_index`);
      None: 0 on each row's first real token, counting up.
    mesh: split the rows over this mesh's batch axes (the model's parameters live on it); every
      process of a multi-host job must call with the same arguments. B should be a multiple of
      the batch shards (`sharding.batch_shards`), else the rows are replicated.

  Returns:
    np.int32 [B, max_new_tokens].
  """
  ids, mask = check_prompt(prompt_ids, prompt_mask, max_new_tokens)
  graphdef, state = nnx.split(model)
  run = _compiled(graphdef, int(max_new_tokens), mesh)
  if positions is not None:
    positions = np.asarray(positions, np.int32)
  if hasattr(images, "shape"):  # One array (LLaVA's pixels), not a structure of them.
    images = np.asarray(images, np.float32)
  if mesh is None:
    put = jnp.asarray
  else:  # Every leaf is row-major ([B, ...]): rows go where their prompts go.
    put = lambda x: _on_mesh(np.asarray(x), mesh)  # noqa: E731
  ids, mask = put(ids), put(mask)
  images, positions = jax.tree.map(put, images), jax.tree.map(put, positions)
  kernels = _decode_kernels_for(model, int(max_new_tokens), mesh)
  out = run(state, kernels, ids, mask, images, positions, jnp.int32(eos_id), jnp.int32(pad_id))
  return np.asarray(out, np.int32)


@functools.lru_cache(maxsize=8)
def _compiled_next_token(graphdef: nnx.GraphDef):
  """Reference step: next greedy token from a full pass over prompt + generated tokens."""

  @jax.jit
  def next_token(state, prompt_ids, prompt_mask, images, generated, n):
    m = nnx.merge(graphdef, state)
    b, n_gen = generated.shape
    embeds = jnp.concatenate([m.embed_inputs(prompt_ids, images), m.embed_inputs(generated)],
                             axis=1)
    gen_mask = jnp.broadcast_to(jnp.arange(n_gen) < n, (b, n_gen)).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, gen_mask], axis=1)
    # Roll the unused generation slots to the front: they become left padding (segment 0).
    shift = n_gen - n
    embeds, mask = jnp.roll(embeds, shift, axis=1), jnp.roll(mask, shift, axis=1)
    hidden, _ = m.language_model(embeds, _prompt_positions(mask), mask)
    return jnp.argmax(m.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)

  return next_token


def greedy_generate_nocache(model: nnx.Module, prompt_ids: Any, prompt_mask: Any,
                            images: Any = None, *, max_new_tokens: int, eos_id: int,
                            pad_id: int) -> np.ndarray:
  """Slow reference for `greedy_generate`: reruns the decoder over the whole sequence per new token.

  No cache is involved: every step embeds prompt + generated tokens and runs a full-sequence pass.
  The sequence keeps one static length through extra left padding (one compile per shape), and
  generated tokens are embedded as text, never spliced with image features, as in the cached path.
  Needs `model.embed_inputs`, `model.language_model` and `model.logits`.
  """
  ids, mask = check_prompt(prompt_ids, prompt_mask, max_new_tokens)
  images = None if images is None else jnp.asarray(images, jnp.float32)
  graphdef, state = nnx.split(model)
  next_token = _compiled_next_token(graphdef)
  b, n_gen = ids.shape[0], max_new_tokens - 1
  generated = np.zeros((b, n_gen), np.int32)
  out = np.full((b, max_new_tokens), pad_id, np.int32)
  done = np.zeros(b, bool)
  for i in range(max_new_tokens):
    tok = np.asarray(next_token(state, ids, mask, images, generated, i))
    done |= tok == eos_id
    out[:, i] = np.where(done, pad_id, tok)
    if done.all() or i == n_gen:
      break
    generated[:, i] = tok
  return out
