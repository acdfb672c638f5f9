"""Hugging Face LLaVA checkpoints (config.json + safetensors) <-> our NNX LLaVA, both ways.

`load_pretrained` reads a local directory written by `transformers` (any version: the current key
layout `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
`lm_head.weight`, or the older `language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.*`, `multi_modal_projector.*`; the CLIP tower with or without its `vision_model.`
level) and `save_pretrained` writes one that `transformers.LlavaForConditionalGeneration
.from_pretrained` loads unchanged. `load_composed` builds the same model from separate parts, as
LLaVA-1.5's fine-tuning starts: a CLIP vision tower directory, a Llama/Qwen2 causal-LM directory
and a stage-1 projector file (`mm_projector.bin` / `.safetensors`).

Parameter names map one to one: our module paths are the HF ones, and only the leaves differ —
`kernel` <-> `weight` (Linear transposed: torch stores (out, in), NNX (in, out); conv
(O, I, kh, kw) <-> (kh, kw, I, O)), `scale` <-> `weight` for norms, `embedding` <-> `weight` —
except for the decoder's layers, which we store stacked (llama.py): row i of
`language_model.layers.mlp.up_proj.kernel` is HF's `...layers.{i}.mlp.up_proj.weight`
(`param_slots`). A stacked parameter is filled row by row on its devices (`set_param`) and
written row by row, so loading and saving still hold one checkpoint tensor at a time.

Memory: the model is built abstractly (`nnx.eval_shape`) and filled one tensor at a time, each read
once from its file and placed straight on its devices, so the host never holds more than one
checkpoint tensor beyond the parameters already placed. No torch is needed, except to read a
part saved as a PyTorch pickle (`.bin`) in `load_composed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from visatb_jax.runtime import fileio
from visatb_jax.model import llama
from visatb_jax.model import lora as lora_lib
from visatb_jax.model.clip import activation
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig, to_jnp_dtype
from visatb_jax.model.llava import LlavaForConditionalGeneration

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
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


class UnsupportedModelError(ValueError):
  """A config.json of another architecture than LLaVA (e.g. a bare language model)."""


class TorchRequiredError(ValueError):
  """A PyTorch `.bin` file to read without torch installed; the message says how to convert it."""


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
    raise UnsupportedModelError(f"unsupported model: model_type {model_type!r}, architectures "
                                f"{architectures}; expected model_type 'llava' with "
                                f"{ARCHITECTURE}")
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


def _json_object(file: str) -> dict[str, Any]:
  """A JSON file that must hold an object (a config.json); errors name the file."""
  try:
    value = fileio.read_json(file)
  except fileio.JSONFileError as e:  # its message names the file and what is wrong
    raise ValueError(f"{e}: replace it with the checkpoint's own config.json") from None
  if not isinstance(value, dict):
    raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object: replace it with "
                     "the checkpoint's own config.json")
  return value


def load_config(path: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> LlavaConfig:
  """Reads `<path>/config.json` as a `LlavaConfig` (no weights are touched).

  Raises:
    FileNotFoundError: no such directory, or no config.json in it.
    UnsupportedModelError: a config.json of another architecture.
    ValueError: an unreadable config.json, or one using features this port lacks.
  """
  path = _checkpoint_dir(path)
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {path}: expected a Hugging "
                            f"Face LLaVA checkpoint ({CONFIG_NAME} and {SAFE_WEIGHTS_NAME}, as "
                            "save_pretrained writes)")
  hf = _json_object(config_file)
  try:
    return config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
  except UnsupportedModelError as e:
    raise UnsupportedModelError(f"{config_file}: {e}") from e
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_file}: {e}") from e


def check_checkpoint(path: str | os.PathLike) -> LlavaConfig:
  """What a LLaVA checkpoint directory shows without reading a weight: config.json and the files.

  Cheap enough for a config check before any work starts: the config and the weight files' names,
  not their headers (shapes are checked when `load_pretrained` reads them).

  Raises:
    as `load_config`, and FileNotFoundError for missing weight files.
  """
  config = load_config(path)
  weight_files(os.fspath(path))
  return config


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
IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")


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


def param_slots(path: tuple[Any, ...], shape: tuple[int, ...]
                ) -> list[tuple[tuple[Any, ...], tuple[int, ...], int | None]]:
  """(path spelled as the checkpoint names it, shape there before any transpose, row) of each
  checkpoint tensor that parameter `path` of shape `shape` holds: itself (row None), or for
  stacked decoder layers one per layer, `layers.{i}....` with the layer axis dropped."""
  path, shape = tuple(path), tuple(shape)
  if not llama.is_stacked(path):
    return [(path, shape, None)]
  return [(llama.layer_path(path, i), shape[1:], i) for i in range(shape[0])]


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


def _listed_files(path: str, index_name: str, single_name: str) -> list[str] | None:
  """The weight files of a directory by its index, else its single file; None when it has neither.

  Every listed shard must exist.
  """
  index_file = os.path.join(path, index_name)
  if os.path.isfile(index_file):
    try:
      weight_map = fileio.read_json(index_file)["weight_map"]
      files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index_file} is not a weight index (no weight_map): {e}") from e
  elif os.path.isfile(os.path.join(path, single_name)):
    files = [single_name]
  else:
    return None
  for name in files:
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(f"shard {name} listed in {index_file} is missing from {path}")
  return [os.path.join(path, name) for name in files]


def weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint (index first, else the single file); all must exist."""
  files = _listed_files(path, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)
  if files is None:
    others = sorted(f for f in os.listdir(path) if f.endswith(TORCH_SUFFIXES))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}{hint}")
  return files


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


def read_tensor(handle: Any, file: str, key: str) -> np.ndarray:
  """Tensor `key` of an open safetensors `handle` on `file`, whatever its dtype."""
  try:
    return handle.get_tensor(key)
  except (TypeError, ValueError, RuntimeError):  # Older safetensors: "bf16 not supported" etc.
    return _read_raw(file, key)


def _require_torch(what: str, how: str) -> Any:
  """The torch module; without it a one-line TorchRequiredError saying how to convert instead."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TorchRequiredError(f"{what}, which needs torch to read, and torch is not installed: "
                             "install torch, or convert it to safetensors once where torch is "
                             f"installed: {how}") from None
  return torch


def convert_file_command(file: str) -> str:
  """A shell command that rewrites a torch.save'd state dict as safetensors next to it."""
  out = os.path.splitext(file)[0] + ".safetensors"
  return ("python -c \"import torch; from safetensors.torch import save_file; "
          f"sd = torch.load({file!r}, map_location='cpu', weights_only=True); "
          f"save_file({{k: v.contiguous() for k, v in sd.items()}}, {out!r})\" "
          f"and use {out}")


def _torch_state_dict(file: str) -> Mapping[str, Any]:
  """A torch.save'd flat state dict, memory-mapped where the file allows it (no copy in RAM)."""
  torch = _require_torch(f"{file} is a PyTorch pickle", convert_file_command(file))
  try:
    try:
      state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # Files of the pre-zip format cannot be memory-mapped.
      state = torch.load(file, map_location="cpu", weights_only=True)
  except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"cannot read {file} with torch.load: {first}") from e
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{file} is not a flat state dict of tensors (as "
                     "torch.save(model.state_dict()) writes)")
  return state


def _torch_numpy(tensor: Any) -> np.ndarray:
  """A CPU torch tensor as numpy; bfloat16 (which numpy lacks) by its bits, as ml_dtypes'."""
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
  return tensor.numpy()


class _TensorFile(NamedTuple):
  """One open weight file: its keys, each key's stored shape, and a reader of one tensor."""
  keys: list[str]
  shape: Callable[[str], tuple[int, ...]]
  read: Callable[[str], np.ndarray]


@contextlib.contextmanager
def _open_tensors(file: str) -> Iterator[_TensorFile]:
  """Opens safetensors natively, a PyTorch pickle (.bin) through torch."""
  if file.endswith(TORCH_SUFFIXES):
    state = _torch_state_dict(file)
    yield _TensorFile(list(state), lambda k: tuple(state[k].shape),
                      lambda k: _torch_numpy(state[k]))
    return
  with safe_open(file, framework="numpy") as f:
    yield _TensorFile(list(f.keys()), lambda k: tuple(f.get_slice(k).get_shape()),
                      lambda k: read_tensor(f, file, k))


# ---------------------------------------------------------------- load


def place_array(arr: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
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


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one parameter comes from: file, key there and stored shape (HF layout).

  `rows`: the rows it has once loaded when the vocabulary grows (new rows are appended).
  """
  file: str
  key: str
  shape: tuple[int, ...]
  rows: int | None = None


def _index(files: Iterable[str], rename: Callable[[str], str | None], where: str,
           into: dict[str, _Source]) -> dict[str, _Source]:
  """Adds every tensor of `files` to `into` under `rename(key)` (None: not a weight of ours).

  Headers only: no tensor data is read.
  """
  for file in files:
    with _open_tensors(file) as f:
      for key in f.keys:
        name = None if IGNORED_KEYS.search(key) else rename(key)
        if name is None:
          continue
        if name in into:
          raise ValueError(f"weights {into[name].key!r} and {key!r} both map to {name!r} "
                           f"({where} mixes key layouts)")
        into[name] = _Source(file, key, f.shape(key))
  return into


def _abstract_params(config: LlavaConfig, model_kwargs: Mapping[str, Any]
                     ) -> tuple[nnx.GraphDef, nnx.State, list[tuple[tuple[Any, ...], Any]]]:
  """(graphdef, fresh abstract state, its (path, Param) list) of the model to fill."""
  graphdef, state = _abstract_model(config, tuple(sorted(model_kwargs.items())))
  return (graphdef, *fresh_param_state(state))


def fresh_param_state(state: nnx.State) -> tuple[nnx.State, list[tuple[tuple[Any, ...], Any]]]:
  """(a copy of a cached abstract state, its (path, Param) list) for a checkpoint to fill;
  ValueError when the model holds state other than parameters."""
  # Fresh Variables around the cached shapes: filling them must not touch the cache.
  state = jax.tree.map(lambda x: x, state)
  flat = list(nnx.to_flat_state(state))
  others = [".".join(map(str, p)) for p, v in flat if not isinstance(v, nnx.Param)]
  if others:
    raise ValueError(f"the model has non-parameter state {others} that a checkpoint cannot fill")
  return state, flat


# {file: [(source, our parameter path, its Variable, axis permutation, row of stacked layers)]}
_Plan = dict[str, list[tuple[_Source, tuple[Any, ...], Any, tuple[int, ...] | None, int | None]]]


def _plan(params: list[tuple[tuple[Any, ...], Any]], sources: Mapping[str, _Source], *,
          missing: Callable[[str, tuple[Any, ...], tuple[int, ...]], str],
          hint: str) -> tuple[_Plan, set[str]]:
  """({file: what to read from it}, names used): every name and shape checked before any data."""
  plan: _Plan = {}
  wanted = set()
  for p, var in params:
    for q, shape, row in param_slots(p, tuple(var.get_value().shape)):
      name = hf_name(q)
      perm = _perm(q, len(shape))
      if name not in sources:
        raise ValueError(missing(name, q, shape))
      src = sources[name]
      expected = shape if perm is None else tuple(shape[i] for i in _inverse(perm))
      loaded = src.shape if src.rows is None else (src.rows,) + src.shape[1:]
      if loaded != expected:
        raise ValueError(f"shape mismatch for {src.key!r} in {src.file}: checkpoint has "
                         f"{src.shape}, the model expects {expected} ({hint})")
      wanted.add(name)
      plan.setdefault(src.file, []).append((src, p, var, perm, row))
  return plan, wanted


def _check_extra(sources: Mapping[str, _Source], wanted: set[str], config: LlavaConfig,
                 where: str, strict: bool) -> None:
  extra = sorted(src.key for n, src in sources.items() if n not in wanted
                 and not (config.text.tie_word_embeddings and n == "lm_head.weight"))
  if not extra:
    return
  if strict:
    raise ValueError(f"unexpected weights in {where} that the model has no parameter for: "
                     f"{extra} (pass strict=False to skip them)")
  logger.warning("skipping %d unexpected weights in %s: %s", len(extra), where, extra)


def _grow_rows(arr: np.ndarray, rows: int) -> np.ndarray:
  """`arr` with rows appended up to `rows`, each the mean of the existing rows.

  As transformers' `resize_token_embeddings(mean_resizing=True)`, minus its noise: it samples new
  rows from N(mean, 1e-9 · covariance), i.e. the mean to within ~3e-5 of a row's spread; the
  mean itself keeps loading deterministic.
  """
  mean = arr.astype(np.float32).mean(axis=0, keepdims=True).astype(arr.dtype)
  return np.concatenate([arr, np.repeat(mean, rows - arr.shape[0], axis=0)])


def sharding_of(mesh: jax.sharding.Mesh | None, shardings_fn: ShardingsFn | None
                ) -> Callable[[tuple[Any, ...], tuple[int, ...]], jax.sharding.Sharding | None]:
  """(parameter path, its shape) -> where it goes: `shardings_fn`'s answer, else replicated on
  `mesh`, else None (the default device)."""

  def of(path: tuple[Any, ...], shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
    if shardings_fn is not None:
      return shardings_fn(path, shape)
    if mesh is not None:
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return None

  return of


def _row_sharding(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
  """The sharding of one row of a stacked parameter placed with `sharding` (its spec less the
  layer axis); None (default placement, the update moves it) for other kinds of sharding."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return None


def _zeros(shape: tuple[int, ...], dtype: Any,
           sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Zeros made where they live (each device its own part): a stacked parameter's buffer."""
  make = functools.partial(jnp.zeros, shape, dtype)
  return make() if sharding is None else jax.jit(make, out_shardings=sharding)()


# Donated: the stack is updated in place, so filling it never holds two copies of it.
_set_row = jax.jit(lambda stack, row, i: jax.lax.dynamic_update_index_in_dim(stack, row, i, 0),
                   donate_argnums=0)


def set_param(var: Any, path: tuple[Any, ...], arr: np.ndarray, row: int | None, dtype: Any,
              where: Callable[[tuple[Any, ...], tuple[int, ...]],
                              jax.sharding.Sharding | None]) -> None:
  """Places host tensor `arr` (our layout) as parameter `var` at `path`, or as its row `row`
  when `var` holds stacked layers; `where` as `sharding_of` gives. The first row to arrive
  allocates the stack (zeros, where `where` puts the whole stack: asked once per parameter);
  each row then goes to the devices alone and is written into the stack in place."""
  if row is None:
    var.set_value(place_array(arr, dtype, where(path, arr.shape)))
    return
  stack = var.get_value()
  if not isinstance(stack, jax.Array):  # Still the abstract model's ShapeDtypeStruct.
    stack = _zeros(tuple(stack.shape), dtype, where(path, tuple(stack.shape)))
  row_value = place_array(arr, dtype, _row_sharding(stack.sharding))
  var.set_value(_set_row(stack, row_value, np.int32(row)))


def _fill(plan: _Plan, param_dtype: Any, mesh: jax.sharding.Mesh | None,
          shardings_fn: ShardingsFn | None) -> None:
  """Reads each planned tensor once and places it on its devices."""
  where = sharding_of(mesh, shardings_fn)
  for file, entries in plan.items():  # One open per file, each tensor read exactly once.
    with _open_tensors(file) as f:
      for src, p, var, perm, row in entries:
        arr = f.read(src.key)
        if src.rows is not None:
          arr = _grow_rows(arr, src.rows)
        if perm is not None:
          arr = arr.transpose(perm)  # A view: the copy happens once, on the way to the device.
        set_param(var, p, arr, row, param_dtype, where)
        del arr


def _load(config: LlavaConfig, sources: Mapping[str, _Source], *, where: str,
          missing: Callable[[str, tuple[Any, ...], tuple[int, ...]], str], hint: str,
          param_dtype: str, mesh: jax.sharding.Mesh | None, shardings_fn: ShardingsFn | None,
          strict: bool, model_kwargs: Mapping[str, Any]) -> LlavaForConditionalGeneration:
  """The model of `config` with every parameter read from `sources`."""
  graphdef, state, params = _abstract_params(config, model_kwargs)
  plan, wanted = _plan(params, sources, missing=missing, hint=hint)
  _check_extra(sources, wanted, config, where, strict)
  _fill(plan, to_jnp_dtype(param_dtype), mesh, shardings_fn)
  return nnx.merge(graphdef, state)


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
  # Headers only: which file holds which canonical name, and every tensor's stored shape.
  sources = _index(weight_files(path), canonical_key, path, {})

  def missing(name, p, shape):
    return (f"missing weight {export_key(name)!r} (older layout: {_legacy_key(name)!r}; our "
            f"parameter {'.'.join(map(str, p))}, shape {shape}) in {path}")

  return _load(config, sources, where=path, missing=missing,
               hint="config.json disagrees with the weights", param_dtype=param_dtype, mesh=mesh,
               shardings_fn=shardings_fn, strict=strict, model_kwargs=model_kwargs)


# ---------------------------------------------------------------- composing from separate parts

# Where LLaVA-1.5's pretrain stage leaves its projector (`--tune_mm_mlp_adapter`), and its name
# when converted to safetensors.
PROJECTOR_NAMES = ("mm_projector.safetensors", "mm_projector.bin")
# A vocabulary that has to grow for <image> is padded to a multiple of this, as llava-hf's
# conversion of LLaVA-1.5 (`resize_token_embeddings(..., pad_to_multiple_of=64)`: 32000 -> 32064).
VOCAB_MULTIPLE = 64
# LLaVA-1.5's projector: mm_projector_type "mlp2x_gelu", mm_vision_select_layer -2,
# mm_vision_select_feature "patch".
_LLAVA15_PROJECTOR = dict(projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# Top-level keys of a whole CLIPModel (openai/clip-vit-large-patch14-336) besides the tower.
_CLIP_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
_EMBEDDING_ROWS = ("language_model.embed_tokens.weight", "lm_head.weight")


def _part_dir(path: str | os.PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} directory {path} does not exist or is not a directory")
  return path


def _part_json(path: str, what: str) -> tuple[str, dict[str, Any]]:
  """(its config.json's path, contents) of a part directory."""
  file = os.path.join(_part_dir(path, what), CONFIG_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {what} directory {path}: expected a Hugging Face "
                            "model directory (config.json + weights, as save_pretrained writes)")
  return file, _json_object(file)


def _vision_part_config(path: str) -> VisionConfig:
  """The tower of a CLIPVisionModel directory, or of a whole CLIPModel's (its vision_config)."""
  file, hf = _part_json(path, "vision tower")
  model_type = hf.get("model_type", "clip_vision_model")
  if model_type == "clip":
    hf = hf.get("vision_config") or {}
  elif model_type != "clip_vision_model":
    raise ValueError(f"{file}: model_type {model_type!r} is not a CLIP vision tower (expected "
                     "'clip_vision_model' or 'clip')")
  try:
    return _vision_config({**hf, "model_type": "clip_vision_model"})
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{file}: {e}") from e


def _text_part_config(path: str) -> TextConfig:
  """The decoder of a causal-LM directory (LlamaForCausalLM, e.g. Vicuna; Qwen2ForCausalLM)."""
  file, hf = _part_json(path, "language model")
  if "text_config" in hf:  # A whole multimodal checkpoint: load_pretrained's business.
    raise ValueError(f"{file} is the config of a whole {hf.get('model_type')!r} model, not of a "
                     "language model (LlamaForCausalLM / Qwen2ForCausalLM)")
  try:
    return _text_config(hf)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{file}: {e}") from e


def _part_files(path: str, model_class: str) -> list[str]:
  """A part directory's weight files: safetensors as `weight_files`, else .bin through torch."""
  names = set(os.listdir(path))
  if ({SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME} & names
      or not {TORCH_WEIGHTS_NAME, TORCH_WEIGHTS_INDEX_NAME} & names):
    return weight_files(path)
  out = path.rstrip(os.sep) + "-safetensors"
  _require_torch(f"{path} holds PyTorch .bin weights",
                 f"python -c \"import transformers as t; t.{model_class}.from_pretrained({path!r})"
                 f".save_pretrained({out!r})\" and use {out}")
  return _listed_files(path, TORCH_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME)


def _projector_file(path: str | os.PathLike) -> str:
  """The stage-1 projector: the file itself, or the one in PROJECTOR_NAMES in a directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in PROJECTOR_NAMES
             if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f"no {' or '.join(PROJECTOR_NAMES)} in projector directory {path}")
    path = found[0]
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"projector file {path} does not exist")
  if path.endswith(TORCH_SUFFIXES):
    _require_torch(f"{path} is a PyTorch pickle", convert_file_command(path))
  elif not path.endswith(".safetensors"):
    raise ValueError(f"projector file {path}: expected a torch.save'd .bin or a .safetensors file")
  return path


def _projector_settings(file: str) -> dict[str, Any]:
  """LLaVA-1.5's projector settings, checked against the stage-1 run's config.json beside `file`.

  LLaVA's pretrain run saves its config.json (mm_projector_type, mm_vision_select_layer,
  mm_vision_select_feature) next to mm_projector.bin; a projector on its own gets LLaVA-1.5's.
  """
  config_file = os.path.join(os.path.dirname(file), CONFIG_NAME)
  if not os.path.isfile(config_file):
    return dict(_LLAVA15_PROJECTOR)
  hf = _json_object(config_file)
  if not any(k.startswith("mm_") for k in hf):  # Some other model's config: not about this file.
    return dict(_LLAVA15_PROJECTOR)
  kind = hf.get("mm_projector_type", "mlp2x_gelu")
  if kind != "mlp2x_gelu":
    raise ValueError(f"{config_file}: mm_projector_type {kind!r} is not supported (only "
                     "LLaVA-1.5's 'mlp2x_gelu')")
  layer = hf.get("mm_vision_select_layer", -2)
  feature = hf.get("mm_vision_select_feature", "patch")
  if not isinstance(layer, int) or feature not in _SELECT_FEATURE:
    raise ValueError(f"{config_file}: mm_vision_select_layer {layer!r} / mm_vision_select_feature "
                     f"{feature!r} not supported (a layer index; one of {list(_SELECT_FEATURE)})")
  return dict(_LLAVA15_PROJECTOR, vision_feature_layer=layer,
              vision_feature_select_strategy=_SELECT_FEATURE[feature])


def vocab_with_image_token(text_vocab: int, tokenizer_vocab: int | None,
                           image_token_id: int) -> int:
  """The language model's vocabulary once it holds every tokenizer id and <image>.

  The original LLaVA-1.5 never adds <image> to Vicuna's vocabulary: it splices a sentinel id
  (IMAGE_TOKEN_INDEX = -200) that is replaced by image features before any embedding lookup. This
  model needs a real id, so it follows llava-hf's conversion of the same weights: <image> = 32000
  (the id after Vicuna's 32000 tokens) and <pad> = 32001 appended to the tokenizer, and the
  embeddings and lm_head resized to a multiple of 64 (32064). Unchanged when the ids fit already.
  """
  needed = max(text_vocab, tokenizer_vocab or 0, image_token_id + 1)
  if needed == text_vocab:
    return text_vocab
  return -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def composed_config(vision_path: str | os.PathLike, text_path: str | os.PathLike,
                    projector_path: str | os.PathLike, *, vocab_size: int | None = None,
                    image_token_id: int | None = None, dtype: str = "float32",
                    param_dtype: str = "float32") -> LlavaConfig:
  """The LlavaConfig of a model composed from parts (their config.json files; no weight read).

  Args:
    vision_path: CLIPVisionModel (or CLIPModel) directory, e.g. clip-vit-large-patch14-336.
    text_path: LlamaForCausalLM / Qwen2ForCausalLM directory, e.g. vicuna-7b-v1.5.
    projector_path: the stage-1 `mm_projector.bin` / `.safetensors`, or its directory.
    vocab_size: the tokenizer's length (None: the language model's vocabulary).
    image_token_id: the tokenizer's <image> id (None: the id after the language model's
      vocabulary, where adding <image> to its tokenizer puts it).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """
  vision = _vision_part_config(os.fspath(vision_path))
  text = _text_part_config(os.fspath(text_path))
  settings = _projector_settings(_projector_file(projector_path))
  if image_token_id is None:
    image_token_id = text.vocab_size
  text = dataclasses.replace(
      text, vocab_size=vocab_with_image_token(text.vocab_size, vocab_size, int(image_token_id)))
  return LlavaConfig(vision=vision, text=text, image_token_id=int(image_token_id), dtype=dtype,
                     param_dtype=param_dtype, **settings)


def check_vision_part(path: str | os.PathLike) -> VisionConfig:
  """A vision tower directory's config.json and weight files (no weight read)."""
  config = _vision_part_config(os.fspath(path))
  _part_files(os.fspath(path), "CLIPVisionModel")
  return config


def check_text_part(path: str | os.PathLike) -> TextConfig:
  """A language model directory's config.json and weight files (no weight read)."""
  config = _text_part_config(os.fspath(path))
  _part_files(os.fspath(path), "AutoModelForCausalLM")
  return config


def check_projector_part(path: str | os.PathLike) -> str:
  """The projector file (and torch when it is a .bin); returns its path."""
  file = _projector_file(path)
  _projector_settings(file)
  return file


def _vision_key(key: str) -> str | None:
  """CLIPVisionModel / CLIPModel key -> canonical name (None: a CLIPModel's text side)."""
  if key.startswith(_CLIP_NON_VISION):
    return None
  return canonical_key("vision_tower." + key)  # Adds the `vision_model.` level when absent.


def _text_key(key: str) -> str:
  """Causal-LM key (`model.layers...`, `lm_head.weight`) -> canonical name."""
  if key.startswith("model."):
    return "language_model." + key[len("model."):]
  return key if key.startswith("lm_head.") else "text:" + key  # The latter: reported as extra.


def _projector_key(key: str) -> str:
  """LLaVA's `model.mm_projector.{0,2}.*` (Sequential: Linear, GELU, Linear) -> canonical name."""
  bare = key[len("model."):] if key.startswith("model.") else key
  for index, linear in (("0", "linear_1"), ("2", "linear_2")):
    if bare.startswith(f"mm_projector.{index}."):
      return f"multi_modal_projector.{linear}." + bare[len(f"mm_projector.{index}."):]
  if bare.startswith("multi_modal_projector."):  # Already in transformers' naming.
    return bare
  return "projector:" + key


def _part_key(name: str) -> tuple[str, str]:
  """(part, the key it should have there) of a canonical name, for missing-weight messages."""
  if name.startswith("vision_tower."):
    return "vision", name[len("vision_tower."):]
  if name.startswith("multi_modal_projector."):
    linear, rest = name[len("multi_modal_projector."):].split(".", 1)
    return "projector", f"model.mm_projector.{'0' if linear == 'linear_1' else '2'}.{rest}"
  if name.startswith("language_model."):
    return "text", "model." + name[len("language_model."):]
  return "text", name


def load_composed(vision_path: str | os.PathLike, text_path: str | os.PathLike,
                  projector_path: str | os.PathLike, *, vocab_size: int | None = None,
                  image_token_id: int | None = None, dtype: str = "float32",
                  param_dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                  shardings_fn: ShardingsFn | None = None, strict: bool = True,
                  **model_kwargs: Any) -> LlavaForConditionalGeneration:
  """Builds the LLaVA model from separate parts, as LLaVA-1.5's fine-tuning starts.

  The vision tower from a CLIPVisionModel (or CLIPModel) directory, the language model from a
  LlamaForCausalLM / Qwen2ForCausalLM directory (safetensors; `.bin` shards need torch), the
  projector from LLaVA's stage-1 `mm_projector.bin` (keys `model.mm_projector.{0,2}.{weight,bias}`;
  needs torch) or the same keys as safetensors. When the tokenizer's ids (`vocab_size`,
  `image_token_id`) do not fit the language model's vocabulary, its embeddings and lm_head grow
  (see `vocab_with_image_token`; new rows at the mean of the old ones, as transformers'
  `resize_token_embeddings`). Loads tensor by tensor, as `load_pretrained`.

  Args:
    vision_path, text_path, projector_path, vocab_size, image_token_id, dtype: as
      `composed_config`.
    param_dtype, mesh, shardings_fn, strict, **model_kwargs: as `load_pretrained`.

  Raises:
    FileNotFoundError: a part, its config.json or weight file is missing (named).
    TorchRequiredError: a `.bin` to read without torch (the message says how to convert it).
    ValueError: an unsupported part, a missing weight, a shape mismatch between the parts, or
      unexpected weights with `strict`.
  """
  config = composed_config(vision_path, text_path, projector_path, vocab_size=vocab_size,
                           image_token_id=image_token_id, dtype=dtype, param_dtype=param_dtype)
  paths = {"vision": os.fspath(vision_path), "text": os.fspath(text_path),
           "projector": _projector_file(projector_path)}
  sources: dict[str, _Source] = {}
  _index(_part_files(paths["vision"], "CLIPVisionModel"), _vision_key, paths["vision"], sources)
  _index(_part_files(paths["text"], "AutoModelForCausalLM"), _text_key, paths["text"], sources)
  _index([paths["projector"]], _projector_key, paths["projector"], sources)
  text_vocab = _text_part_config(paths["text"]).vocab_size
  if config.text.vocab_size != text_vocab:
    for name in _EMBEDDING_ROWS:
      if name in sources and sources[name].shape[0] == text_vocab:
        sources[name] = dataclasses.replace(sources[name], rows=config.text.vocab_size)

  def missing(name, p, shape):
    part, key = _part_key(name)
    return (f"missing weight {key!r} (our parameter {'.'.join(map(str, p))}, shape {shape}) in "
            f"the {part} part {paths[part]}")

  return _load(config, sources, where=", ".join(paths.values()), missing=missing,
               hint="the parts do not fit together or disagree with their config.json",
               param_dtype=param_dtype, mesh=mesh, shardings_fn=shardings_fn, strict=strict,
               model_kwargs=model_kwargs)


# ---------------------------------------------------------------- save


def parse_size(size: int | str) -> int:
  """5_000_000, "5GB", "200MB", "10KiB" -> bytes (decimal units, as transformers)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB'")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


_NP_TO_ST = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}


def host_array(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # Only multi-process runs need it.
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_safetensors(file: str, tensors: list[tuple[str, Callable[[], np.ndarray],
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
    dt = np.dtype(dtype if dtype is not None else value.dtype)
    for q, our_shape, row in param_slots(p, tuple(value.shape)):  # Stacked layers: row by row.
      perm = _perm(q, len(our_shape))
      inv = None if perm is None else _inverse(perm)
      shape = our_shape if inv is None else tuple(our_shape[i] for i in inv)

      def get(get_value=get_value, inv=inv, row=row):
        arr = host_array(get_value(row))
        return arr if inv is None else arr.transpose(inv)

      yield export_key(hf_name(q)), get, shape, dt


def write_weights(path: str, tensors: list[Any], limit: int) -> str | None:
  """Writes `tensors` ((name, get, shape, dtype) from an export) as safetensors shards of at most
  `limit` bytes, with their index; returns the checkpoint's `torch_dtype`, None on a process that
  does not write (it still takes part in the collective gathers)."""
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
      write_safetensors(os.path.join(path, name), shard)
    else:  # Still take part in the collective gathers.
      for _, get, _, _ in shard:
        get()
    weight_map.update({t[0]: name for t in shard})
  if not writer:
    return None
  total = sum(math.prod(t[2]) * t[3].itemsize for t in tensors)
  if len(shards) > 1:
    fileio.atomic_write_json(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME),
                             {"metadata": {"total_size": total}, "weight_map": weight_map})
  dtypes = {t[3].name for t in tensors}
  return dtypes.pop() if len(dtypes) == 1 else "float32"


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
  limit = parse_size(max_shard_size)
  np_dtype = None if dtype is None else to_jnp_dtype(dtype)
  tensors = list(_export_tensors(model, np_dtype))
  torch_dtype = write_weights(path, tensors, limit)
  if torch_dtype is None:
    return
  fileio.atomic_write_json(os.path.join(path, CONFIG_NAME),
                           config_to_hf(model.config, torch_dtype=torch_dtype))
