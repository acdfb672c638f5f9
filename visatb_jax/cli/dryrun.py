"""`--dry-run`: build the config's model abstractly, compile its train step, report its costs.

Nothing is allocated and no weight is read: the model is `jax.eval_shape`d (its shapes come from
the checkpoint's config.json when `model.path` exists, else from the config's sizes), the train
state and the global batch are ShapeDtypeStructs carrying their shardings, and the step is lowered
and compiled for the config's mesh over the devices at hand. XLA's memory analysis of the
compiled step gives the peak of temporaries (activations, gradients, collectives' buffers).

With `analyse` (the default) the report also reads the compiled, partitioned HLO of one device
(`runtime/cost.py`): the buffers live at the memory peak and the model code they come from, the
step's FLOPs against the model's, its collectives against FSDP's minimum, and a roofline of the
step on TPU v5p, H100 and H200 (a planning estimate). It also finds the f32 buffers that hold
bf16 values of the program (XLA:CPU computes bf16 in f32) and estimates the step's memory and
HBM bytes as a TPU or GPU would have them. The report ends with a verdict per device: does the
step fit an 80 GB H100, a 95 GB v5p, a 141 GB H200, as measured and as estimated.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from visatb_jax import train as train_lib
from visatb_jax.data import packing
from visatb_jax.model import factory
from visatb_jax.model import llama
from visatb_jax.model.qwen2vl import Qwen2VLConfig
from visatb_jax.pipeline import methods as methods_registry
from visatb_jax.pipeline import models as models_lib
from visatb_jax.runtime import cost
from visatb_jax.runtime import sharding as sharding_lib
from visatb_jax.train import gradmtl_step

GiB = float(1 << 30)
# train.batch_size counts samples; the rows a step packs them into depend on the data, which the
# dry run does not read. One sample a row is the most rows a step can need (every sample fits a
# row), so the memory verdict holds for any data; the LLaVA-1.5 mix packs ~2.6 into 2048 tokens.
SAMPLES_PER_ROW = 1.0


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


def abstract_batch(rows: int, seq_len: int, max_images: int, image_format: Any) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch (docs/architecture.md, "Batch"); the image arrays and
  positions as `image_format` (data/image_format.py) lays them out."""
  i32, f32 = jnp.int32, jnp.float32
  tokens = (rows, seq_len)
  batch = {"input_ids": jax.ShapeDtypeStruct(tokens, i32),
           "targets": jax.ShapeDtypeStruct(tokens, i32),
           "loss_mask": jax.ShapeDtypeStruct(tokens, f32),
           "task_ids": jax.ShapeDtypeStruct(tokens, i32),
           "positions": jax.ShapeDtypeStruct(image_format.positions_shape(rows, seq_len), i32),
           "segment_ids": jax.ShapeDtypeStruct(tokens, i32)}
  for key, (shape, dtype) in image_format.batch_shapes(rows, max_images).items():
    batch[key] = jax.ShapeDtypeStruct(shape, dtype)
  return batch


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _sized_model_section(model: Any) -> Any:
  """config.model as the dry run sizes it: when the parts it starts from are not on this machine
  (the paper configs name them as local paths to fill), the config's own sizes, which are those
  parts' (pipeline/presets.py); a plan needs no weights."""
  parts = factory.model_parts(model)
  if parts is None or all(os.path.exists(p) for p in parts.values()):
    return model
  section = model.to_dict() if hasattr(model, "to_dict") else dict(model)
  return {**section, **dict.fromkeys(factory.PART_FIELDS, "")}


def lower_step(config: Any, devices: Sequence[jax.Device] | None = None, *,
               samples_per_row: float = SAMPLES_PER_ROW) -> tuple[Any, dict[str, Any]]:
  """Lowers the train step of `config` for its mesh (over `devices`, default all).

  A step's rows: train.batch_size samples at `samples_per_row`, rounded up as the pipeline rounds
  them (`packing.rows_for_samples`, `models.row_multiple`).

  Returns the lowered step and what `dry_run` reports besides it: the mesh, the model config,
  the abstract parameters and their shardings, and the per-device bytes of each argument.
  """
  mesh_config = config.get("mesh")
  mesh = sharding_lib.make_mesh(mesh_config.to_dict() if hasattr(mesh_config, "to_dict")
                                else mesh_config, devices)
  model_section = _sized_model_section(config.model)
  model_cfg = factory.model_config(model_section)
  model = factory.abstract_model(model_section, model_cfg)
  train_section = config.train.to_dict() if hasattr(config.train, "to_dict") else dict(config.train)
  fields = {k: v for k, v in train_section.items() if k != "epochs"}
  samples = int(fields["batch_size"])
  rows = packing.rows_for_samples(samples, samples_per_row, models_lib.row_multiple(
      mesh, int(fields.get("accum_steps") or 1)))
  tc = train_lib.TrainConfig.of({**fields, "batch_size": rows, "steps": 1})
  graphdef, params, frozen = train_lib.split_model(
      model, freeze_vision_tower=tc.freeze_vision_tower)
  tx = train_lib.make_optimizer(tc)
  state = jax.eval_shape(lambda p: train_lib.init_train_state(p, tx), params)
  state_sh = sharding_lib.param_shardings(state, mesh)
  frozen_sh = sharding_lib.param_shardings(frozen, mesh)
  seq_len = int(config.data.seq_len)
  fmt = models_lib.image_format_for(model_cfg, config.data)
  batch = abstract_batch(rows, seq_len, int(config.data.max_images), fmt)
  num_tasks = len(config.task_order)
  data_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  args = (_with_sharding(state, state_sh), _with_sharding(frozen, frozen_sh),
          {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh) for k, v in batch.items()},
          jax.ShapeDtypeStruct((num_tasks,), jnp.float32, sharding=repl),
          jax.ShapeDtypeStruct((), jnp.float32, sharding=repl))
  method = gradient_method(config)
  gradient = None
  if method is None:
    step = train_lib.make_train_step(
        graphdef, tx, mesh=mesh, accum_steps=tc.accum_steps, donate=True,
        state_sharding=state_sh, frozen_sharding=frozen_sh, ce_chunk_size=tc.ce_chunk_size)
    lowered = step.lower(*args)
  else:
    name, options = method
    step = gradmtl_step.make_gradmtl_train_step(
        graphdef, tx, mesh=mesh, method=name, method_options=options,
        accum_steps=tc.accum_steps, donate=True, state_sharding=state_sh,
        frozen_sharding=frozen_sh, ce_chunk_size=tc.ce_chunk_size)
    mtl = jax.eval_shape(lambda: gradmtl_step.init_mtl_state(name, num_tasks))
    lowered = step.lower(*args, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), mtl))
    gradient = gradient_plan(name, num_tasks, state.params, state_sh.params, frozen, mesh)
  info = {
      "mesh": mesh, "model_cfg": model_cfg, "image_format": fmt, "train": tc, "rows": rows,
      "samples": samples, "samples_per_row": float(samples_per_row),
      "seq_len": seq_len,
      "max_images": int(config.data.max_images), "params": params, "frozen": frozen,
      "param_shardings": state_sh.params, "frozen_shardings": frozen_sh,
      "per_device_bytes": {
          "trainable_params": _per_device_bytes(state.params, state_sh.params),
          "optimizer_state": _per_device_bytes(state.opt_state, state_sh.opt_state),
          "frozen_params": _per_device_bytes(frozen, frozen_sh),
          "batch": _per_device_bytes(batch, jax.tree.map(lambda _: data_sh, batch)),
      },
      "gradient_method": gradient,
  }
  return lowered, info


def gradient_method(config: Any) -> tuple[str, dict[str, Any]] | None:
  """(name, options) when `config.weighting` is a gradient method (pipeline/methods.py: its
  final model trains with per-task gradients, `gradmtl_step`), else None."""
  name = str(config.get("weighting") or "visatb")
  if name not in methods_registry.REGISTRY or methods_registry.get(name).kind != "gradient":
    return None
  options = config.get("weighting_options") or {}
  options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
  return name, dict(options.get(name) or {})


def gradient_plan(method: str, num_tasks: int, params: Any, param_shardings: Any, frozen: Any,
                  mesh: Any) -> dict[str, Any]:
  """The per-task gradients of a gradient method's step, per device: T × the trainable
  parameters' share of one device (the [T, ...] tree is sharded like the parameters), and the
  plan that `gradmtl_step.check_memory` holds against one device before any stage."""
  share = _per_device_bytes(params, param_shardings)
  shape = dict(mesh.shape)
  shards = int(shape.get("fsdp", 1)) * int(shape.get("tensor", 1))
  trainable = _count(params)
  param_bytes = max((x.dtype.itemsize for x in jax.tree.leaves(params)), default=4)
  need = gradmtl_step.memory_need(num_tasks=num_tasks, trainable=trainable,
                                  frozen=_count(frozen), param_bytes=param_bytes, shards=shards)
  refusal = gradmtl_step.memory_message(
      method, need, num_tasks=num_tasks, trainable=trainable, param_bytes=param_bytes,
      devices=int(mesh.devices.size), shards=shards)
  return {"method": method, "tasks": num_tasks, "per_task_gradients": num_tasks * share,
          "plan": need, "refusal": refusal}


def compile_step(config: Any, devices: Sequence[jax.Device] | None = None,
                 compiler_options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """`lower_step`, compiled (with XLA `compiler_options`): (compiled step, info)."""
  lowered, info = lower_step(config, devices)
  return lowered.compile(compiler_options), info


def _dump_options(directory: str, nonce: int | None = None) -> dict[str, Any]:
  """XLA options that write the optimized module and its buffer live ranges to `directory`.

  XLA dumps only when it compiles, and the persistent compilation cache ignores the dump flags
  in its key, so a cached step would leave no dump: `nonce` (a debug option that only changes
  how many buffers XLA's own buffer-assignment printout lists) forces a fresh compilation.
  """
  options = {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}
  if nonce is not None:
    options["xla_debug_buffer_assignment_show_max"] = nonce
  return options


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _dump_texts(directory: str) -> tuple[str, str | None] | None:
  """(live ranges, module before optimizations) of the step XLA dumped to `directory`: the
  module whose live ranges were written last; None if there are none."""
  paths = sorted(glob.glob(os.path.join(directory, "*after_optimizations-live-range.txt")))
  if not paths:
    return None
  module = os.path.basename(paths[-1]).split(".")[:2]  # "module_0002", "jit_step"
  before = os.path.join(directory, ".".join(module) + ".before_optimizations.txt")
  return _read(paths[-1]), _read(before) if os.path.exists(before) else None


def _compile_with_dump(config: Any, devices: Sequence[jax.Device] | None
                       ) -> tuple[Any, dict[str, Any], str | None, str | None]:
  """`compile_step`, plus XLA's live-range dump of the compiled step and its module before
  optimizations (each None if XLA wrote none)."""
  with tempfile.TemporaryDirectory(prefix="visatb_dryrun_") as directory:
    compiled, info = compile_step(config, devices, _dump_options(directory))
    texts = _dump_texts(directory)
    if texts is None:  # served by the persistent cache: nothing was compiled, nothing dumped
      nonce = 1000 + time.time_ns() % 1_000_000
      compiled, info = compile_step(config, devices, _dump_options(directory, nonce))
      texts = _dump_texts(directory)
  live, before = texts if texts is not None else (None, None)
  return compiled, info, live, before


def _leaf_items(tree: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _matrix_params(tree: Any, part: str) -> int:
  """Elements of the matrices (rank >= 2 floating-point leaves) of one part of the model:
  "decoder" (language model layers and LM head, not the input embedding, a gather),
  "projector" or "vision"."""
  total = 0
  for name, leaf in _leaf_items(tree):
    # The decoder's stacked layers (llama.py) carry a leading layer axis: a norm scale or bias
    # [layers, D] is no matrix.
    rank = len(leaf.shape) - ("['layers']['" in name)
    if rank < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    # Qwen2-VL's tower is `visual`, its projector the merger inside it.
    where = ("projector" if "multi_modal_projector" in name or "merger" in name else "vision"
             if "vision_tower" in name or "visual" in name else "embedding"
             if "embed_tokens" in name else "decoder")
    total += math.prod(leaf.shape) if where == part else 0
  return total


def _fsdp_sharded_elements(tree: Any, shardings: Any) -> int:
  """Elements of the floating-point leaves that FSDP splits (their spec names `fsdp`)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    axes = [a for entry in sh.spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    if "fsdp" in axes and jnp.issubdtype(leaf.dtype, jnp.floating):
      total += math.prod(leaf.shape)
  return total


def model_flops(info: dict[str, Any]) -> dict[str, Any]:
  """The model's FLOPs per step (all devices) and their formula (`cost.decoder_flops_per_token`
  for the decoder on every token; the projector on image tokens; the frozen tower forward)."""
  cfg, params, frozen = info["model_cfg"], info["params"], info["frozen"]
  text, vision = cfg.text, cfg.vision
  both = (params, frozen)
  n_dec = sum(_matrix_params(t, "decoder") for t in both)
  if text.tie_word_embeddings:  # the LM head is the embedding matrix, used as a matmul
    n_dec += text.vocab_size * text.hidden_size
  n_dec_trainable = _matrix_params(params, "decoder")
  per_token = cost.decoder_flops_per_token(
      matmul_params=n_dec, trainable_matmul_params=n_dec_trainable,
      layers=text.num_hidden_layers, seq_len=info["seq_len"],
      attention_width=text.num_attention_heads * text.head_dim)
  tokens = info["rows"] * info["seq_len"]
  images = info["rows"] * info["max_images"]  # every slot runs the tower, filled or not
  n_proj = sum(_matrix_params(t, "projector") for t in both)
  if isinstance(cfg, Qwen2VLConfig):  # Every slot's full patch budget runs the tower.
    patches = info["image_format"].batch_shapes(1, 1)["images"][0][2]
    image_tokens = patches // vision.merge_unit
    tower = cost.vit_forward_flops(
        layers=vision.depth, tokens=patches, hidden=vision.embed_dim,
        intermediate=vision.mlp_dim, patches=patches, patch_inputs=vision.patch_dim)
  else:
    image_tokens = cfg.num_image_tokens
    tower = cost.vit_forward_flops(
        layers=cfg.vision_feature_layer % (vision.num_hidden_layers + 1),
        tokens=vision.num_patches + 1, hidden=vision.hidden_size,
        intermediate=vision.intermediate_size, patches=vision.num_patches,
        patch_inputs=vision.num_channels * vision.patch_size ** 2)
  projector = (4 * n_proj + 2 * _matrix_params(params, "projector")) * image_tokens
  if _matrix_params(params, "vision"):  # a trainable tower also runs backward
    tower *= 3
  total = tokens * per_token["total"] + images * (projector + tower)
  return {"total": total, "per_token": total / tokens, "tokens": tokens, "images": images,
          "decoder_per_token": per_token, "vision_per_image": tower,
          "projector_per_image": projector, "n_decoder": n_dec,
          "n_decoder_trainable": n_dec_trainable}


def _activation_estimate(info: dict[str, Any]) -> dict[str, float]:
  """`cost.full_remat_activation_bytes` per row, and for the rows of one device's micro-batch."""
  cfg, tc, mesh = info["model_cfg"], info["train"], info["mesh"]
  text, seq_len = cfg.text, info["seq_len"]
  per_row = cost.full_remat_activation_bytes(
      layers=text.num_hidden_layers, seq_len=seq_len, hidden=text.hidden_size,
      intermediate=text.intermediate_size, heads=text.num_attention_heads,
      act_bytes=jnp.dtype(cfg.compute_dtype).itemsize, score_bytes=4,  # float32 softmax
      score_fraction=cost.causal_block_fraction(seq_len, llama.query_block_size(seq_len)))
  rows = info["rows"] / tc.accum_steps / sharding_lib.batch_shards(mesh)
  return {**per_row, "rows_per_device": rows, "per_device": rows * per_row["total"]}


def _fsdp_minimum(info: dict[str, Any], remat: str) -> dict[str, Any]:
  cfg, mesh, tc = info["model_cfg"], info["mesh"], info["train"]
  compute = jnp.dtype(cfg.compute_dtype).itemsize
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(info["params"])
                  if jnp.issubdtype(x.dtype, jnp.floating))
  gathers = 2 if remat != "none" else 1
  minimum = cost.fsdp_min_wire_bytes(
      gathered_trainable_bytes=compute * _fsdp_sharded_elements(
          info["params"], info["param_shardings"]),
      gathered_frozen_bytes=compute * _fsdp_sharded_elements(
          info["frozen"], info["frozen_shardings"]),
      gradient_bytes=trainable * jnp.dtype(cfg.params_dtype).itemsize,
      fsdp=int(mesh.shape["fsdp"]), data=int(mesh.shape["data"]),
      accum_steps=tc.accum_steps, gathers_per_pass=gathers)
  return {**minimum, "gathers_per_pass": gathers, "compute_bytes": compute,
          "grad_bytes": jnp.dtype(cfg.params_dtype).itemsize}


def _xla_flops(compiled: Any) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per module
    analysis = analysis[0] if analysis else None
  return None if not analysis else float(analysis.get("flops", 0.0))


def analyse_step(hlo_text: str, xla_flops: float | None, info: dict[str, Any],
                 live_range: str | None, remat: str, temps: int | None,
                 top: int = 12, before_text: str | None = None) -> dict[str, Any]:
  """FLOPs, collectives, HBM traffic, the peak's buffers and the rooflines of a compiled step.

  Args:
    hlo_text: `compiled.as_text()`, the optimized, partitioned module of one device.
    xla_flops: XLA's `cost_analysis()` FLOPs, reported for comparison only.
    info: `compile_step`'s second result.
    live_range: XLA's live-range dump of the step, None when there is none.
    remat: the config's `model.remat`.
    temps: XLA's temp_size_in_bytes.
    top: buffers to list.
    before_text: XLA's dump of the module before optimizations, which still has the program's
      dtypes: with it (and a CPU compilation), the bf16 values XLA:CPU widened to f32 are
      found (`cost.is_widened`) and the HBM bytes and the peak estimated as on TPU and GPU.
  """
  module = cost.parse_hlo(hlo_text)
  counts = cost.execution_counts(module)
  devices = int(info["mesh"].devices.size)
  flops = cost.matmul_flops(module, counts)
  model = model_flops(info)
  ops = cost.collectives(module, counts)
  totals = cost.collective_totals(ops)
  wire = sum(t["wire_bytes"] for t in totals.values())
  on_cpu = info["mesh"].devices.flat[0].platform == "cpu"
  precisions = (cost.model_precisions(cost.parse_hlo(before_text))
                if before_text and on_cpu else None)
  scale = cost.widening_scale(module, precisions) if precisions is not None else cost.no_scale
  hbm = cost.hbm_bytes(module, counts)
  hbm_accelerator = cost.hbm_bytes(module, counts, scale) if on_cpu else hbm
  live = cost.parse_live_range_peak(live_range) if live_range else []
  peak = cost.peak_buffers(module, live, precisions)
  # None: not known (no dump to read); 0 off CPU, where nothing is widened.
  widened = (sum(b.bytes for b in peak if b.widened) if precisions is not None and peak
             else None if on_cpu else 0)
  estimate = _activation_estimate(info)
  minimum = _fsdp_minimum(info, remat)
  by_group = cost.wire_bytes_by_group(ops, as_on_accelerators=True)
  model_per_device = model["total"] / devices
  return {
      "flops": flops, "xla_cost_analysis_flops": xla_flops,
      "flops_by_pass": _largest(cost.matmul_flops_by(
          module, counts, lambda i: _pass_of(cost.op_name_of(i, module)))),
      "unknown_trip_counts": list(counts.unknown_trip_counts),
      "model_flops": model, "flops_ratio": flops * devices / model["total"],
      "hbm_bytes": hbm, "hbm_bytes_accelerator": hbm_accelerator,
      "hbm_by_source": _largest(cost.hbm_bytes_by(
          module, counts, lambda i: cost.source_of(i, module), scale), 5),
      "collectives": totals, "wire_bytes": wire,
      "scatter_like_all_reduce_wire": sum(c.runs * c.wire_bytes * c.scatter_share for c in ops),
      "widened_wire": sum(c.runs * c.wire_bytes for c in ops if c.widened),
      "wire_as_on_accelerators": _wire_as_on_accelerators(ops),
      "all_gather_by_pass": _all_gather_by_pass(ops),
      "largest_collectives": _largest_collectives(ops, top=6),
      "wire_by_dtype": _wire_by_dtype(ops),
      "fsdp_minimum": minimum,
      "wire_ratio": wire / minimum["total"] if minimum["total"] else None,
      "accelerator_wire_ratio": (_wire_as_on_accelerators(ops) / minimum["total"]
                                 if minimum["total"] else None),
      "peak_buffers": peak[:top], "peak_buffers_total": sum(b.bytes for b in peak),
      "peak_by_source": _peak_by_source(peak, top=8),
      "widened_at_peak": widened,
      "activation_estimate": estimate,
      "temps_over_estimate": temps / estimate["per_device"] if temps and estimate[
          "per_device"] else None,
      "accelerator_temps_over_estimate": (
          (temps - widened / 2) / estimate["per_device"]
          if temps and widened is not None and estimate["per_device"] else None),
      # HBM time from the accelerator bytes: the CPU's widened bytes would call every chip
      # memory-bound.
      "roofline": {name: {**cost.roofline(flops=flops, hbm_bytes=hbm_accelerator,
                                          wire_by_group=by_group,
                                          model_flops=model_per_device, chip=chip),
                          "chip": chip}
                   for name, chip in cost.CHIPS.items()},
  }


def _wire_as_on_accelerators(ops: Sequence[cost.Collective]) -> float:
  """Wire bytes once the two XLA:CPU artifacts are undone (`cost.wire_bytes_by_group`)."""
  return sum(cost.wire_bytes_by_group(ops, as_on_accelerators=True).values())


def _pass_of(op_name: str) -> str:
  """"fwd", "bwd remat" (the recomputed forward) or "bwd"."""
  tags = cost.short_op_name(op_name).split(" ")
  return " ".join(tags[:2] if len(tags) > 2 and tags[1] == "remat" else tags[:1])


def _largest(values: dict[str, float], top: int | None = None) -> dict[str, float]:
  return dict(sorted(values.items(), key=lambda kv: -kv[1])[:top])


def _all_gather_by_pass(ops: Sequence[cost.Collective]) -> dict[str, float]:
  """Wire bytes of the all-gathers by pass ("fwd", "bwd remat", "bwd"): how often the weights
  are gathered."""
  out: dict[str, float] = {}
  for c in ops:
    if c.kind == "all-gather":
      out[_pass_of(c.op_name)] = out.get(_pass_of(c.op_name), 0.0) + c.runs * c.wire_bytes
  return _largest(out)


def _largest_collectives(ops: Sequence[cost.Collective], top: int) -> list[dict[str, Any]]:
  """The collectives that send the most per step, merged by (kind, shape, source, op)."""
  merged: dict[tuple, dict[str, Any]] = {}
  for c in ops:
    key = (c.kind, cost.describe_shape(c.shape), c.source, cost.short_op_name(c.op_name),
           c.group, c.scatter_share, c.widened)
    m = merged.setdefault(key, {"kind": c.kind, "shape": key[1], "source": c.source,
                                "op": key[3], "group": c.group, "scatter_share": c.scatter_share,
                                "widened": c.widened, "runs": 0.0, "wire_bytes": 0.0})
    m["runs"] += c.runs
    m["wire_bytes"] += c.runs * c.wire_bytes
  return sorted(merged.values(), key=lambda m: -m["wire_bytes"])[:top]


def _wire_by_dtype(ops: Sequence[cost.Collective]) -> dict[str, float]:
  """"all-gather f32" -> wire bytes per step: shows what precision the weights travel in."""
  out: dict[str, float] = {}
  for c in ops:
    arrays = cost.array_shapes(c.shape)
    key = f"{c.kind} {arrays[0][0] if arrays else '?'}"
    out[key] = out.get(key, 0.0) + c.runs * c.wire_bytes
  return _largest(out)


def _peak_by_source(peak: Sequence[cost.PeakBuffer], top: int) -> list[dict[str, Any]]:
  merged: dict[tuple[str, str], dict[str, Any]] = {}
  for b in peak:
    m = merged.setdefault((b.role, b.source), {"role": b.role, "source": b.source, "bytes": 0,
                                               "buffers": 0})
    m["bytes"] += b.bytes
    m["buffers"] += 1
  return sorted(merged.values(), key=lambda m: -m["bytes"])[:top]


def dry_run(config: Any, devices: Sequence[jax.Device] | None = None, *,
            analyse: bool = True) -> dict[str, Any]:
  """Compiles the train step of `config` for its mesh (over `devices`, default all) and returns
  the model's sizes and the step's memory per device; with `analyse`, also `analyse_step`'s
  figures under "cost" and the accelerator estimate of the memory ("accelerator_total_per_device",
  None without it on CPU); "memory_verdict": `memory_verdicts` of the two."""
  live = before = None
  if analyse:
    compiled, info, live, before = _compile_with_dump(config, devices)
  else:
    compiled, info = compile_step(config, devices)
  mesh, model_cfg, tc = info["mesh"], info["model_cfg"], info["train"]
  mem = compiled.memory_analysis()
  remat = str(config.model.get("remat") or "none")
  temps = None if mem is None else int(mem.temp_size_in_bytes)
  result = {
      "mesh": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "platform": mesh.devices.flat[0].platform,
      "batch": {"rows": info["rows"], "seq_len": info["seq_len"], "accum_steps": tc.accum_steps,
                "samples": info["samples"], "samples_per_row": info["samples_per_row"]},
      "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
      "remat": remat,
      "ce_chunk_size": tc.ce_chunk_size,
      "parameters": {"trainable": _count(info["params"]), "frozen": _count(info["frozen"])},
      "per_device_bytes": {
          **info["per_device_bytes"],
          # XLA's peak of temporaries: activations kept for the backward pass, gradients,
          # collective buffers. None where the backend does not report it.
          "activations_and_temps": temps,
      },
      "compiled_total_per_device": None if mem is None else int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes),
      # A gradient method's step (config.weighting): its per-task gradients per device.
      "gradient_method": info.get("gradient_method"),
  }
  if analyse:
    result["cost"] = analyse_step(compiled.as_text(), _xla_flops(compiled), info, live, remat,
                                  temps, before_text=before)
  widened = result["cost"]["widened_at_peak"] if analyse else (
      0 if result["platform"] != "cpu" else None)
  total = result["compiled_total_per_device"]
  result["widened_at_peak"] = widened
  result["accelerator_total_per_device"] = (
      None if total is None or widened is None else total - widened / 2)
  result["memory_verdict"] = memory_verdicts(total, result["accelerator_total_per_device"])
  return result


def memory_verdicts(measured: float | None, accelerator: float | None
                    ) -> dict[str, dict[str, Any]]:
  """`cost.memory_verdict` for every chip of `cost.CHIPS`, smallest memory first ({} when
  the backend reports no memory)."""
  if measured is None:
    return {}
  chips = sorted(cost.CHIPS.items(), key=lambda kv: kv[1].hbm_bytes)
  return {name: cost.memory_verdict(measured_bytes=measured, accelerator_bytes=accelerator,
                                    capacity_bytes=chip.hbm_bytes)
          for name, chip in chips}


def _size(b: float | None) -> str:
  if b is None:
    return "n/a"
  if b >= GiB / 4:
    return f"{b / GiB:.2f} GiB"
  if b >= 1 << 20:
    return f"{b / (1 << 20):.1f} MiB"
  return f"{b / 1024:.1f} KiB"


def _seconds(t: float) -> str:
  if t >= 0.1:
    return f"{t:.2f} s"
  return f"{t * 1e3:.2f} ms" if t >= 1e-4 else f"{t * 1e6:.1f} us"


def format_report(r: dict[str, Any], targets: Sequence[str] | None = None) -> str:
  """A readable table of `dry_run`'s result (rooflines for `targets`, default all of
  `cost.CHIPS`)."""
  def gib(b):
    if b is None:
      return "n/a"
    return f"{b / GiB:9.2f} GiB" if b >= GiB / 4 else f"{b / (1 << 20):9.2f} MiB"
  p = r["parameters"]
  lines = [
      f"mesh {r['mesh']} on {r['devices']} {r['platform']} device(s); global batch "
      f"{r['batch']['rows']} x {r['batch']['seq_len']} (accum {r['batch']['accum_steps']}; "
      f"{r['batch']['samples']} samples at {r['batch']['samples_per_row']:g} a row); "
      f"compute {r['dtype']}, params {r['param_dtype']}; remat {r['remat']}; "
      f"CE chunk {r['ce_chunk_size'] or 'off'}",
      f"parameters: {p['trainable'] / 1e6:,.1f}M trainable, {p['frozen'] / 1e6:,.1f}M frozen",
      "per device:",
  ]
  for name, b in r["per_device_bytes"].items():
    lines.append(f"  {name:24s} {gib(b)}")
  lines += _gradient_lines(r, gib)
  lines.append(f"  {'total (compiled step)':24s} {gib(r['compiled_total_per_device'])}")
  if r["platform"] == "cpu" and r.get("accelerator_total_per_device") is not None:
    lines.append(f"  {'  accelerator estimate':24s} {gib(r['accelerator_total_per_device'])}"
                 "  (bf16 values at 2 bytes where XLA:CPU holds them in f32; see 'widening')")
  if "cost" in r:
    c = r["cost"]
    lines += ([""] + _memory_lines(r, c) + [""] + _flops_lines(r, c) + [""]
              + _collective_lines(r, c) + [""] + _roofline_lines(c, targets))
  lines += [""] + verdict_lines(r, targets)
  return "\n".join(lines)


def _gradient_lines(r: dict[str, Any], gib: Any) -> list[str]:
  """What a gradient method's step holds besides the VITW step's: its per-task gradients."""
  g = r.get("gradient_method")
  if not g:
    return []
  plan, capacity = g["plan"], _gb(gradmtl_step.DEVICE_BYTES).replace(".00", "")
  lines = [
      f"  {'per_task_gradients':24s} {gib(g['per_task_gradients'])}  ({g['method']}: "
      f"{g['tasks']} tasks x the trainable parameters' share of one device; part of "
      "activations_and_temps)",
      f"    planned before any stage: {_gb(plan['per_task_gradients'])} per-task gradients + "
      f"{_gb(plan['model_state'])} model state = {_gb(plan['total'])} per device, "
      + (f"more than one {capacity} device: the config check refuses it" if g["refusal"]
         else f"within one {capacity} device, activations apart")]
  return lines


def _gb(b: float) -> str:
  return f"{b / 1e9:.2f} GB"


def _margin(b: float) -> str:
  return f"margin {_gb(b)}" if b >= 0 else f"short by {_gb(-b)}"


def verdict_lines(r: dict[str, Any], targets: Sequence[str] | None = None) -> list[str]:
  """"fits" / "does not fit" per device for `targets` (default every chip), with the margins
  (the last lines of the report)."""
  verdicts = r.get("memory_verdict") or {}
  names = [n for n in verdicts if n in check_targets(targets)]
  if not names:
    return ["fits or not: n/a (the backend reports no memory for the compiled step)"]
  measured, accelerator = r["compiled_total_per_device"], r.get("accelerator_total_per_device")
  on_cpu = r["platform"] == "cpu"
  lines = [f"fits or not, per device: the compiled step (arguments, outputs, temporaries) "
           f"needs {_gb(measured)} ({measured / GiB:.2f} GiB) as measured on {r['platform']}"]
  if on_cpu and accelerator is not None:
    lines[-1] += (f", about {_gb(accelerator)} ({accelerator / GiB:.2f} GiB) on TPU/GPU "
                  "(the accelerator estimate: the measured figure "
                  f"less half the {_size(r['widened_at_peak'])} of widened bf16 buffers live "
                  "at the peak)")
  elif on_cpu:
    lines[-1] += "; no TPU/GPU estimate (it needs XLA's dump of the compiled step)"
  if on_cpu and accelerator is not None:
    lines.append("  (the measured figure bounds the accelerator's from above, the estimate from "
                 "below: the accelerator's peak may fall elsewhere, and its compiler fuses and "
                 "schedules differently)")
  lines.append("  (capacities as the vendors state them, GB = 1e9 bytes; the runtime's own "
               "reserve comes out of the margin, and on GPUs JAX preallocates a fraction of the "
               "memory, 75 % by default: XLA_PYTHON_CLIENT_MEM_FRACTION raises it)")
  for name in names:  # last: the verdicts end the report
    v, chip = verdicts[name], cost.CHIPS[name]
    head = f"  {chip.name} ({v['capacity_bytes'] / 1e9:.0f} GB): {v['verdict']}"
    margins = f"{_margin(v['measured_margin'])} as measured"
    if v["accelerator_margin"] is not None and on_cpu:
      margins += f", {_margin(v['accelerator_margin'])} on the accelerator estimate"
    lines.append(f"{head}; {margins}")
  return lines


def _memory_lines(r: dict[str, Any], c: dict[str, Any]) -> list[str]:
  est = c["activation_estimate"]
  lines = ["memory at the peak (XLA's live ranges of the compiled step; arguments included):"]
  if not c["peak_buffers"]:
    lines.append("  n/a: XLA wrote no live-range dump for this step")
  else:
    lines.append(f"  {len(c['peak_buffers'])} largest of the buffers live at the peak "
                 f"({_size(c['peak_buffers_total'])} in all):")
    for b in c["peak_buffers"]:
      mark = "f32<-bf16" if b.widened else ""
      lines.append(f"    {_size(b.bytes):>10s}  {b.shape:28s} {mark:9s} {b.role:10s} "
                   f"{cost.short_op_name(b.op_name):24s} {b.source}")
    lines.append("  by source line:")
    for g in c["peak_by_source"]:
      lines.append(f"    {_size(g['bytes']):>10s}  {g['buffers']:4d} buffer(s)  {g['role']:10s} "
                   f"{g['source']}")
  lines += _widening_lines(r, c)
  lines.append(
      f"  full-remat activation estimate per row: L·S·d·bytes {_size(est['residuals'])} (saved "
      f"layer inputs) + one layer's working set {_size(est['layer'])} = {_size(est['total'])}; "
      f"x {est['rows_per_device']:g} rows per device = {_size(est['per_device'])}")
  ratio, acc = c["temps_over_estimate"], c.get("accelerator_temps_over_estimate")
  text = f"  measured temporaries / estimate: {'n/a' if ratio is None else f'{ratio:.2f}'}"
  if acc is not None:
    text += f" as measured, {acc:.2f} with the widened buffers at bf16"
  lines.append(text)
  remat = ("" if r["remat"] == "full" else
           f"what remat '{r['remat']}' keeps beyond full remat, ")
  lines.append(
      "    = XLA's temporaries per device (all the step allocates besides its arguments) over "
      "the formula's activations of a fully rematerialised decoder in the compute dtype; above 1 "
      f"by {remat}the buffers the formula leaves out (gradients and their accumulator, gathered "
      "weights, loss chunks, vision tower: see the buffers above) and, as measured, by "
      "XLA:CPU's f32 widening")
  return lines


def _widening_lines(r: dict[str, Any], c: dict[str, Any]) -> list[str]:
  widened = c.get("widened_at_peak")
  if r["platform"] != "cpu":
    return []
  if widened is None:
    return ["  widening: n/a (XLA dumped no live ranges or no module before optimizations)"]
  total = c["peak_buffers_total"]
  return [
      f"  widening: {_size(widened)} of the {_size(total)} live at the peak "
      f"({widened / total if total else 0:.0%}; marked 'f32<-bf16' above) are f32 buffers of values the "
      f"program holds in bf16; on TPU/GPU they take half, {_size(widened / 2)} less",
      "    (XLA:CPU computes bf16 ops in f32 and keeps the results in f32; a buffer counts when "
      "the op computing it is a convert of bf16 data that XLA inserted, or an op whose source "
      "line and primitive give only bf16 results in the module before optimizations; anything "
      "ambiguous counts as f32)"]


def _flops_lines(r: dict[str, Any], c: dict[str, Any]) -> list[str]:
  m = c["model_flops"]
  dec = m["decoder_per_token"]
  devices = r["devices"]
  per_token = c["flops"] * devices / m["tokens"]
  xla = c["xla_cost_analysis_flops"]
  lines = [
      "FLOPs (matmuls and convolutions of the partitioned HLO, each loop body x its trip count):",
      f"  compiled: {c['flops']:.3e} per device per step = {per_token:.3e} per token "
      f"(x {devices} devices / {m['tokens']:,} tokens)",
      f"  XLA cost_analysis(): {'n/a' if xla is None else f'{xla:.3e}'} per device: it counts "
      "each while-loop body once (layers and micro-batches are scans), hence not used",
      f"  model: {m['per_token']:.3e} per token = decoder 2N fwd + 2N act. grad + 2N_trainable "
      f"weight grad ({dec['dense']:.3e}; N = {m['n_decoder'] / 1e6:,.0f}M matmul params, "
      f"{m['n_decoder_trainable'] / 1e6:,.0f}M trainable) + attention 12·L·S·w "
      f"({dec['attention']:.3e}; full S x S, not halved for the causal mask) + projector and "
      f"frozen vision forward per image slot ({m['images']:,} slots)",
      f"  compiled / model: {c['flops_ratio']:.2f} (remat {r['remat']}); compiled by pass: "
      + ", ".join(f"{k} {v / c['flops']:.0%}" for k, v in c["flops_by_pass"].items()),
      "    = the compiled matmul FLOPs (x devices) over the model's (the formula above): above 1 "
      "by the forward that remat recomputes, below 1 where the causal query blocks skip masked "
      "scores that the formula counts; the pass shares are of the compiled FLOPs",
  ]
  if c["unknown_trip_counts"]:
    lines.append(f"  (loops without a known trip count, counted once: "
                 f"{', '.join(c['unknown_trip_counts'])})")
  return lines


def _collective_lines(r: dict[str, Any], c: dict[str, Any]) -> list[str]:
  m = c["fsdp_minimum"]
  lines = ["collectives per device per step (wire: bytes one device sends, ring algorithms; "
           "buffer: the array gathered or reduced):",
           f"  {'kind':20s} {'count':>8s} {'buffer':>11s} {'wire':>11s}"]
  for kind, t in sorted(c["collectives"].items(), key=lambda kv: -kv[1]["wire_bytes"]):
    lines.append(f"  {kind:20s} {t['count']:8.0f} {_size(t['buffer_bytes']):>11s} "
                 f"{_size(t['wire_bytes']):>11s}")
  lines.append(f"  {'total':20s} {'':8s} {'':11s} {_size(c['wire_bytes']):>11s}")
  lines.append("  by dtype: " + ", ".join(f"{k} {_size(v)}" for k, v in
                                          c["wire_by_dtype"].items() if v))
  lines.append("  all-gathers by pass: " + ", ".join(
      f"{k} {_size(v)}" for k, v in c["all_gather_by_pass"].items()))
  lines.append(f"  XLA:CPU artifacts: {_size(c['widened_wire'])} are f32 collectives of bf16 data "
               "(XLA:CPU computes bf16 in f32; TPU/GPU move bf16, half); "
               f"{_size(c['scatter_like_all_reduce_wire'])} are all-reduces of which each device "
               "keeps 1/n (TPU/GPU compile reduce-scatters, half)")
  ratio, acc = c["wire_ratio"], c["accelerator_wire_ratio"]
  lines.append(
      f"  FSDP minimum: {_size(m['total'])} = accum x ({m['gathers_per_pass']} x gather trainable "
      f"+ gather frozen, in {m['compute_bytes']}-byte compute dtype, + reduce-scatter grads in "
      f"{m['grad_bytes']} bytes) x (n-1)/n [+ grad all-reduce over data]")
  lines.append(
      f"  measured / minimum: {'n/a' if ratio is None else f'{ratio:.2f}'} as compiled, "
      f"{'n/a' if acc is None else f'{acc:.2f}'} without the XLA:CPU artifacts "
      f"({_size(c['wire_as_on_accelerators'])})")
  lines.append(
      "    = the wire bytes one device sends per step over FSDP's minimum above: above 1 by "
      "weights gathered more often than twice per micro-batch or collectives FSDP does not need; "
      "below 1 where XLA gathers a weight once per step instead of once per micro-batch")
  lines.append("  largest (a % on an all-reduce: the share of it that each device slices to its "
               "1/n, which TPU/GPU compile as a reduce-scatter):")
  for g in c["largest_collectives"]:
    note = (f" ({g['scatter_share']:.0%} a reduce-scatter on TPU/GPU)" if g["scatter_share"]
            else "") + (
        " (bf16 data)" if g["widened"] else "")
    lines.append(f"    {_size(g['wire_bytes']):>10s}  {g['kind']} {g['shape']} over {g['group']} "
                 f"x{g['runs']:g}  {g['op']}  {g['source']}{note}")
  return lines


def check_targets(targets: Sequence[str] | None) -> list[str]:
  """The roofline targets to print (default: every chip of `cost.CHIPS`); ValueError naming an
  unknown one (check before compiling: a 7B step takes minutes)."""
  unknown = [t for t in targets or () if t not in cost.CHIPS]
  if unknown:
    raise ValueError(f"unknown target {unknown[0]!r}; known: {sorted(cost.CHIPS)}")
  return list(targets) if targets else list(cost.CHIPS)


def _roofline_lines(c: dict[str, Any], targets: Sequence[str] | None) -> list[str]:
  names = check_targets(targets)
  hbm, hbm_acc = c["hbm_bytes"], c.get("hbm_bytes_accelerator", c["hbm_bytes"])
  lines = ["roofline, a PLANNING ESTIMATE per device: step = max(compute, HBM, communication), "
           "each at the chip's peak and perfectly overlapped (no-overlap bound: their sum); "
           f"compiled FLOPs; HBM bytes {_size(hbm_acc)}: those of the CPU-compiled HLO "
           f"({_size(hbm)}, a proxy) with the widened bf16 values at 2 bytes; collective wire "
           f"bytes without the XLA:CPU artifacts ({_size(c['wire_as_on_accelerators'])}):",
           f"  {'target':10s} {'bf16 TFLOP/s':>12s} {'HBM GB/s':>9s} {'link GB/s':>15s} "
           f"{'compute':>8s} {'HBM':>8s} {'comm':>8s} {'step':>8s} {'MFU':>5s} "
           f"{'(no overlap)':>12s}"]
  for name in names:
    e = c["roofline"][name]
    chip, t = e["chip"], e["times"]
    link = f"{chip.link_bytes_per_s / 1e9:.0f} {chip.link}"
    if chip.scale_up:
      link += f"/{chip.scale_out_bytes_per_s / 1e9:.0f}"
    lines.append(
        f"  {name:10s} {chip.bf16_flops_per_s / 1e12:12.0f} {chip.hbm_bytes_per_s / 1e9:9.0f} "
        f"{link:>15s} {_seconds(t['compute']):>8s} {_seconds(t['memory']):>8s} "
        f"{_seconds(t['communication']):>8s} {_seconds(e['step_s']):>8s} {e['mfu']:5.0%} "
        f"{e['mfu_no_overlap']:12.0%}  ({e['bound']}-bound)")
  lines.append("  HBM traffic by source line: " + ", ".join(
      f"{k} {v / hbm_acc:.0%}" for k, v in c["hbm_by_source"].items()))
  lines.append("    (shares of the HBM bytes above. The bound is the largest of the three times; "
               "the HBM bytes count every op XLA:CPU left unfused, and TPU/GPU compilers fuse more, "
               "so an HBM bound is the proxy's upper end: the compute and communication times are "
               "the firmer figures)")
  lines.append("  MFU = the model's FLOPs per device / (step x peak bf16 FLOP/s); (no overlap): "
               "the same with the sum of the three times")
  lines.append("  peaks: dense bf16, HBM and one-direction link bandwidth per chip "
               "(runtime/cost.py CHIPS, with sources); GPUs: NVLink within 8, InfiniBand beyond")
  return lines
