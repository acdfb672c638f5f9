"""Hugging Face Qwen2-VL checkpoints (config.json + safetensors) <-> our NNX Qwen2-VL, both ways.

`load_pretrained` reads a local directory in either key layout: the one transformers writes (any
version) and the published Qwen2-VL checkpoints use (`visual.*`, `model.*` for the decoder,
`lm_head.weight`), or transformers 5's in-memory module names (`model.visual.*`,
`model.language_model.*`); and either config.json layout (transformers 5's `text_config`, or the
published flat text fields with `rope_scaling: {type: mrope}` and `in_chans`).
`save_pretrained` writes what transformers 5's `save_pretrained` writes (the first key layout,
nested config), which `transformers.Qwen2VLForConditionalGeneration.from_pretrained` loads
unchanged.

Names map one to one (our module paths are the HF ones, `language_model` standing for the
decoder's `model`, and the decoder's stacked layers holding `model.layers.{i}.*` as their row i,
as in hf_io: `hf_io.param_slots`); leaves differ as in hf_io (`kernel` <-> `weight`, Linear
transposed, `scale` <-> `weight`, `embedding` <-> `weight`), plus one reshape: the vision patch
embedding is a Linear [C*T*p*p, E] here and a Conv3d weight [E, C, T, p, p] there (kernel =
stride, so the two compute the same thing).

The model is built abstractly and filled one tensor at a time straight onto its devices, as
hf_io.load_pretrained; the safetensors reading and writing helpers are hf_io's.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from visatb_jax.model import hf_io
from visatb_jax.model import lora as lora_lib
from visatb_jax.model.config import TextConfig, to_jnp_dtype
from visatb_jax.model.qwen2vl import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                                      Qwen2VLVisionConfig)
from visatb_jax.runtime import fileio

logger = logging.getLogger(__name__)

CONFIG_NAME = hf_io.CONFIG_NAME
SAFE_WEIGHTS_NAME = hf_io.SAFE_WEIGHTS_NAME
SAFE_WEIGHTS_INDEX_NAME = hf_io.SAFE_WEIGHTS_INDEX_NAME
ARCHITECTURE = "Qwen2VLForConditionalGeneration"

# ---------------------------------------------------------------- config.json <-> Qwen2VLConfig

# transformers' class defaults (Qwen2VLTextConfig / Qwen2VLVisionConfig / Qwen2VLConfig): a
# config.json may list only what differs from them.
_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                      rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False)
_VISION_DEFAULTS = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                        mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2)
_TOKEN_DEFAULTS = dict(image_token_id=151655, video_token_id=151656,
                       vision_start_token_id=151652, vision_end_token_id=151653)
_MROPE_DEFAULT = (16, 24, 24)  # Qwen2VLRotaryEmbedding's fallback.


def _text_rope(text: Mapping[str, Any]) -> tuple[float, tuple[int, ...]]:
  """(rope base, mrope_section) from `rope_parameters` (transformers 5) or `rope_scaling`."""
  theta = text.get("rope_theta", _TEXT_DEFAULTS["rope_theta"])
  section = None
  for key in ("rope_scaling", "rope_parameters"):  # The newer spelling wins.
    rope = text.get(key)
    if not rope:
      continue
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ValueError(f"text {key}: unsupported rope_type {rope_type!r} (only M-RoPE)")
    theta = rope.get("rope_theta", theta)
    section = rope.get("mrope_section", section)
  return float(theta), tuple(int(s) for s in (section or _MROPE_DEFAULT))


def _text_config(hf: Mapping[str, Any]) -> tuple[TextConfig, tuple[int, ...]]:
  # Published checkpoints keep the text fields at the top level; transformers 5 nests them.
  raw = hf.get("text_config") or hf
  d = {**_TEXT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
  if d["hidden_act"] != "silu":
    raise ValueError(f"text hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
  if d.get("use_sliding_window"):
    raise ValueError("use_sliding_window=True is not supported")
  theta, section = _text_rope(raw)
  # transformers ties when either level asks for it.
  tied = bool(hf.get("tie_word_embeddings") or raw.get("tie_word_embeddings"))
  text = TextConfig(
      vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_hidden_layers=int(d["num_hidden_layers"]),
      num_attention_heads=int(d["num_attention_heads"]),
      num_key_value_heads=int(d["num_key_value_heads"] or d["num_attention_heads"]),
      # Qwen2VLAttention ignores any head_dim field: hidden_size // heads, always.
      head_dim=None, rope_theta=theta, rms_norm_eps=float(d["rms_norm_eps"]),
      max_position_embeddings=int(d["max_position_embeddings"]), tie_word_embeddings=tied,
      attention_bias=True)
  return text, section


def _vision_config(d: Mapping[str, Any] | None) -> Qwen2VLVisionConfig:
  d = {k: v for k, v in (d or {}).items() if v is not None}
  if "in_chans" in d:  # The published checkpoints' spelling.
    d.setdefault("in_channels", d["in_chans"])
  d = {**_VISION_DEFAULTS, **d}
  rope = d.get("rope_parameters") or {}
  if rope.get("rope_type", "axial") != "axial":
    raise ValueError(f"vision rope_type {rope['rope_type']!r} is not supported (only axial)")
  for key in ("patch_size", "temporal_patch_size"):
    if not isinstance(d[key], int):
      raise ValueError(f"vision {key} {d[key]!r}: only a single int is supported")
  return Qwen2VLVisionConfig(
      depth=int(d["depth"]), embed_dim=int(d["embed_dim"]), hidden_size=int(d["hidden_size"]),
      hidden_act=d["hidden_act"], mlp_ratio=float(d["mlp_ratio"]), num_heads=int(d["num_heads"]),
      in_channels=int(d["in_channels"]), patch_size=int(d["patch_size"]),
      spatial_merge_size=int(d["spatial_merge_size"]),
      temporal_patch_size=int(d["temporal_patch_size"]),
      rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))))


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32") -> Qwen2VLConfig:
  """Maps a transformers `Qwen2VLConfig` dict (a parsed config.json) to our `Qwen2VLConfig`.

  Raises:
    ValueError: not a Qwen2-VL config, or one using features this port lacks (named).
  """
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or [ARCHITECTURE]
  if model_type not in (None, "qwen2_vl") or ARCHITECTURE not in architectures:
    raise ValueError(f"unsupported model: model_type {model_type!r}, architectures "
                     f"{architectures}; expected model_type 'qwen2_vl' with {ARCHITECTURE}")
  text, section = _text_config(hf)
  tokens = {k: int(hf.get(k, v)) for k, v in _TOKEN_DEFAULTS.items()}
  return Qwen2VLConfig(vision=_vision_config(hf.get("vision_config")), text=text,
                       mrope_section=section, dtype=dtype, param_dtype=param_dtype, **tokens)


def config_to_hf(config: Qwen2VLConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
  """A transformers 5 `Qwen2VLConfig` dict for `config` (what `save_pretrained` writes)."""
  v, t = config.vision, config.text
  rope = {"rope_type": "default", "rope_theta": t.rope_theta,
          "mrope_section": list(config.mrope_section)}
  text = dict(model_type="qwen2_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads,
              num_key_value_heads=t.num_key_value_heads, hidden_act="silu",
              max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
              use_sliding_window=False, rope_parameters=rope,
              tie_word_embeddings=t.tie_word_embeddings, dtype=torch_dtype)
  mlp_ratio = int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio
  vision = dict(model_type="qwen2_vl_vision", depth=v.depth, embed_dim=v.embed_dim,
                hidden_size=v.hidden_size, hidden_act=v.hidden_act, mlp_ratio=mlp_ratio,
                num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                spatial_merge_size=v.spatial_merge_size,
                temporal_patch_size=v.temporal_patch_size,
                rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
  tokens = {k: getattr(config, k) for k in _TOKEN_DEFAULTS if getattr(config, k) is not None}
  return dict(architectures=[ARCHITECTURE], model_type="qwen2_vl", text_config=text,
              vision_config=vision, tie_word_embeddings=t.tie_word_embeddings,
              dtype=torch_dtype, **tokens)


def check_checkpoint(path: str | os.PathLike) -> Qwen2VLConfig:
  """What a Qwen2-VL checkpoint directory shows without reading a weight: config.json and the
  weight files' names (shapes are checked when `load_pretrained` reads them).

  Raises:
    as `load_config`, and FileNotFoundError for missing weight files.
  """
  config = load_config(path)
  hf_io.weight_files(os.fspath(path))
  return config


def load_config(path: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> Qwen2VLConfig:
  """Reads `<path>/config.json` as a `Qwen2VLConfig` (no weights are touched)."""
  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {path}")
  hf = fileio.read_json(config_file)  # a damaged file: a one-line error naming it
  try:
    return config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_file}: {e}") from e


# ---------------------------------------------------------------- names and layouts

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Checkpoint prefixes -> our canonical names, first match wins (the bare `model.` of the
# published layout is the decoder, so it must come after `model.visual.`).
_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model."),
             ("visual.", "visual."), ("model.", "language_model."), ("lm_head.", "lm_head."))
_PATCH_EMBED = ("visual", "patch_embed", "proj", "kernel")


def hf_name(path: tuple[Any, ...]) -> str:
  """Our parameter path -> its canonical name (`visual.blocks.0.attn.qkv.weight`, ...).

  Raises:
    ValueError: a parameter with no Hugging Face counterpart (an adapter must be merged first).
  """
  *modules, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_HF:
    raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
  return ".".join(modules + [_LEAF_TO_HF[leaf]])


def canonical_key(key: str) -> str:
  """A checkpoint key in either layout -> the canonical name that `hf_name` produces."""
  for old, new in _PREFIXES:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def export_key(name: str) -> str:
  """Canonical name -> the key `save_pretrained` writes (transformers' saved layout)."""
  if name.startswith("language_model."):
    return "model." + name[len("language_model."):]
  return name


def _is_patch_embed(path: tuple[Any, ...]) -> bool:
  return tuple(str(p) for p in path) == _PATCH_EMBED


def to_ours(path: tuple[Any, ...], arr: np.ndarray) -> np.ndarray:
  """A checkpoint tensor -> our layout for parameter `path`."""
  if _is_patch_embed(path):  # Conv3d [E, C, T, p, p] -> Linear [C*T*p*p, E].
    return arr.reshape(arr.shape[0], -1).T
  if str(path[-1]) == "kernel" and arr.ndim == 2:
    return arr.T  # Linear: (out, in) -> (in, out).
  return arr


def to_hf(path: tuple[Any, ...], arr: np.ndarray, vision: Qwen2VLVisionConfig) -> np.ndarray:
  """Our parameter value -> its checkpoint layout (the inverse of `to_ours`)."""
  if _is_patch_embed(path):
    v = vision
    return arr.T.reshape(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size,
                         v.patch_size)
  if str(path[-1]) == "kernel" and arr.ndim == 2:
    return arr.T
  return arr


def hf_shape(path: tuple[Any, ...], shape: tuple[int, ...],
             vision: Qwen2VLVisionConfig) -> tuple[int, ...]:
  """The checkpoint shape of our parameter `path` of shape `shape`."""
  return to_hf(path, np.empty(shape, np.bool_), vision).shape


# ---------------------------------------------------------------- load


@functools.lru_cache(maxsize=4)
def _abstract_model(config: Qwen2VLConfig, model_kwargs: tuple[tuple[str, Any], ...]
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs): the structure, no parameter allocated."""
  abstract = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(
      config, rngs=nnx.Rngs(0), **dict(model_kwargs)))
  return nnx.split(abstract)


def _tensor_index(files: list[str], path: str) -> tuple[dict[str, tuple[str, str]],
                                                       dict[str, tuple[int, ...]]]:
  """From the headers only: canonical name -> (file, key) and -> stored shape."""
  where: dict[str, tuple[str, str]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        if hf_io.IGNORED_KEYS.search(key):
          continue
        name = canonical_key(key)
        if name in where:
          raise ValueError(f"weights {where[name][1]!r} and {key!r} both map to {name!r} "
                           f"({path} mixes key layouts)")
        where[name] = (file, key)
        shapes[name] = tuple(f.get_slice(key).get_shape())
  return where, shapes


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                    shardings_fn: hf_io.ShardingsFn | None = None, strict: bool = True,
                    **model_kwargs: Any) -> Qwen2VLForConditionalGeneration:
  """Loads a local Hugging Face Qwen2-VL checkpoint directory into the NNX model.

  Args:
    path: directory with config.json and `model.safetensors` or sharded safetensors + index.
    dtype: compute dtype ("float32", "bfloat16", "float16").
    param_dtype: parameter storage dtype; tensors are cast to it as they are read.
    mesh: place every parameter on this mesh, replicated (unless `shardings_fn`).
    shardings_fn: `(our parameter path, shape) -> Sharding`; overrides `mesh`.
    strict: raise on checkpoint tensors the model has no parameter for (else log and skip).
    **model_kwargs: passed to `Qwen2VLForConditionalGeneration` (`remat`, `remat_policy`).

  Raises:
    FileNotFoundError: the directory, config.json or a listed shard is missing (named).
    ValueError: an unsupported config, a missing weight, a shape mismatch (key and both shapes),
      or unexpected weights with `strict`.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist or is not a directory")
  config = load_config(path, dtype=dtype, param_dtype=param_dtype)
  files = hf_io.weight_files(path)
  p_dtype = to_jnp_dtype(param_dtype)
  graphdef, state = _abstract_model(config, tuple(sorted(model_kwargs.items())))
  state, flat = hf_io.fresh_param_state(state)

  where, shapes = _tensor_index(files, path)
  plan: dict[str, list[tuple[str, tuple[Any, ...], tuple[Any, ...], Any, int | None]]] = {}
  wanted = set()
  for p, var in flat:  # Every name and shape checked before a byte of data is read.
    for q, shape, row in hf_io.param_slots(p, tuple(var.get_value().shape)):
      name = hf_name(q)
      expected = hf_shape(q, shape, config.vision)
      if name not in where:
        raise ValueError(f"missing weight {export_key(name)!r} (our parameter "
                         f"{'.'.join(map(str, q))}, checkpoint shape {expected}) in {path}")
      file, key = where[name]
      if shapes[name] != expected:
        raise ValueError(f"shape mismatch for {key!r} in {os.path.basename(file)}: checkpoint "
                         f"has {shapes[name]}, the model expects {expected} (config.json "
                         "disagrees with the weights)")
      wanted.add(name)
      plan.setdefault(file, []).append((key, q, p, var, row))
  extra = sorted(where[n][1] for n in set(where) - wanted
                 if not (config.text.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    if strict:
      raise ValueError(f"unexpected weights in {path} that the model has no parameter for: "
                       f"{extra} (pass strict=False to skip them)")
    logger.warning("skipping %d unexpected weights in %s: %s", len(extra), path, extra)

  place = hf_io.sharding_of(mesh, shardings_fn)
  for file, entries in plan.items():  # One open per file, each tensor read exactly once.
    with safe_open(file, framework="numpy") as f:
      for key, q, p, var, row in entries:
        arr = to_ours(q, hf_io.read_tensor(f, file, key))
        hf_io.set_param(var, p, arr, row, p_dtype, place)
        del arr
  return nnx.merge(graphdef, state)


def from_state_dict(config: Qwen2VLConfig, tensors: Mapping[str, Any], *,
                    param_dtype: str | None = None,
                    **model_kwargs: Any) -> Qwen2VLForConditionalGeneration:
  """The model with its parameters taken from in-memory checkpoint tensors {key: array}.

  For tests and conversions that already hold the tensors (e.g. a torch `state_dict()` as numpy),
  in either key layout. Built abstractly, as `load_pretrained`: no initialiser runs (on CPU their
  first compile costs more than the whole model).

  Raises:
    ValueError: a missing weight or a shape mismatch (named).
  """
  p_dtype = to_jnp_dtype(param_dtype or config.param_dtype)
  by_name = {canonical_key(k): v for k, v in tensors.items() if not hf_io.IGNORED_KEYS.search(k)}
  graphdef, state = _abstract_model(config, tuple(sorted(model_kwargs.items())))
  state = jax.tree.map(lambda x: x, state)
  for p, var in nnx.to_flat_state(state):
    rows = []
    for q, shape, row in hf_io.param_slots(p, tuple(var.get_value().shape)):
      name = hf_name(q)
      expected = hf_shape(q, shape, config.vision)
      if name not in by_name:
        raise ValueError(f"missing weight {export_key(name)!r} (checkpoint shape {expected})")
      arr = np.asarray(by_name[name])
      if arr.shape != expected:
        raise ValueError(f"shape mismatch for {name!r}: given {arr.shape}, expected {expected}")
      rows.append((to_ours(q, arr), row))
    value = rows[0][0] if rows[0][1] is None else np.stack([a for a, _ in rows])
    var.set_value(jnp.asarray(value, p_dtype))
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------- save


def _export_tensors(model: Qwen2VLForConditionalGeneration, dtype: Any | None
                    ) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...], np.dtype]]:
  """(HF key, lazy host tensor in HF layout, HF shape, dtype) per parameter; LoRA merged."""
  vision = model.config.vision
  for p, var, get_value in lora_lib.merged_params(model):
    if not isinstance(var, nnx.Param):
      raise ValueError(f"cannot export non-parameter state {'.'.join(map(str, p))}")
    value = var.get_value()  # Shape and dtype only; a merged kernel has the same.
    dt = np.dtype(dtype if dtype is not None else value.dtype)
    for q, shape, row in hf_io.param_slots(p, tuple(value.shape)):  # Stacked: row by row.

      def get(q=q, get_value=get_value, row=row):
        return to_hf(q, hf_io.host_array(get_value(row)), vision)

      yield export_key(hf_name(q)), get, hf_shape(q, shape, vision), dt


def save_pretrained(model: Qwen2VLForConditionalGeneration, path: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", dtype: str | None = None,
                    tokenizer: Any = None) -> None:
  """Writes `model` as a Hugging Face Qwen2-VL checkpoint directory, as transformers 5 would.

  LoRA adapters are merged into the written kernels without changing `model`. Only process 0
  writes in a multi-process run (every process must call: gathering is collective).

  Args:
    model: the model to save.
    path: output directory (created; earlier weight files there are replaced).
    max_shard_size: bytes per shard (int) or a string like "5GB".
    dtype: storage dtype; None keeps each parameter's dtype.
    tokenizer: a transformers tokenizer written beside the weights (with its chat template, so
      the directory is what `transformers` and `load_pretrained` read back whole); None: none.
  """
  path = os.fspath(path)
  limit = hf_io.parse_size(max_shard_size)
  np_dtype = None if dtype is None else to_jnp_dtype(dtype)
  tensors = list(_export_tensors(model, np_dtype))
  torch_dtype = hf_io.write_weights(path, tensors, limit)
  if torch_dtype is None:
    return
  fileio.atomic_write_json(os.path.join(path, CONFIG_NAME),
                           config_to_hf(model.config, torch_dtype=torch_dtype))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
