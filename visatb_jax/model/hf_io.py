"""Hugging Face LLaVA checkpoints (config.json + safetensors) <-> our NNX LLaVA, both ways.

`load_pretrained` reads a local directory written by `transformers` (any version: the current key
layout `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
`lm_head.weight`, or the older `language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.*`, `multi_modal_projector.*`; the CLIP tower with or without its `vision_model.`
level) and `save_pretrained` writes one that `transformers.LlavaForConditionalGeneration
.from_pretrained` loads unchanged.

Parameter names map one to one: our module paths are the HF ones, and only the leaves differ —
`kernel` <-> `weight` (Linear transposed: torch stores (out, in), NNX (in, out); conv
(O, I, kh, kw) <-> (kh, kw, I, O)), `scale` <-> `weight` for norms, `embedding` <-> `weight`.

Memory: the model is built abstractly (`nnx.eval_shape`) and filled one tensor at a time, each read
once from its file and placed straight on its devices, so the host never holds more than one
checkpoint tensor beyond the parameters already placed. No torch is needed at any point.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from visatb_jax.runtime import fileio
from visatb_jax.model import lora as lora_lib
from visatb_jax.model.clip import activation
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig, to_jnp_dtype
from visatb_jax.model.llava import LlavaForConditionalGeneration

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ARCHITECTURE = "LlavaForConditionalGeneration"

# (path of one parameter in our module tree, its shape) -> where that parameter lives.
ShardingsFn = Callable[[tuple[Any, ...], tuple[int, ...]], jax.sharding.Sharding]

# ---------------------------------------------------------------- config.json <-> LlavaConfig

# transformers' class defaults: a config.json only lists the fields that differ from them (the
# llava-1.5 text_config names neither hidden_size nor num_hidden_layers), so these fill the rest.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                       head_dim=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                       attention_bias=False, mlp_bias=False)
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=None, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                       use_sliding_window=False)
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5)
# `LlavaConfig()` without a vision_config builds CLIP ViT-L/14-336, the llava-1.5 tower.
_LLAVA_VISION_DEFAULTS = dict(_CLIP_VISION_DEFAULTS, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, image_size=336,
                              patch_size=14)
_TEXT_DEFAULTS = {"llama": _LLAMA_DEFAULTS, "qwen2": _QWEN2_DEFAULTS}


def _rope_theta(text: Mapping[str, Any], where: str) -> float:
  """The RoPE base from either spelling (transformers 5 `rope_parameters`, older `rope_theta`)."""
  theta = text.get("rope_theta")
  for key in ("rope_parameters", "rope_scaling"):
    rope = text.get(key)
    if not rope:
      continue
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{where}: unsupported {key} rope_type {rope_type!r} (only plain RoPE)")
    theta = rope.get("rope_theta", theta)
  return float(theta)


def _text_config(d: Mapping[str, Any] | None) -> TextConfig:
  d = dict(d or {})
  family = d.get("model_type", "llama")
  if family not in _TEXT_DEFAULTS:
    raise ValueError(f"unknown text_config model_type {family!r}; supported: "
                     f"{sorted(_TEXT_DEFAULTS)}")
  where = f"text_config ({family})"
  d = {**_TEXT_DEFAULTS[family], **{k: v for k, v in d.items() if v is not None}}
  if d["hidden_act"] != "silu":
    raise ValueError(f"{where}: unsupported hidden_act {d['hidden_act']!r} (only 'silu')")
  if family == "llama":
    # Llama's attention_bias also puts a bias on o_proj, which this decoder does not have.
    for flag in ("attention_bias", "mlp_bias"):
      if d.get(flag):
        raise ValueError(f"{where}: {flag}=True is not supported")
  elif d.get("use_sliding_window"):
    raise ValueError(f"{where}: use_sliding_window=True is not supported")
  return TextConfig(
      vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_hidden_layers=int(d["num_hidden_layers"]),
      num_attention_heads=int(d["num_attention_heads"]),
      num_key_value_heads=int(d["num_key_value_heads"] or d["num_attention_heads"]),
      head_dim=d["head_dim"], rope_theta=_rope_theta(d, where),
      rms_norm_eps=float(d["rms_norm_eps"]),
      max_position_embeddings=int(d["max_position_embeddings"]),
      tie_word_embeddings=bool(d["tie_word_embeddings"]),
      # Qwen2 always has q/k/v biases (and no o_proj bias): exactly our `attention_bias`.
      attention_bias=family == "qwen2")


def _vision_config(d: Mapping[str, Any] | None) -> VisionConfig:
  defaults = _CLIP_VISION_DEFAULTS if d else _LLAVA_VISION_DEFAULTS
  d = dict(d or {})
  model_type = d.get("model_type", "clip_vision_model")
  if model_type != "clip_vision_model":
    raise ValueError(f"unknown vision_config model_type {model_type!r}; supported: "
                     "['clip_vision_model']")
  d = {**defaults, **{k: v for k, v in d.items() if v is not None}}
  activation(d["hidden_act"])  # Raises on an activation the tower does not know.
  return VisionConfig.from_dict({k: d[k] for k in _CLIP_VISION_DEFAULTS})


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32") -> LlavaConfig:
  """Maps a transformers `LlavaConfig` dict (a parsed config.json) to our `LlavaConfig`.

  Args:
    hf: the config.json contents.
    dtype: compute dtype of the model to build.
    param_dtype: parameter storage dtype.

  Raises:
    ValueError: not a LLaVA config, or one using features this port lacks (the message names the
      field).
  """
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or [ARCHITECTURE]
  if model_type not in (None, "llava") or ARCHITECTURE not in architectures:
    raise ValueError(f"unsupported model: model_type {model_type!r}, architectures "
                     f"{architectures}; expected model_type 'llava' with {ARCHITECTURE}")
  text = _text_config(hf.get("text_config"))
  # transformers ties when either level asks for it.
  if hf.get("tie_word_embeddings"):
    text = dataclasses.replace(text, tie_word_embeddings=True)
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
  if not hf.get("multimodal_projector_bias", True):
    raise ValueError("multimodal_projector_bias=False is not supported")
  image_token_id = hf.get("image_token_id", hf.get("image_token_index", 32000))
  return LlavaConfig(
      vision=_vision_config(hf.get("vision_config")), text=text,
      image_token_id=int(image_token_id),
      projector_hidden_act=hf.get("projector_hidden_act", "gelu"), vision_feature_layer=layer,
      vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
      dtype=dtype, param_dtype=param_dtype)


def config_to_hf(config: LlavaConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
  """A transformers `LlavaConfig` dict for `config` (what `save_pretrained` writes).

  The text model is written as Qwen2 when it has q/k/v biases (that is Qwen2's layout) and as
  Llama otherwise. Both RoPE spellings are written so that transformers 4 and 5 read the same base.
  """
  v, t = config.vision, config.text
  family = "qwen2" if t.attention_bias else "llama"
  text = dict(model_type=family, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
              num_attention_heads=t.num_attention_heads,
              num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
              hidden_act="silu", max_position_embeddings=t.max_position_embeddings,
              rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
              tie_word_embeddings=t.tie_word_embeddings, torch_dtype=torch_dtype)
  if family == "llama":
    text.update(attention_bias=False, mlp_bias=False)
  else:
    text.update(use_sliding_window=False)
  vision = dict(model_type="clip_vision_model", hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, num_channels=v.num_channels,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps)
  return dict(architectures=[ARCHITECTURE], model_type="llava", vision_config=vision,
              text_config=text, image_token_index=config.image_token_id,
              image_seq_length=config.num_image_tokens,
              projector_hidden_act=config.projector_hidden_act,
              vision_feature_layer=config.vision_feature_layer,
              vision_feature_select_strategy=config.vision_feature_select_strategy,
              multimodal_projector_bias=True, tie_word_embeddings=t.tie_word_embeddings,
              torch_dtype=torch_dtype)


def load_config(path: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> LlavaConfig:
  """Reads `<path>/config.json` as a `LlavaConfig` (no weights are touched)."""
  path = _checkpoint_dir(path)
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {path}")
  try:
    hf = fileio.read_json(config_file)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is not valid JSON: {e}") from e
  try:
    return config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_file}: {e}") from e


# ---------------------------------------------------------------- parameter names and transposes

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
               "class_embedding": "class_embedding"}
# Checkpoint key prefixes (any transformers version) -> our canonical names, tried in order.
_PREFIXES = (("model.language_model.", "language_model."),
             ("language_model.model.", "language_model."),
             ("language_model.lm_head.", "lm_head."),
             ("model.vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "multi_modal_projector."))
# Buffers that older checkpoints carry and that the model recomputes: never loaded, never "extra".
_IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")


def hf_name(path: tuple[Any, ...]) -> str:
  """Our parameter path -> its canonical HF name (`vision_tower.vision_model...`, `lm_head.weight`).

  Raises:
    ValueError: a parameter with no HF counterpart (e.g. an adapter, which must be merged first).
  """
  *modules, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_HF:
    raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
  return ".".join(modules + [_LEAF_TO_HF[leaf]])


def canonical_key(key: str) -> str:
  """A checkpoint key in any supported layout -> the canonical name that `hf_name` produces."""
  for old, new in _PREFIXES:
    if key.startswith(old):
      key = new + key[len(old):]
      break
  # transformers 5 drops CLIPVisionModel's `vision_model.` level; our tree and older files keep it.
  if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
    key = "vision_tower.vision_model." + key[len("vision_tower."):]
  return key


def export_key(name: str) -> str:
  """Canonical name -> the key `save_pretrained` writes (current layout, with `vision_model.`)."""
  return name if name.startswith("lm_head.") else "model." + name


def _legacy_key(name: str) -> str:
  """Canonical name -> its spelling in the older layout (for error messages)."""
  if name.startswith("lm_head."):
    return "language_model." + name
  if name.startswith("language_model."):
    return "language_model.model." + name[len("language_model."):]
  return name


def _perm(path: tuple[Any, ...], ndim: int) -> tuple[int, ...] | None:
  """Axis permutation taking the checkpoint tensor to ours (its own inverse for 2-D)."""
  if str(path[-1]) != "kernel":
    return None
  if ndim == 2:
    return (1, 0)  # Linear: (out, in) -> (in, out).
  if ndim == 4:
    return (2, 3, 1, 0)  # Conv: (O, I, kh, kw) -> (kh, kw, I, O).
  raise ValueError(f"kernel {'.'.join(map(str, path))} of rank {ndim} has no known HF layout")


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(perm))


# ---------------------------------------------------------------- reading safetensors

# safetensors dtype names <-> numpy dtypes (ml_dtypes provides bfloat16, which numpy lacks).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _checkpoint_dir(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist or is not a directory")
  return path


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint (index first, else the single file); all must exist."""
  index_file = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
  if os.path.isfile(index_file):
    try:
      weight_map = fileio.read_json(index_file)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_file} is not a safetensors index (no weight_map): {e}") from e
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(path, SAFE_WEIGHTS_NAME)):
    files = [SAFE_WEIGHTS_NAME]
  else:
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}{hint}")
  for name in files:
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(f"shard {name} listed in {index_file} is missing from {path}")
  return [os.path.join(path, name) for name in files]


def _read_raw(file: str, key: str) -> np.ndarray:
  """One tensor straight from the file's header and bytes.

  Fallback for safetensors builds whose numpy backend cannot return some dtypes (bfloat16 before
  safetensors 0.5): the format is an 8-byte header length, a JSON header, then raw little-endian
  data, so ml_dtypes' bfloat16 can view the bytes directly.
  """
  with open(file, "rb") as f:
    (n,) = np.frombuffer(f.read(8), "<u8")
    info = json.loads(f.read(int(n)))[key]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    f.seek(8 + int(n) + start)
    data = f.read(end - start)
  dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
  return np.frombuffer(data, dtype).reshape(info["shape"])


def _read(handle: Any, file: str, key: str) -> np.ndarray:
  try:
    return handle.get_tensor(key)
  except (TypeError, ValueError, RuntimeError):  # Older safetensors: "bf16 not supported" etc.
    return _read_raw(file, key)


# ---------------------------------------------------------------- load


def _place(arr: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Host tensor -> device array in `dtype`, each device receiving only its own slice."""
  if sharding is None:
    return jnp.asarray(arr, dtype)
  # make_array_from_callback rather than device_put of the whole array: the callback is asked only
  # for this process's slices, so it works on multi-process meshes and a sharded parameter is never
  # materialised whole on any device.
  return jax.make_array_from_callback(arr.shape, sharding,
                                      lambda idx: np.asarray(arr[idx], dtype))


@functools.lru_cache(maxsize=4)
def _abstract_model(config: LlavaConfig, model_kwargs: tuple[tuple[str, Any], ...]
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs): the model's structure, no parameter allocated.

  Cached because tracing the initialisers costs about as much as loading a small checkpoint.
  """
  abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0),
                                                                  **dict(model_kwargs)))
  return nnx.split(abstract)


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                    shardings_fn: ShardingsFn | None = None, strict: bool = True,
                    **model_kwargs: Any) -> LlavaForConditionalGeneration:
  """Loads a local Hugging Face LLaVA checkpoint directory into the NNX model.

  Args:
    path: directory with config.json and `model.safetensors` or sharded
      `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
    dtype: compute dtype ("float32", "bfloat16", "float16").
    param_dtype: parameter storage dtype; checkpoint tensors are cast to it as they are read.
    mesh: place every parameter on this mesh as it is read (replicated unless `shardings_fn`).
    shardings_fn: `(our parameter path, shape) -> Sharding`, for logical-axis rules; overrides the
      replicated default (and needs no `mesh`).
    strict: raise on checkpoint tensors the model has no parameter for (else log and skip them).
    **model_kwargs: passed to `LlavaForConditionalGeneration` (`remat`, `remat_policy`).

  Returns:
    The model with every parameter loaded.

  Raises:
    FileNotFoundError: the directory, config.json or a listed shard is missing (named).
    ValueError: an unsupported architecture / model_type, a missing weight, a shape mismatch
      (key and both shapes), or unexpected weights with `strict`.
  """
  config = load_config(path, dtype=dtype, param_dtype=param_dtype)
  path = os.fspath(path)
  files = _weight_files(path)
  p_dtype = to_jnp_dtype(param_dtype)

  graphdef, state = _abstract_model(config, tuple(sorted(model_kwargs.items())))
  # Fresh Variables around the cached shapes: filling them must not touch the cache.
  state = jax.tree.map(lambda x: x, state)
  params = [(p, v) for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)]
  if len(params) != len(list(nnx.to_flat_state(state))):
    others = [".".join(map(str, p)) for p, v in nnx.to_flat_state(state)
              if not isinstance(v, nnx.Param)]
    raise ValueError(f"the model has non-parameter state {others} that a checkpoint cannot fill")

  # Headers only: which file holds which canonical name, and every tensor's stored shape.
  where: dict[str, tuple[str, str]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        if _IGNORED.search(key):
          continue
        name = canonical_key(key)
        if name in where:
          raise ValueError(f"weights {where[name][1]!r} and {key!r} both map to {name!r} "
                           f"({path} mixes key layouts)")
        where[name] = (file, key)
        shapes[name] = tuple(f.get_slice(key).get_shape())

  # Check every name and shape before reading a byte of data: errors come fast and complete.
  plan: dict[str, list[tuple[str, str, tuple[Any, ...], Any, tuple[int, ...] | None]]] = {}
  wanted = set()
  for p, var in params:
    name = hf_name(p)
    shape = tuple(var.get_value().shape)
    perm = _perm(p, len(shape))
    if name not in where:
      raise ValueError(f"missing weight {export_key(name)!r} (older layout: "
                       f"{_legacy_key(name)!r}; our parameter {'.'.join(map(str, p))}, shape "
                       f"{shape}) in {path}")
    file, key = where[name]
    expected = shape if perm is None else tuple(shape[i] for i in _inverse(perm))
    if shapes[name] != expected:
      raise ValueError(f"shape mismatch for {key!r} in {os.path.basename(file)}: checkpoint has "
                       f"{shapes[name]}, the model expects {expected} (config.json disagrees with "
                       "the weights)")
    wanted.add(name)
    plan.setdefault(file, []).append((key, name, p, var, perm))
  extra = sorted(where[n][1] for n in set(where) - wanted
                 if not (config.text.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    if strict:
      raise ValueError(f"unexpected weights in {path} that the model has no parameter for: "
                       f"{extra} (pass strict=False to skip them)")
    logger.warning("skipping %d unexpected weights in %s: %s", len(extra), path, extra)

  for file, entries in plan.items():  # One open per file, each tensor read exactly once.
    with safe_open(file, framework="numpy") as f:
      for key, _, p, var, perm in entries:
        arr = _read(f, file, key)
        if perm is not None:
          arr = arr.transpose(perm)  # A view: the copy happens once, on the way to the device.
        sharding = None
        if shardings_fn is not None:
          sharding = shardings_fn(p, arr.shape)
        elif mesh is not None:
          sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        var.set_value(_place(arr, p_dtype, sharding))
        del arr
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------- save


def _parse_size(size: int | str) -> int:
  """5_000_000, "5GB", "200MB", "10KiB" -> bytes (decimal units, as transformers)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB'")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


_NP_TO_ST = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}


def _host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # Only multi-process runs need it.
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _write_safetensors(file: str, tensors: list[tuple[str, Callable[[], np.ndarray],
                                                     tuple[int, ...], np.dtype]]) -> None:
  """Streams tensors into one safetensors file: the header from shapes, then one tensor at a time.

  Written to a temporary name and renamed, so a killed save never leaves a truncated shard.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires "format".
  offset = 0
  for key, _, shape, dt in tensors:
    nbytes = math.prod(shape) * dt.itemsize
    header[key] = {"dtype": _NP_TO_ST[dt.name], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data section starts 8-byte aligned.
  tmp = file + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(np.uint64(len(blob)).astype("<u8").tobytes())
      f.write(blob)
      for key, get, shape, dt in tensors:
        arr = np.ascontiguousarray(get(), dtype=dt)
        if arr.shape != tuple(shape):
          raise AssertionError(f"{key}: produced {arr.shape}, declared {shape}")
        f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        del arr
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, file)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _export_tensors(model: LlavaForConditionalGeneration, dtype: Any | None
                    ) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...], np.dtype]]:
  """(HF key, lazy host tensor in HF layout, HF shape, dtype) for every parameter of `model`.

  LoRA adapters are merged on the fly: an adapted kernel is written as W + alpha/r · A·B (computed
  when its turn comes), the adapter's own parameters and dropout state are not written, and the
  model itself is left unchanged.
  """
  for p, var, get_value in lora_lib.merged_params(model):
    if not isinstance(var, nnx.Param):
      raise ValueError(f"cannot export non-parameter state {'.'.join(map(str, p))}")
    value = var.get_value()  # Shape and dtype only; the merged kernel has the same.
    key = export_key(hf_name(p))
    perm = _perm(p, value.ndim)
    inv = None if perm is None else _inverse(perm)
    shape = tuple(value.shape) if inv is None else tuple(value.shape[i] for i in inv)
    dt = np.dtype(dtype if dtype is not None else value.dtype)

    def get(get_value=get_value, inv=inv):
      arr = _host(get_value())
      return arr if inv is None else arr.transpose(inv)

    yield key, get, shape, dt


def save_pretrained(model: LlavaForConditionalGeneration, path: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", dtype: str | None = None) -> None:
  """Writes `model` as a Hugging Face LLaVA checkpoint directory.

  The result (config.json + safetensors in the current key layout; sharded with
  `model.safetensors.index.json` past `max_shard_size`) loads unchanged with
  `transformers.LlavaForConditionalGeneration.from_pretrained(path)` and with `load_pretrained`.
  LoRA adapters (`visatb_jax.model.lora`) are merged into the written kernels first, without
  changing `model`; any other parameter without a Hugging Face name is refused rather than
  silently dropped.

  Only process 0 writes in a multi-process run (every process must call this: gathering sharded
  parameters is collective). Parameters are fetched to the host one at a time.

  Args:
    model: the model to save.
    path: output directory (created; earlier weight files there are replaced).
    max_shard_size: bytes per shard (int) or a string like "5GB" / "500MB".
    dtype: storage dtype ("float32", "bfloat16", "float16"); None keeps each parameter's dtype.
  """
  path = os.fspath(path)
  limit = _parse_size(max_shard_size)
  np_dtype = None if dtype is None else to_jnp_dtype(dtype)
  tensors = list(_export_tensors(model, np_dtype))
  # Greedy packing in model order, as transformers does: a tensor larger than the limit gets a
  # shard of its own.
  shards: list[list[Any]] = [[]]
  size = 0
  for t in tensors:
    nbytes = math.prod(t[2]) * t[3].itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  writer = jax.process_index() == 0
  names = ([SAFE_WEIGHTS_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  if writer:
    os.makedirs(path, exist_ok=True)
    # Stale weight files of an earlier save would shadow or contradict these ones.
    stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
    for f in os.listdir(path):
      if stale.fullmatch(f) and f not in names:
        os.unlink(os.path.join(path, f))
  weight_map = {}
  for name, shard in zip(names, shards):
    if writer:
      _write_safetensors(os.path.join(path, name), shard)
    else:  # Still take part in the collective gathers.
      for _, get, _, _ in shard:
        get()
    weight_map.update({t[0]: name for t in shard})
  if not writer:
    return
  total = sum(math.prod(t[2]) * t[3].itemsize for t in tensors)
  if len(shards) > 1:
    fileio.atomic_write_json(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME),
                             {"metadata": {"total_size": total}, "weight_map": weight_map})
  dtypes = {t[3].name for t in tensors}
  torch_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
  fileio.atomic_write_json(os.path.join(path, CONFIG_NAME),
                           config_to_hf(model.config, torch_dtype=torch_dtype))
