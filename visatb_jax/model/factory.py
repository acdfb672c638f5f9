"""The model a config asks for: random from sizes, or a local Hugging Face checkpoint.

`config.model` fields read here (all optional except the sizes of a model without a path):

  path          a local LLaVA checkpoint directory (config.json + safetensors); empty = random init
  vision, text  sizes (HF field names) of a randomly initialised model; ignored with a path
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

from visatb_jax.runtime import sharding
from visatb_jax.model import lora as lora_lib
from visatb_jax.model.config import LlavaConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration

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


def dtypes(model_cfg: Any) -> dict[str, str]:
  return {"dtype": str(_get(model_cfg, "dtype", "float32")),
          "param_dtype": str(_get(model_cfg, "param_dtype", "float32"))}


def model_config(model_cfg: Any, *, vocab_size: int | None = None,
                 image_token_id: int | None = None) -> LlavaConfig:
  """The LlavaConfig of a config's model (from the checkpoint's config.json when it has a path).

  `vocab_size` and `image_token_id` come from the tokenizer of a randomly initialised model; for a
  checkpoint they are checked against its config.json instead.
  """
  path = checkpoint_path(model_cfg)
  if path is not None:
    from visatb_jax.model import hf_io
    config = hf_io.load_config(path, **dtypes(model_cfg))
    if image_token_id is not None and image_token_id != config.image_token_id:
      raise ValueError(f"the tokenizer's <image> id {image_token_id} differs from "
                       f"image_token_index {config.image_token_id} in {path}/config.json")
    if vocab_size is not None and vocab_size > config.text.vocab_size:
      raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's vocabulary "
                       f"(text_config.vocab_size in {path}/config.json) is "
                       f"{config.text.vocab_size}")
    return config
  text = dict(_get(model_cfg, "text", {}))
  if vocab_size is not None:
    text["vocab_size"] = vocab_size
  fields = {"vision": dict(_get(model_cfg, "vision", {})), "text": text, **dtypes(model_cfg)}
  if image_token_id is not None:
    fields["image_token_id"] = image_token_id
  elif "image_token_id" in model_cfg:
    fields["image_token_id"] = int(model_cfg["image_token_id"])
  else:
    fields["image_token_id"] = int(text.get("vocab_size", 1)) - 1
  return LlavaConfig.from_dict(fields)


def _lora_options(model_cfg: Any) -> dict[str, Any] | None:
  """apply_lora's keyword arguments, or None without LoRA (rank 0 or no `lora` field)."""
  lora = _get(model_cfg, "lora", None)
  if not lora or not int(_get(lora, "rank", 0) or 0):
    return None
  return {"rank": int(lora["rank"]), "alpha": float(_get(lora, "alpha", lora["rank"])),
          "dropout": float(_get(lora, "dropout", 0.0)),
          "target_modules": tuple(_get(lora, "target_modules", lora_lib.LORA_TARGETS))}


def _with_lora(model: LlavaForConditionalGeneration, options: dict[str, Any] | None,
               seed: int) -> LlavaForConditionalGeneration:
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


def build_model(model_cfg: Any, config: LlavaConfig, *,
                mesh: jax.sharding.Mesh | None = None) -> LlavaForConditionalGeneration:
  """The model: weights from `model.path`, else initialised from `model.init_seed`."""
  from flax import nnx
  kwargs = remat_options(_get(model_cfg, "remat", "none"))
  seed = int(_get(model_cfg, "init_seed", 0))
  lora = _lora_options(model_cfg)  # a bad LoRA setting fails before any weight is read
  path = checkpoint_path(model_cfg)
  if path is not None:
    from visatb_jax.model import hf_io
    model = hf_io.load_pretrained(path, **dtypes(model_cfg),
                                  shardings_fn=None if mesh is None else shardings_fn(mesh),
                                  **kwargs)
  else:
    model = LlavaForConditionalGeneration(config, rngs=nnx.Rngs(seed), **kwargs)
  # Adapters from their own seed stream: the same for every run of a pipeline.
  model = _with_lora(model, lora, seed + 1)
  if mesh is not None:
    # Everything in its training sharding, so a restored or evaluated model runs on the mesh too.
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.param_shardings(state, mesh)))
  return model


def abstract_model(model_cfg: Any, config: LlavaConfig) -> LlavaForConditionalGeneration:
  """The model with ShapeDtypeStruct leaves: shapes and dtypes only, no memory, no weights read."""
  from flax import nnx
  kwargs = remat_options(_get(model_cfg, "remat", "none"))
  lora = _lora_options(model_cfg)
  return nnx.eval_shape(lambda: _with_lora(
      LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0), **kwargs), lora, 1))
