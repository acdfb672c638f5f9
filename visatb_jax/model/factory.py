"""The model a config asks for: random from sizes, or a local Hugging Face checkpoint.

`config.model` fields read here (all optional except the sizes of a model without a path):

  path          a local LLaVA checkpoint directory (config.json + safetensors); empty = random init.
                A Qwen2-VL checkpoint (config.json `model_type: qwen2_vl`) builds a Qwen2-VL
                (model/qwen2vl.py, loaded by qwen2vl_io) instead
  family        of a randomly initialised model: "llava" (default) or "qwen2_vl" (then `vision`
                and `text` are the fields of transformers' Qwen2VLVisionConfig / Qwen2VLTextConfig,
                and `image_token_id` the `<|image_pad|>` id); a checkpoint's config.json decides
                for a model with a path
  vision_path, text_path, projector_path
                instead of `path`, all three: the model composed from separate parts, as LLaVA-1.5's
                fine-tuning starts (a CLIPVisionModel directory, a LlamaForCausalLM directory such
                as Vicuna, the stage-1 `mm_projector.bin` / `.safetensors`; hf_io.load_composed)
  vision, text  sizes (HF field names) of a randomly initialised model; ignored with a path or parts
  init_seed     seed of the random initialisation
  dtype         compute dtype: "float32" (default) or "bfloat16" (float32 master weights stay)
  param_dtype   parameter storage dtype, "float32" by default
  remat         activation rematerialisation per decoder layer: "none" (default), "full"
                (recompute everything), or the name of a `jax.checkpoint_policies` policy such as
                "dots_with_no_batch_dims_saveable" (keep matmul outputs, recompute the rest)
  lora          {rank, alpha, dropout, target_modules}: rank > 0 adds LoRA adapters to the language
                model (model/lora.py); the trainer then updates only them and the projector
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from visatb_jax.runtime import fileio, sharding
from visatb_jax.model import lora as lora_lib
from visatb_jax.model.config import LlavaConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration
from visatb_jax.model.qwen2vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration

ModelConfig = LlavaConfig | Qwen2VLConfig
Model = LlavaForConditionalGeneration | Qwen2VLForConditionalGeneration
QWEN2_VL = "qwen2_vl"  # config.json `model_type` of a Qwen2-VL checkpoint.
FAMILIES = ("llava", QWEN2_VL)

# Policies worth naming in a config; any other attribute of jax.checkpoint_policies works too.
REMAT_CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                 "nothing_saveable", "everything_saveable")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  return default if value is None else value


def remat_options(name: str | None) -> dict[str, Any]:
  """`remat` / `remat_policy` keyword arguments of the model for a config's `model.remat`."""
  name = name or "none"
  if name == "none":
    return {}
  if name == "full":
    return {"remat": True}
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy) or name.startswith("_"):
    raise ValueError(f"config.model.remat={name!r} is not a remat policy; use one of "
                     f"{list(REMAT_CHOICES)} or another jax.checkpoint_policies name")
  return {"remat": True, "remat_policy": policy}


def checkpoint_path(model_cfg: Any) -> str | None:
  """The checkpoint directory of `model.path`, or None for a randomly initialised model."""
  path = _get(model_cfg, "path", "")
  if not path:
    return None
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.model.path={path!r} is not a directory")
  return path


def checkpoint_model_type(path: str) -> str | None:
  """`model_type` of `<path>/config.json`; None when it is missing, unreadable or has none.

  Only picks the loader: hf_io / qwen2vl_io read the file again and name any problem with it.
  """
  try:
    hf = fileio.read_json(os.path.join(path, "config.json"))
  except (OSError, ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError.
    return None
  return hf.get("model_type") if isinstance(hf, dict) else None


def _is_qwen2vl(path: str | None) -> bool:
  return path is not None and checkpoint_model_type(path) == QWEN2_VL


def family(model_cfg: Any) -> str:
  """"qwen2_vl" or "llava": what the checkpoint at `model.path` is, else `model.family`.

  Raises:
    ValueError: an unknown `model.family`.
  """
  path = _get(model_cfg, "path", "")
  if path:
    path = os.path.expanduser(os.fspath(path))
    return QWEN2_VL if os.path.isdir(path) and _is_qwen2vl(path) else "llava"
  name = str(_get(model_cfg, "family", "llava"))
  if name not in FAMILIES:
    raise ValueError(f"config.model.family={name!r}; expected one of {list(FAMILIES)}")
  return name


PART_FIELDS = ("vision_path", "text_path", "projector_path")


def model_parts(model_cfg: Any) -> dict[str, str] | None:
  """{vision_path, text_path, projector_path} of a model composed from parts; None without parts.

  Raises:
    ValueError: parts together with `model.path`, or only some of the three (one line, naming the
      fields).
  """
  parts = {k: os.path.expanduser(os.fspath(_get(model_cfg, k, ""))) for k in PART_FIELDS}
  given = [k for k, v in parts.items() if v]
  if not given:
    return None
  if _get(model_cfg, "path", ""):
    raise ValueError(f"config.model.path and config.model.{{{','.join(given)}}} are both set: use "
                     "model.path for one LLaVA checkpoint, or all of model.vision_path, "
                     "model.text_path and model.projector_path for separate parts")
  missing = [k for k in PART_FIELDS if k not in given]
  if missing:
    raise ValueError(f"config.model.{{{','.join(given)}}} set without config.model."
                     f"{{{','.join(missing)}}}: a model composed from parts needs all of "
                     "model.vision_path, model.text_path and model.projector_path")
  return parts


def start_description(model_cfg: Any) -> str:
  """What a model starts from, in words (for run records)."""
  parts = model_parts(model_cfg)
  if parts is not None:
    return ("composed: " + ", ".join(f"{k.split('_')[0]} {v}" for k, v in parts.items()))
  return (_get(model_cfg, "path", "")
          or f"random (model.init_seed={_get(model_cfg, 'init_seed', 0)})")


def dtypes(model_cfg: Any) -> dict[str, str]:
  return {"dtype": str(_get(model_cfg, "dtype", "float32")),
          "param_dtype": str(_get(model_cfg, "param_dtype", "float32"))}


def model_config(model_cfg: Any, *, vocab_size: int | None = None,
                 image_token_id: int | None = None) -> ModelConfig:
  """The config of a config's model (from the checkpoint's config.json when it has a path): a
  `Qwen2VLConfig` for a Qwen2-VL checkpoint, else a `LlavaConfig`.

  `vocab_size` and `image_token_id` come from the tokenizer of a randomly initialised model; for a
  checkpoint they are checked against its config.json instead; a model composed from parts grows
  its vocabulary to hold them (hf_io.vocab_with_image_token).
  """
  parts = model_parts(model_cfg)
  if parts is not None:
    from visatb_jax.model import hf_io
    return hf_io.composed_config(**parts, vocab_size=vocab_size, image_token_id=image_token_id,
                                 **dtypes(model_cfg))
  path = checkpoint_path(model_cfg)
  if path is not None:
    if _is_qwen2vl(path):
      from visatb_jax.model import qwen2vl_io
      config, token_field = qwen2vl_io.load_config(path, **dtypes(model_cfg)), "image_token_id"
    else:
      from visatb_jax.model import hf_io
      config, token_field = hf_io.load_config(path, **dtypes(model_cfg)), "image_token_index"
    if image_token_id is not None and image_token_id != config.image_token_id:
      raise ValueError(f"the tokenizer's <image> id {image_token_id} differs from "
                       f"{token_field} {config.image_token_id} in {path}/config.json")
    if vocab_size is not None and vocab_size > config.text.vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary "
                       f"(text_config.vocab_size in {path}/config.json) is "
                       f"{config.text.vocab_size}")
    return config
  text = dict(_get(model_cfg, "text", {}))
  if vocab_size is not None:
    text["vocab_size"] = vocab_size
  if family(model_cfg) == QWEN2_VL:
    return _random_qwen2vl_config(model_cfg, text, image_token_id)
  fields = {"vision": dict(_get(model_cfg, "vision", {})), "text": text, **dtypes(model_cfg)}
  if image_token_id is not None:
    fields["image_token_id"] = image_token_id
  elif "image_token_id" in model_cfg:
    fields["image_token_id"] = int(model_cfg["image_token_id"])
  else:
    fields["image_token_id"] = int(text.get("vocab_size", 1)) - 1
  return LlavaConfig.from_dict(fields)


def _random_qwen2vl_config(model_cfg: Any, text: dict[str, Any],
                           image_token_id: int | None) -> Qwen2VLConfig:
  """A randomly initialised Qwen2-VL's config from transformers-named fields (qwen2vl_io reads
  them, so a config's sizes mean what they mean in a checkpoint's config.json)."""
  from visatb_jax.model import qwen2vl_io
  vision = dict(_get(model_cfg, "vision", {}))
  if "hidden_size" in text:  # The merger emits the decoder's width.
    vision["hidden_size"] = text["hidden_size"]
  hf = {"model_type": QWEN2_VL, "vision_config": vision, "text_config": text,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}
  for key in ("image_token_id", "video_token_id", "vision_start_token_id",
              "vision_end_token_id"):
    if key in model_cfg and model_cfg[key] is not None:
      hf[key] = int(model_cfg[key])
  if image_token_id is not None:
    hf["image_token_id"] = image_token_id
  return qwen2vl_io.config_from_hf(hf, **dtypes(model_cfg))


def _lora_options(model_cfg: Any) -> dict[str, Any] | None:
  """apply_lora's keyword arguments, or None without LoRA (rank 0 or no `lora` field)."""
  lora = _get(model_cfg, "lora", None)
  if not lora or not int(_get(lora, "rank", 0) or 0):
    return None
  return {"rank": int(lora["rank"]), "alpha": float(_get(lora, "alpha", lora["rank"])),
          "dropout": float(_get(lora, "dropout", 0.0)),
          "target_modules": tuple(_get(lora, "target_modules", lora_lib.LORA_TARGETS))}


def model_class(config: ModelConfig) -> type[Model]:
  """The model class a config describes: Qwen2-VL for a `Qwen2VLConfig`, else LLaVA."""
  if isinstance(config, Qwen2VLConfig):
    return Qwen2VLForConditionalGeneration
  return LlavaForConditionalGeneration


def _with_lora(model: Model, options: dict[str, Any] | None, seed: int) -> Model:
  if options is None:
    return model
  from flax import nnx
  return lora_lib.apply_lora(model, rngs=nnx.Rngs(seed), **options)


def shardings_fn(mesh: jax.sharding.Mesh) -> Callable[[tuple[Any, ...], tuple[int, ...]], Any]:
  """Places each loaded parameter straight into its logical-axis sharding on `mesh`."""

  def fn(path, shape):
    axes = sharding.param_logical_axes(path, shape)
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))
  return fn


def build_model(model_cfg: Any, config: ModelConfig, *,
                mesh: jax.sharding.Mesh | None = None) -> Model:
  """The model: weights from `model.path` or the three part paths, else initialised from
  `model.init_seed`. A Qwen2-VL checkpoint at `model.path` gives a Qwen2-VL."""
  from flax import nnx
  kwargs = remat_options(_get(model_cfg, "remat", "none"))
  seed = int(_get(model_cfg, "init_seed", 0))
  lora = _lora_options(model_cfg)  # a bad LoRA setting fails before any weight is read
  parts = model_parts(model_cfg)
  path = checkpoint_path(model_cfg)
  placement = None if mesh is None else shardings_fn(mesh)
  if parts is not None:
    from visatb_jax.model import hf_io
    # `config` came from model_config with the tokenizer's ids: the same vocabulary growth.
    model = hf_io.load_composed(**parts, vocab_size=config.text.vocab_size,
                                image_token_id=config.image_token_id, **dtypes(model_cfg),
                                shardings_fn=placement, **kwargs)
  elif _is_qwen2vl(path):
    from visatb_jax.model import qwen2vl_io
    model = qwen2vl_io.load_pretrained(path, **dtypes(model_cfg), shardings_fn=placement,
                                       **kwargs)
  elif path is not None:
    from visatb_jax.model import hf_io
    model = hf_io.load_pretrained(path, **dtypes(model_cfg), shardings_fn=placement, **kwargs)
  else:
    model = model_class(config)(config, rngs=nnx.Rngs(seed), **kwargs)
  # Adapters from their own seed stream: the same for every run of a pipeline.
  model = _with_lora(model, lora, seed + 1)
  if mesh is not None:
    # Everything in its training sharding, so a restored or evaluated model runs on the mesh too.
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.param_shardings(state, mesh)))
  return model


def abstract_model(model_cfg: Any, config: ModelConfig) -> Model:
  """The model with ShapeDtypeStruct leaves: shapes and dtypes only, no memory, no weights read.

  The class follows `config` (what `model_config` returned): Qwen2-VL or LLaVA.
  """
  from flax import nnx
  kwargs = remat_options(_get(model_cfg, "remat", "none"))
  lora = _lora_options(model_cfg)
  cls = model_class(config)
  return nnx.eval_shape(lambda: _with_lora(cls(config, rngs=nnx.Rngs(0), **kwargs), lora, 1))
