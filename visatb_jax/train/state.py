"""The training configuration, the optimizer and the state it updates.

The model is split once into (graphdef, trainable params, frozen state); the optimizer sees only
the trainable params, so a frozen vision tower (or a LoRA-frozen base) holds no Adam moments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from visatb_jax.model import lora as lora_lib


TRAINABLE = ("model", "projector")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run's settings: the single place of their defaults and checks.

  `steps` and `lr` are required. `batch_size` (rows of a global batch; None: not checked) is
  split into `accum_steps` micro-batches. `ce_chunk_size` > 0 computes the cross-entropy over
  blocks of about that many tokens per device (`loss.chunked_token_loss`), never the whole
  [tokens, vocab] logits.
  """

  steps: int
  lr: float
  batch_size: int | None = None
  accum_steps: int = 1
  warmup_frac: float = 0.03
  clip_norm: float = 1.0
  weight_decay: float = 0.0
  checkpoint_every: int = 1000
  log_every: int = 10
  seed: int = 0
  freeze_vision_tower: bool = True
  ce_chunk_size: int = 0
  # What the optimizer updates: "model" (every parameter but a frozen tower's; with LoRA, the
  # adapters and the projector) or "projector" (LLaVA's stage-1 alignment).
  trainable: str = "model"

  def __post_init__(self):
    positive = {"steps": self.steps, "accum_steps": self.accum_steps,
                "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
    if self.batch_size is not None:
      positive["batch_size"] = self.batch_size
    for name, value in positive.items():
      if int(value) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {value}")
    if not self.lr > 0:
      raise ValueError(f"train.lr must be > 0, got {self.lr}")
    if not 0.0 <= self.warmup_frac <= 1.0:
      raise ValueError(f"train.warmup_frac must be in [0, 1], got {self.warmup_frac}")
    for name in ("clip_norm", "weight_decay", "ce_chunk_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    if self.trainable not in TRAINABLE:
      raise ValueError(f"train.trainable={self.trainable!r}; choose one of {list(TRAINABLE)}")
    if self.batch_size is not None and self.batch_size % self.accum_steps:
      raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                       f"train.accum_steps={self.accum_steps} (the micro-batches)")

  @classmethod
  def of(cls, cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """`cfg` itself, or the config of a mapping (a dict or ConfigDict) of these fields."""
    if isinstance(cfg, cls):
      return cfg
    items = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - names)
    if unknown:
      raise ValueError(f"unknown train config field(s) {unknown}; known: {sorted(names)}")
    for required in ("steps", "lr"):
      if required not in items:
        raise ValueError(f"train config field {required!r} is required")
    types = {"steps": int, "lr": float, "accum_steps": int, "warmup_frac": float,
             "clip_norm": float, "weight_decay": float, "checkpoint_every": int, "log_every": int,
             "seed": int, "freeze_vision_tower": bool, "ce_chunk_size": int, "trainable": str}
    cast = {k: (types[k](v) if k in types and v is not None else v) for k, v in items.items()}
    if cast.get("batch_size") is not None:
      cast["batch_size"] = int(cast["batch_size"])
    if cast.get("clip_norm") is None:
      cast["clip_norm"] = 0.0
    return cls(**cast)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def optimizer_spec(self) -> tuple[float, float]:
    """What the optimizer's structure and update depend on: (clip_norm, weight_decay)."""
    return float(self.clip_norm), float(self.weight_decay)


def make_schedule(cfg: TrainConfig | Mapping[str, Any]) -> optax.Schedule:
  """Linear warm-up over `warmup_frac` of `steps` from 0 to `lr`, then cosine decay to 0."""
  cfg = TrainConfig.of(cfg)
  warmup = int(round(cfg.warmup_frac * cfg.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      # optax needs decay_steps > warmup_steps; steps counts the warm-up too.
      decay_steps=max(cfg.steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg: TrainConfig | Mapping[str, Any]) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with a unit learning rate.

  The train step multiplies the updates by the learning rate it receives as an argument
  (`make_schedule` evaluated on the host), so the compiled step does not depend on the length
  of the run and one compilation serves every run of a pipeline.
  """
  if isinstance(cfg, TrainConfig):
    return optimizer_from_spec(cfg.optimizer_spec)
  # The optimizer reads two fields: a mapping may hold just those.
  clip_norm = cfg.get("clip_norm", TrainConfig.clip_norm)
  weight_decay = cfg.get("weight_decay", TrainConfig.weight_decay)
  return optimizer_from_spec((float(clip_norm or 0.0), float(weight_decay)))


def optimizer_from_spec(spec: tuple[float, float]) -> optax.GradientTransformation:
  clip_norm, weight_decay = spec
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(1.0, weight_decay=weight_decay))
  return optax.chain(*parts)


def trainable_filter(freeze_vision_tower: bool = True, lora: bool = False,
                     trainable: str = "model") -> nnx.filterlib.Filter:
  """What the optimizer updates: every nnx.Param except a frozen vision tower's; with LoRA, the
  adapters and the projector only (model/lora.py); with trainable="projector", the projector."""
  if trainable == "projector":
    return nnx.All(nnx.Param, lora_lib.projector_filter)
  return lora_lib.trainable_filter(freeze_vision_tower, lora)


def split_model(
    model: nnx.Module, *, freeze_vision_tower: bool = True, trainable: str = "model"
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else: frozen params, rng state, ...)."""
  return nnx.split(
      model, trainable_filter(freeze_vision_tower, lora_lib.has_lora(model), trainable), ...)


@struct.dataclass
class TrainState:
  """What the optimizer changes and a checkpoint holds; frozen state lives alongside."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def apply_direction(state: TrainState, tx: optax.GradientTransformation, direction: nnx.State,
                    lr: jax.Array) -> TrainState:
  """One optimizer step along `direction` (a gradient, or a combined one), scaled by `lr`."""
  updates, opt_state = tx.update(direction, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                    opt_state=opt_state)
