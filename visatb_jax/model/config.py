"""Model configuration dataclasses with Hugging Face field names.

The field names follow `transformers` (`CLIPVisionConfig`, `LlamaConfig`, `LlavaConfig`) so that a
Hugging Face `config.json` maps onto them directly (`from_dict(..., strict=False)` drops the fields
that only matter to `transformers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

_T = TypeVar("_T")


def _to_plain_dict(d: Any) -> dict[str, Any]:
  """Turns a mapping or an ml_collections ConfigDict (nested or not) into a plain dict."""
  if hasattr(d, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict.
    d = d.to_dict()
  if not isinstance(d, Mapping):
    raise TypeError(f"expected a mapping or a ConfigDict, got {type(d).__name__}")
  return dict(d)


def _build(cls: type[_T], d: Any, strict: bool) -> _T:
  """Builds dataclass `cls` from mapping `d`, rejecting unknown keys when `strict`."""
  d = _to_plain_dict(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown and strict:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
  return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP vision tower (HF `CLIPVisionConfig`)."""

  image_size: int = 48
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 3
  num_attention_heads: int = 4
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_image_tokens(self) -> int:
    """Patch tokens per image (without the class token)."""
    return self.num_patches

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: Any, *, strict: bool = True) -> VisionConfig:
    if isinstance(d, cls):
      return d
    return _build(cls, d, strict)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Llama-style decoder (HF `LlamaConfig` / `Qwen2Config`)."""

  vocab_size: int = 512
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None -> hidden_size // num_attention_heads.
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  # Bias on q/k/v projections (Qwen2 style); o_proj never has a bias.
  attention_bias: bool = False

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                         f"num_attention_heads {self.num_attention_heads}")
      # Frozen dataclass: resolve the default once so every reader sees an int.
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

  @classmethod
  def from_dict(cls, d: Any, *, strict: bool = True) -> TextConfig:
    """Builds from a dict; also reads `rope_parameters` (transformers >= 5 `config.json`)."""
    if isinstance(d, cls):
      return d
    d = _to_plain_dict(d)
    rope = d.pop("rope_parameters", None)
    if rope:
      if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r} (only plain RoPE)")
      d.setdefault("rope_theta", rope["rope_theta"])
    return _build(cls, d, strict)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_jnp_dtype(name: str | Any) -> Any:
  """Maps "float32" / "bfloat16" / "float16" (or a dtype) to a jnp dtype."""
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
  return jnp.dtype(name).type


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA: vision tower -> 2-layer MLP projector -> decoder (HF `LlavaConfig`)."""

  vision: VisionConfig
  text: TextConfig
  image_token_id: int
  projector_hidden_act: str = "gelu"
  vision_feature_layer: int = -2
  # "default" drops the class token, "full" keeps it.
  vision_feature_select_strategy: str = "default"
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"

  def __post_init__(self):
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} outside vocab "
                       f"[0, {self.text.vocab_size})")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError("unknown vision_feature_select_strategy "
                       f"{self.vision_feature_select_strategy!r}")
    n = self.vision.num_hidden_layers
    if not -(n + 1) <= self.vision_feature_layer <= n:
      raise ValueError(f"vision_feature_layer {self.vision_feature_layer} outside [-{n + 1}, {n}]")
    if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu"):
      raise ValueError(f"unknown projector_hidden_act {self.projector_hidden_act!r}")
    to_jnp_dtype(self.dtype)
    to_jnp_dtype(self.param_dtype)

  @property
  def num_image_tokens(self) -> int:
    """Image tokens that one image occupies in `input_ids`."""
    full = self.vision_feature_select_strategy == "full"
    return self.vision.num_patches + (1 if full else 0)

  @property
  def compute_dtype(self) -> Any:
    return to_jnp_dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return to_jnp_dtype(self.param_dtype)

  @classmethod
  def from_dict(cls, d: Any, *, strict: bool = True) -> LlavaConfig:
    """Builds from a (nested) dict or ConfigDict; also accepts HF `vision_config`/`text_config`."""
    if isinstance(d, cls):
      return d
    d = _to_plain_dict(d)
    for hf_name, name in (("vision_config", "vision"), ("text_config", "text")):
      if hf_name in d and name not in d:
        d[name] = d.pop(hf_name)
    if "image_token_index" in d and "image_token_id" not in d:  # Older HF spelling.
      d["image_token_id"] = d.pop("image_token_index")
    for key, sub in (("vision", VisionConfig), ("text", TextConfig)):
      if key not in d:
        raise ValueError(f"LlavaConfig: missing {key!r}")
      d[key] = sub.from_dict(d[key], strict=strict)
    return _build(cls, d, strict)
