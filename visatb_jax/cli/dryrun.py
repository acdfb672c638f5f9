"""`--dry-run`: build the config's model abstractly, compile its train step, report memory per device.

Nothing is allocated and no weight is read: the model is `jax.eval_shape`d (its shapes come from
the checkpoint's config.json when `model.path` exists, else from the config's sizes), the train
state and the global batch are ShapeDtypeStructs carrying their shardings, and the step is lowered
and compiled for the config's mesh over the devices at hand. XLA's memory analysis of the
compiled step gives the peak of temporaries (activations, gradients, collectives' buffers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from visatb_jax.runtime import sharding as sharding_lib
from visatb_jax import train as train_lib
from visatb_jax.model import factory

GiB = float(1 << 30)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` placed with `shardings` (the largest shard of each leaf)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    shape = sh.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * leaf.dtype.itemsize  # also PRNG key dtypes (LoRA dropout)
  return total


def _count(tree: Any) -> int:
  """Parameters (floating-point leaves: not the LoRA dropout keys) in `tree`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def abstract_batch(rows: int, seq_len: int, max_images: int, image_size: int) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch (docs/architecture.md, "Batch")."""
  i32, f32 = jnp.int32, jnp.float32
  tokens = (rows, seq_len)
  return {"input_ids": jax.ShapeDtypeStruct(tokens, i32),
          "targets": jax.ShapeDtypeStruct(tokens, i32),
          "loss_mask": jax.ShapeDtypeStruct(tokens, f32),
          "task_ids": jax.ShapeDtypeStruct(tokens, i32),
          "positions": jax.ShapeDtypeStruct(tokens, i32),
          "segment_ids": jax.ShapeDtypeStruct(tokens, i32),
          "images": jax.ShapeDtypeStruct((rows, max_images, image_size, image_size, 3), f32)}


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def dry_run(config: Any, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Compiles the train step of `config` for its mesh (over `devices`, default all) and returns
  the model's sizes and the step's memory per device."""
  mesh_config = config.get("mesh")
  mesh = sharding_lib.make_mesh(mesh_config.to_dict() if hasattr(mesh_config, "to_dict")
                                else mesh_config, devices)
  model_cfg = factory.model_config(config.model)
  model = factory.abstract_model(config.model, model_cfg)
  train_section = config.train.to_dict() if hasattr(config.train, "to_dict") else dict(config.train)
  tc = train_lib.TrainConfig.of(
      {**{k: v for k, v in train_section.items() if k != "epochs"}, "steps": 1})
  graphdef, params, frozen = train_lib.split_model(
      model, freeze_vision_tower=tc.freeze_vision_tower)
  tx = train_lib.make_optimizer(tc)
  state = jax.eval_shape(lambda p: train_lib.init_train_state(p, tx), params)
  state_sh = sharding_lib.param_shardings(state, mesh)
  frozen_sh = sharding_lib.param_shardings(frozen, mesh)
  rows, seq_len = int(tc.batch_size), int(config.data.seq_len)
  batch = abstract_batch(rows, seq_len, int(config.data.max_images), model_cfg.vision.image_size)
  num_tasks = len(config.task_order)
  step = train_lib.make_train_step(
      graphdef, tx, mesh=mesh, accum_steps=tc.accum_steps, donate=True,
      state_sharding=state_sh, frozen_sharding=frozen_sh, ce_chunk_size=tc.ce_chunk_size)
  data_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  lowered = step.lower(
      _with_sharding(state, state_sh), _with_sharding(frozen, frozen_sh),
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh) for k, v in batch.items()},
      jax.ShapeDtypeStruct((num_tasks,), jnp.float32, sharding=repl),
      jax.ShapeDtypeStruct((), jnp.float32, sharding=repl))
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  return {
      "mesh": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "platform": mesh.devices.flat[0].platform,
      "batch": {"rows": rows, "seq_len": seq_len, "accum_steps": tc.accum_steps},
      "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
      "remat": str(config.model.get("remat") or "none"),
      "ce_chunk_size": tc.ce_chunk_size,
      "parameters": {"trainable": _count(params), "frozen": _count(frozen)},
      "per_device_bytes": {
          "trainable_params": _per_device_bytes(state.params, state_sh.params),
          "optimizer_state": _per_device_bytes(state.opt_state, state_sh.opt_state),
          "frozen_params": _per_device_bytes(frozen, frozen_sh),
          "batch": _per_device_bytes(batch, jax.tree.map(lambda _: data_sh, batch)),
          # XLA's peak of temporaries: activations kept for the backward pass, gradients,
          # collective buffers. None where the backend does not report it.
          "activations_and_temps": None if mem is None else int(mem.temp_size_in_bytes),
      },
      "compiled_total_per_device": None if mem is None else int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes),
  }


def format_report(r: dict[str, Any]) -> str:
  """A readable table of `dry_run`'s result."""
  def gib(b):
    if b is None:
      return "n/a"
    return f"{b / GiB:9.2f} GiB" if b >= GiB / 4 else f"{b / (1 << 20):9.2f} MiB"
  p = r["parameters"]
  lines = [
      f"mesh {r['mesh']} on {r['devices']} {r['platform']} device(s); global batch "
      f"{r['batch']['rows']} x {r['batch']['seq_len']} (accum {r['batch']['accum_steps']}); "
      f"compute {r['dtype']}, params {r['param_dtype']}; remat {r['remat']}; "
      f"CE chunk {r['ce_chunk_size'] or 'off'}",
      f"parameters: {p['trainable'] / 1e6:,.1f}M trainable, {p['frozen'] / 1e6:,.1f}M frozen",
      "per device:",
  ]
  for name, b in r["per_device_bytes"].items():
    lines.append(f"  {name:24s} {gib(b)}")
  lines.append(f"  {'total (compiled step)':24s} {gib(r['compiled_total_per_device'])}")
  return "\n".join(lines)
