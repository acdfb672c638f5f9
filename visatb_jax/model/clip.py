"""CLIP vision transformer in Flax NNX, laid out like HF `CLIPVisionModel`.

Module paths match `transformers` (`vision_model.embeddings.patch_embedding`,
`vision_model.pre_layrnorm`, `vision_model.encoder.layers[i].self_attn.q_proj`, ...); parameter
leaves use the NNX names (`kernel`, `bias`, `scale`, `embedding`). Images are NHWC float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from visatb_jax.model.config import VisionConfig

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
  """Activation by its HF name ("gelu" is the exact erf form, as in `transformers`)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _layer_norm(config: VisionConfig, dtype: Any, param_dtype: Any,
                rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2 (parity, bf16 safety).
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPVisionEmbeddings(nnx.Module):
  """Patch embedding + class token + learned absolute position embedding."""

  def __init__(self, config: VisionConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    p, d = config.patch_size, config.hidden_size
    self.patch_embedding = nnx.Conv(config.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.class_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (d,), param_dtype) * d**-0.5)
    self.position_embedding = nnx.Embed(config.num_patches + 1, d, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, 1 + num_patches, D]."""
    n = images.shape[0]
    patches = self.patch_embedding(images.astype(self.dtype))  # [N, h, w, D]
    # Row-major (h, w) flattening is the order of HF's flatten(2) on NCHW.
    patches = patches.reshape(n, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPAttention(nnx.Module):
  """Bidirectional multi-head self-attention (softmax in float32)."""

  def __init__(self, config: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d, d, **kw)
    self.k_proj = nnx.Linear(d, d, **kw)
    self.v_proj = nnx.Linear(d, d, **kw)
    self.out_proj = nnx.Linear(d, d, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, _ = x.shape
    split = lambda y: y.reshape(n, t, self.num_heads, self.head_dim)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * self.head_dim**-0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(n, t, -1)
    return self.out_proj(out)


class CLIPMLP(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # A name, not a function: keeps the graphdef hashable and equal across instances.
    self.hidden_act = config.hidden_act
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN transformer block."""

  def __init__(self, config: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = _layer_norm(config, **kw)
    self.self_attn = CLIPAttention(config, **kw)
    self.layer_norm2 = _layer_norm(config, **kw)
    self.mlp = CLIPMLP(config, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.layers = nnx.List([
        CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ])


class CLIPVisionTransformer(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    self.pre_layrnorm = _layer_norm(config, **kw)  # Sic: the HF spelling.
    self.encoder = CLIPEncoder(config, **kw)
    self.post_layernorm = _layer_norm(config, **kw)


class CLIPVisionModel(nnx.Module):
  """CLIP ViT image encoder.

  Hidden states follow HF indexing: `hidden_states[0]` is the embedding output after
  `pre_layrnorm`, `hidden_states[i]` the output of encoder layer i-1, so there are
  `num_hidden_layers + 1` of them and `hidden_states[-1]` is the last layer's output (before
  `post_layernorm`, which HF applies only to the pooled class token).
  """

  def __init__(self, config: VisionConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)

  def _num_states(self) -> int:
    return self.config.num_hidden_layers + 1

  def hidden_states(self, images: jax.Array, *, up_to: int | None = None) -> list[jax.Array]:
    """All hidden states [N, 1 + P, D], or only those with index <= `up_to` (HF indexing)."""
    n_states = self._num_states()
    last = n_states - 1 if up_to is None else up_to % n_states
    vm = self.vision_model
    x = vm.pre_layrnorm(vm.embeddings(images))
    states = [x]
    # Layers past the requested state are never run: LLaVA reads layer -2 and skips the last one.
    for layer in list(vm.encoder.layers)[:last]:
      x = layer(x)
      states.append(x)
    return states

  def feature_layer(self, images: jax.Array, layer: int = -2, *,
                    drop_class_token: bool = True) -> jax.Array:
    """`hidden_states[layer]` of [N, H, W, C] images -> [N, P, D] (or [N, 1 + P, D] with CLS)."""
    n_states = self._num_states()
    if not -n_states <= layer < n_states:
      raise ValueError(f"feature layer {layer} outside [-{n_states}, {n_states})")
    x = self.hidden_states(images, up_to=layer)[-1]
    return x[:, 1:] if drop_class_token else x

  def pooled_output(self, images: jax.Array) -> jax.Array:
    """post_layernorm(class token of the last layer) -> [N, D], as HF's `pooler_output`."""
    return self.vision_model.post_layernorm(self.hidden_states(images)[-1][:, 0])

  def __call__(self, images: jax.Array) -> jax.Array:
    """Last hidden state [N, 1 + P, D] (HF `last_hidden_state`)."""
    return self.hidden_states(images)[-1]
