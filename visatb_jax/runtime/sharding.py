"""Device mesh, logical-axis sharding rules and multi-host initialisation.

Three pieces, all usable on a laptop (one CPU device) and on a pod slice unchanged:

* `make_mesh(mesh_config)`: a `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor") whose sizes
  come from the config (`data`, `fsdp`, `tensor`; -1 takes the remaining devices).
* Logical axes: every parameter dimension gets a *logical* name (embed, mlp, heads, kv_heads, kv,
  vocab, norm, ...) derived from its NNX path (`param_logical_axes`); a rules mapping turns logical
  names into mesh axes (`DEFAULT_RULES`: embed -> fsdp, mlp/heads/kv_heads/vocab -> tensor, batch
  -> (data, fsdp)). `param_shardings` applies this to a whole pytree (params, a `TrainState` with
  its optimizer moments, frozen state), `batch_sharding` / `shard_batch` place the batch, and
  `with_logical_constraint` pins activations.
* `initialize_distributed()`: `jax.distributed.initialize()` with arguments read from the
  environment (explicit VISATB_* variables, SLURM, Cloud TPU), a no-op for a single process.

Divisibility: a dimension is sharded over the mesh axes its logical name maps to only when the
product of their sizes divides the dimension. For a tuple of mesh axes the longest prefix that
divides is used (batch 2 on data=2, fsdp=2 is sharded over `data` alone); when none divides, the
dimension is replicated. A mesh axis is used at most once per array (a later dimension that maps
to an axis already used by an earlier one is replicated on it). Sharding is therefore always valid,
never an error, and a tiny model on a big mesh simply ends up (partly) replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Mesh axes of one logical name: a mesh axis name, a tuple of them (sharded over their product), or
# None (replicated).
MeshAxes = str | tuple[str, ...] | None
LogicalRules = Mapping[str, MeshAxes]
LogicalAxes = tuple[str | None, ...]

DEFAULT_RULES: dict[str, MeshAxes] = {
    # Activations.
    "batch": ("data", "fsdp"),  # Every data-parallel replica and FSDP shard reads its own rows.
    "length": None,
    # Parameters (and activation feature dimensions). FSDP shards the model dimension of every
    # matrix (ZeRO-3: gathered just in time for each matmul); tensor parallelism splits the
    # "wide" dimension of each block (Megatron column/row pairs), so attention heads and MLP
    # units stay local and only the block outputs are reduced.
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,  # head_dim
    "vocab": "tensor",
    "norm": None,  # Norm scales/biases: tiny, read by every device.
}

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ mesh


def _config_get(config: Any, name: str) -> Any:
  """A field of a dict, ConfigDict or attribute object; None when absent."""
  if config is None:
    return None
  if isinstance(config, Mapping) or hasattr(config, "get"):
    return config.get(name)
  return getattr(config, name, None)


def _config_keys(config: Any) -> list[str]:
  if isinstance(config, Mapping) or hasattr(config, "keys"):
    return [str(k) for k in config.keys()]
  return [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else []


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
  """Axis sizes {"data", "fsdp", "tensor"} for `num_devices` devices.

  Args:
    mesh_config: None, or a mapping / ConfigDict with optional integer fields `data`, `fsdp`,
      `tensor` (and optionally `rules`, ignored here). A size of -1 takes the devices the other
      axes leave; at most one axis may be -1. Unset axes are 1, except `data`, which is -1 when no
      other axis is -1 (so `{"fsdp": 4}` on 8 devices is data=2, fsdp=4; None is data=all).
    num_devices: devices the mesh must cover exactly.

  Raises:
    ValueError: an unknown field, a size that is not a positive integer or -1, more than one -1,
      or sizes whose product is not the device count (the message names every axis and the count).
  """
  unknown = sorted(set(_config_keys(mesh_config)) - set(MESH_AXES) - {"rules"})
  if unknown:
    raise ValueError(f"mesh config: unknown field(s) {unknown}; known: {list(MESH_AXES)}")
  raw = {axis: _config_get(mesh_config, axis) for axis in MESH_AXES}
  if raw["data"] is None:
    raw["data"] = 1 if any(v == -1 for v in raw.values()) else -1
  sizes = {axis: 1 if v is None else v for axis, v in raw.items()}
  described = ", ".join(f"{a}={v}" for a, v in sizes.items())
  for axis, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f"mesh config: {axis}={v!r} must be a positive integer or -1 ({described})")
  rest = [a for a, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh config: at most one axis may be -1, got {described}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if num_devices % fixed:
      raise ValueError(f"mesh ({described}): the fixed axes' product {fixed} does not divide the "
                       f"{num_devices} devices, so {rest[0]}=-1 cannot take the rest")
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh ({described}): the product of the axis sizes is {fixed}, but there "
                     f"are {num_devices} devices; make it equal, or set one axis to -1")
  return {a: int(v) for a, v in sizes.items()}


def _device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices arranged as `shape`, with the last axes on the best-connected devices."""
  if devices[0].platform == "tpu":
    try:
      # Physical-topology order on TPU: `tensor` (last) lands on the fastest ICI links.
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError) as e:  # e.g. multi-slice.
      _log.warning("topology-aware mesh failed (%s); using device order", e)
  # jax.devices() lists each process's devices together, so `data` (outermost) spans the hosts
  # and each host feeds contiguous rows of the batch.
  return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all devices).

  Args:
    mesh_config: see `mesh_shape`; None puts every device on `data` (plain data parallelism).
    devices: the devices to use, in order; default `jax.devices()` (all processes).

  Raises:
    ValueError: the config does not fit the device count (see `mesh_shape`).
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(_device_grid(shape, devices), MESH_AXES)


def split_meshes(mesh_config: Any, count: int,
                 devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
  """`count` meshes of the same config over disjoint, contiguous groups of `devices` (default:
  all), for independent runs side by side (the preparation runs, `prep.parallel`).

  Raises:
    ValueError: `count` does not divide the device count, a group does not fit `mesh_config`, or
      a multi-process job (its processes would have to agree on every collective of every group;
      side-by-side runs are for one host's devices).
  """
  devices = jax.devices() if devices is None else list(devices)
  if count < 1 or len(devices) % count:
    raise ValueError(f"prep.parallel={count} must divide the {len(devices)} devices into equal "
                     "groups")
  if count > 1 and jax.process_count() > 1:
    raise ValueError(f"prep.parallel={count} needs a single-process run (this job has "
                     f"{jax.process_count()} processes); use prep.parallel=1")
  size = len(devices) // count
  try:
    return [make_mesh(mesh_config, devices[k * size:(k + 1) * size]) for k in range(count)]
  except ValueError as e:
    raise ValueError(f"prep.parallel={count} gives groups of {size} devices: {e}") from e


# --------------------------------------------------------------------------------- logical axes


def logical_rules(overrides: Mapping[str, MeshAxes] | None = None) -> dict[str, MeshAxes]:
  """`DEFAULT_RULES` updated with `overrides` (e.g. `{"vocab": None}` to replicate the vocab)."""
  rules = dict(DEFAULT_RULES)
  if overrides:
    for name, axes in dict(overrides).items():
      rules[name] = tuple(axes) if isinstance(axes, list) else axes
  return rules


def _as_axes(value: MeshAxes) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: LogicalRules | None = None) -> P:
  """PartitionSpec of an array whose dimensions have the given logical names.

  Args:
    logical_axes: one logical name (a key of `rules`) or None (replicated) per dimension.
    shape: the array's shape; with `mesh`, a dimension is only sharded over axes whose size
      product divides it (longest dividing prefix of the rule's axes, else replicated).
    mesh: drops mesh axes it does not have and enables the divisibility rule with `shape`.
    rules: logical name -> mesh axes; default `DEFAULT_RULES`.

  Raises:
    ValueError: a logical name that `rules` does not know, or `shape` of another rank.
  """
  rules = DEFAULT_RULES if rules is None else rules
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
    axes = [a for a in _as_axes(rules[name]) if a not in used]
    if mesh is not None:
      axes = [a for a in axes if a in mesh.shape]
      if shape is not None:
        # Longest prefix whose size product divides the dimension.
        while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
          axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:  # P("x", None) == P("x") semantically; keep specs canonical.
    spec.pop()
  return P(*spec)


def _path_names(path: Any) -> list[str | int]:
  """Path as names/indices, from a tuple of str/int, jax key entries, or a dotted string."""
  if isinstance(path, str):
    return [int(p) if p.isdigit() else p for p in path.split(".") if p]
  out: list[str | int] = []
  for entry in path:
    for attr in ("key", "name", "idx"):  # DictKey / GetAttrKey / SequenceKey.
      if hasattr(entry, attr):
        entry = getattr(entry, attr)
        break
    out.append(entry)
  return out


# Kernel [in, out] logical axes by module name (names as in visatb_jax/model, i.e. HF names).
# A Linear's bias takes the logical axis of the kernel's output dimension.
_KERNEL_AXES: dict[str, LogicalAxes] = {
    # Llama decoder (and the CLIP tower, which shares q/k/v_proj names).
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    # CLIP tower (fc1 / fc2 also the Qwen2-VL vision blocks' MLP).
    "out_proj": ("heads", "embed"),
    "fc1": ("embed", "mlp"),
    "fc2": ("mlp", "embed"),
    # The conv kernel is [patch, patch, channels, embed]; only the model dimension is large.
    "patch_embedding": (None, None, None, "embed"),
    # Projector: a 2-layer MLP, split column- then row-parallel like the decoder MLP.
    "linear_1": ("embed", "mlp"),
    "linear_2": ("mlp", "embed"),
}
# Kernel axes by (parent module, module), for names that mean different layers in different
# places; they win over `_KERNEL_AXES`. All from the Qwen2-VL vision tower, where `proj` is both
# the patch embedding and the attention output.
_SCOPED_KERNEL_AXES: dict[tuple[str, str], LogicalAxes] = {
    # Fused [embed, 3 * embed]: its output is q, k and v one after the other, so sharding it
    # would cut across those thirds instead of over heads; only the model dimension is sharded.
    ("attn", "qkv"): ("embed", None),
    ("attn", "proj"): ("heads", "embed"),
    # Flattened patches [C * T * p * p, embed] (transformers' Conv3d, kernel = stride).
    ("patch_embed", "proj"): (None, "embed"),
}
# Kernel axes of Linears that sit at an index of an HF `nn.Sequential` (container, index): the
# Qwen2-VL patch merger's mlp.0 / mlp.2 (index 1 is its GELU), a column- then row-parallel pair
# like the projector.
_INDEXED_KERNEL_AXES: dict[tuple[str, int], LogicalAxes] = {
    ("mlp", 0): ("embed", "mlp"),
    ("mlp", 2): ("mlp", "embed"),
}
_EMBEDDING_AXES: dict[str, LogicalAxes] = {
    "embed_tokens": ("vocab", "embed"),
    "position_embedding": (None, "embed"),
}
# LayerNorm / RMSNorm modules: Llama's `*_layernorm` and `norm`, CLIP's `pre_layrnorm` and
# `layer_norm1`, Qwen2-VL's `norm1`, `norm2` and the merger's `ln_q`.
_NORM_MODULE = re.compile(r"(norm\d*|layrnorm|layer_norm\d*|ln_q)$")
_VARIABLE_ATTRS = ("value", "raw_value")  # What a Variable node adds to a jax tree path.


def _kernel_axes(module_path: Sequence[str | int]) -> LogicalAxes | None:
  """[in, out] logical axes of the linear layer at `module_path` (names and indices); None if
  unknown."""
  if not module_path:
    return None
  module = module_path[-1]
  parent = module_path[-2] if len(module_path) > 1 else None
  if isinstance(module, int):
    return _INDEXED_KERNEL_AXES.get((parent, module))
  if (parent, module) in _SCOPED_KERNEL_AXES:
    return _SCOPED_KERNEL_AXES[(parent, module)]
  if module in ("k_proj", "v_proj") and "vision_tower" in module_path:
    return ("embed", "heads")  # CLIP attention has no grouped KV heads.
  return _KERNEL_AXES.get(module)


def _lookup(path: Sequence[str | int]) -> LogicalAxes | None:
  """Logical axes of a parameter from its path (names and indices); None if unknown."""
  names = [n for n in path if isinstance(n, str)]
  if not names:
    return None
  leaf, module = names[-1], names[-2] if len(names) > 1 else ""
  if _NORM_MODULE.search(module) and leaf in ("scale", "bias"):
    return ("norm",)
  if leaf == "class_embedding":
    return ("embed",)
  if leaf == "embedding" and module in _EMBEDDING_AXES:
    return _EMBEDDING_AXES[module]
  if leaf in ("lora_a", "lora_b") and len(path) > 2:
    # A LoRA adapter of a linear layer (`<layer>.lora.lora_a`): A [in, rank] follows the layer's
    # input axis, B [rank, out] its output axis; the rank stays whole.
    layer_axes = _kernel_axes(path[:-2])
    if layer_axes is None:
      return None
    in_axis, out_axis = layer_axes[-2:]
    return (in_axis, None) if leaf == "lora_a" else (None, out_axis)
  if leaf in ("kernel", "bias"):
    axes = _kernel_axes(path[:-1])
    if axes is not None:
      return axes if leaf == "kernel" else axes[-1:]
  return None


def param_logical_axes(path: Any, shape: Sequence[int], *, strict: bool = False) -> LogicalAxes:
  """Logical axis names of one parameter, from its NNX path and shape.

  The match uses the end of the path: the leaf name and its module's name (with the parent
  module's name for names that are ambiguous alone, e.g. `attn.proj` vs `patch_embed.proj`, and
  the index for Linears inside a list, e.g. `merger.mlp.0`), so the same rules cover the params,
  the frozen state, and the optimizer moments of a `TrainState` (whose paths end the same way).
  Leading dimensions beyond the rule's rank (e.g. a stacked-layers axis) are replicated; scalars
  are replicated.

  Args:
    path: a tuple of names/indices (as `nnx.to_flat_state` gives), a jax tree path (key entries,
      a trailing Variable `.value` is ignored), or a dotted string "lm_head.kernel".
    shape: the parameter's shape.
    strict: raise for a parameter that no rule covers instead of replicating it.

  Returns:
    One logical name or None per dimension.

  Raises:
    ValueError: with `strict`, an unknown parameter or a rule of a higher rank than `shape`.
  """
  ndim = len(shape)
  entries = _path_names(path)
  while entries and entries[-1] in _VARIABLE_ATTRS:
    entries.pop()
  if ndim == 0:
    return ()
  axes = _lookup(entries)
  if axes is None or len(axes) > ndim:
    if strict:
      raise ValueError(f"no sharding rule for parameter {'.'.join(map(str, entries))} "
                       f"of shape {tuple(shape)}")
    return (None,) * ndim
  return (None,) * (ndim - len(axes)) + tuple(axes)


def _shape_of(leaf: Any) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def param_shardings(state: Any, mesh: Mesh, rules: LogicalRules | None = None, *,
                    strict: bool = True) -> Any:
  """A pytree of NamedSharding with the structure of `state`, one per array leaf.

  Args:
    state: any pytree of arrays / ShapeDtypeStructs with NNX-style paths: an `nnx.State` of
      params, a `train.TrainState` (optimizer moments follow their parameter; counters and step
      are scalars, hence replicated), or `jax.eval_shape` of one (no memory needed).
    mesh: the device mesh.
    rules: logical name -> mesh axes; default `DEFAULT_RULES`.
    strict: raise for a floating-point leaf (a parameter or its optimizer moment) that no rule
      covers, naming it (see `param_logical_axes`); the default, since a parameter replicated by
      accident costs its full size on every device. Integer leaves (RNG keys, counters) and
      scalars are replicated.

  Returns:
    Usable as `jax.jit` in/out shardings or as the target of `jax.device_put(state, ...)`.
  """
  rules = DEFAULT_RULES if rules is None else rules

  def one(path, leaf):
    shape = _shape_of(leaf)
    dtype = getattr(leaf, "dtype", None)
    is_float = dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
    axes = param_logical_axes(path, shape, strict=strict and is_float)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, λ, learning rate)."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def batch_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> NamedSharding:
  """Leading (row) axis over the `batch` rule's mesh axes: P(("data", "fsdp")) by default."""
  return NamedSharding(mesh, logical_to_spec(("batch",), None, mesh, rules))


def batch_shards(mesh: Mesh, rules: LogicalRules | None = None) -> int:
  """Number of pieces the batch's row axis is split into (rows must be a multiple of it)."""
  rules = DEFAULT_RULES if rules is None else rules
  return math.prod(mesh.shape[a] for a in _as_axes(rules["batch"]) if a in mesh.shape)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                rules: LogicalRules | None = None) -> dict[str, jax.Array]:
  """Host arrays [rows, ...] -> global jax arrays with rows on `batch_sharding(mesh)`.

  Single process: `batch` is the global batch. Multi-process: each process passes its own
  consecutive rows (process p: rows p*n .. (p+1)*n-1 of the global batch), which together form
  the global batch of `process_count * n` rows.

  Raises:
    ValueError: the global row count is not a multiple of `batch_shards(mesh)`.
  """
  sharding = batch_sharding(mesh, rules)
  shards = batch_shards(mesh, rules)
  rows = {int(np.shape(v)[0]) for v in batch.values()}
  if len(rows) != 1:
    raise ValueError(f"batch arrays disagree on the row count: {sorted(rows)}")
  global_rows = rows.pop() * jax.process_count()
  if global_rows % shards:
    raise ValueError(f"global batch of {global_rows} rows is not divisible by the {shards} batch "
                     f"shards of the mesh {dict(mesh.shape)}")
  if jax.process_count() > 1:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
  return jax.device_put(dict(batch), sharding)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None],
                            mesh: Mesh | None = None,
                            rules: LogicalRules | None = None) -> jax.Array:
  """`jax.lax.with_sharding_constraint` by logical names (inside jit), e.g. ("batch", "length",
  "embed") for hidden states.

  Without `mesh`, uses the mesh set by `jax.set_mesh(...)`; with neither, returns `x` unchanged,
  so model code can call it unconditionally and still run unsharded.
  """
  if mesh is None:
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
      return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(logical_axes, x.shape, abstract, rules))
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))


def under_mesh(fn: Any, mesh: Mesh) -> Any:
  """`fn` traced with `mesh` as the abstract mesh, so the model's `with_logical_constraint`
  calls pin its activations (they are no-ops without one). Wrap a step before `jax.jit`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


# ---------------------------------------------------------------------------- multi-host init

_INITIALIZED = False


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
  """Arguments for `jax.distributed.initialize`; None fields are left to JAX's auto-detection."""

  source: str  # "explicit", "slurm" or "auto" (JAX detects: Cloud TPU metadata, GKE, ...).
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def kwargs(self) -> dict[str, Any]:
    if self.source == "auto":
      return {}
    return {
        "coordinator_address": self.coordinator_address,
        "num_processes": self.num_processes,
        "process_id": self.process_id,
        "local_device_ids": None if self.local_device_ids is None else list(self.local_device_ids),
        # Every argument is known: JAX's own SLURM detection would otherwise pin one GPU per
        # process even for one process per host.
        "cluster_detection_method": "deactivate",
    }


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _device_ids(value: str) -> tuple[int, ...] | None:
  """"0,1" -> (0, 1); "" or "all" -> None (every visible device)."""
  value = value.strip()
  if not value or value == "all":
    return None
  try:
    return tuple(int(v) for v in value.split(","))
  except ValueError:
    raise ValueError(f"VISATB_LOCAL_DEVICE_IDS={value!r}: expected 'all' or ids like '0,1'") from None


def first_slurm_host(node_list: str) -> str:
  """First host of a SLURM node list: "gpu[003-004,9],cpu1" -> "gpu003"."""
  match = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", node_list.strip())
  if not match:
    raise ValueError(f"cannot parse SLURM node list {node_list!r}")
  return match.group(1) + (match.group(2) or "")


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
  """Tasks on each node: SLURM_NTASKS_PER_NODE, else the first count of "4(x2),3"-style lists."""
  explicit = _env_int(env, "SLURM_NTASKS_PER_NODE")
  if explicit is not None:
    return explicit
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    match = re.match(r"\s*(\d+)", env.get(name, ""))
    if match:
      return int(match.group(1))
  return None


def distributed_args(env: Mapping[str, str] | None = None) -> DistributedArgs | None:
  """How to initialise JAX's distributed runtime here; None for a single process.

  Read in this order (the first that applies wins):

  1. `VISATB_DISTRIBUTED=0`: never initialise (None).
  2. Explicit: `VISATB_NUM_PROCESSES` set. 1 -> None. Otherwise `VISATB_COORDINATOR` ("host:port"
     of process 0) and `VISATB_PROCESS_ID` (0-based) are required; `VISATB_LOCAL_DEVICE_IDS`
     ("0" or "0,1"; unset/"all" = every visible device) restricts this process's devices.
  3. SLURM: `SLURM_NTASKS` (or `SLURM_NPROCS`) > 1 with `SLURM_PROCID`. num_processes =
     SLURM_NTASKS, process_id = SLURM_PROCID; coordinator = `VISATB_COORDINATOR`, else the first
     host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST with port `VISATB_COORDINATOR_PORT` (else
     `JAX_COORDINATOR_PORT`, else JAX's own choice from the job id, 61440 + SLURM_JOB_ID % 4096).
     Local devices: `VISATB_LOCAL_DEVICE_IDS` if set; else [SLURM_LOCALID] when a node runs more
     than one task (one process per GPU); else all visible devices (one process per host).
  4. Cloud TPU / auto: `VISATB_DISTRIBUTED=1`, or `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`
     listing more than one host, or `MEGASCALE_NUM_SLICES` > 1: `jax.distributed.initialize()`
     without arguments, and JAX reads the rest (the TPU VM metadata server on a pod slice, the
     GKE variables, ...). `launch/tpu.sh` sets VISATB_DISTRIBUTED=1 on every worker.
  5. Otherwise: a single process (None).

  Args:
    env: the environment; default `os.environ`.

  Raises:
    ValueError: incomplete or malformed explicit variables (the message names them).
  """
  env = os.environ if env is None else env
  flag = env.get("VISATB_DISTRIBUTED", "").strip().lower()
  if flag in ("0", "false", "no", "off"):
    return None

  num = _env_int(env, "VISATB_NUM_PROCESSES")
  if num is not None:
    if num <= 1:
      return None
    missing = [n for n in ("VISATB_COORDINATOR", "VISATB_PROCESS_ID") if not env.get(n, "").strip()]
    if missing:
      raise ValueError(f"VISATB_NUM_PROCESSES={num} needs {' and '.join(missing)} as well")
    pid = _env_int(env, "VISATB_PROCESS_ID")
    if not 0 <= pid < num:
      raise ValueError(f"VISATB_PROCESS_ID={pid} outside [0, {num})")
    return DistributedArgs("explicit", env["VISATB_COORDINATOR"].strip(), num, pid,
                           _device_ids(env.get("VISATB_LOCAL_DEVICE_IDS", "")))

  tasks = _env_int(env, "SLURM_NTASKS")
  tasks = _env_int(env, "SLURM_NPROCS") if tasks is None else tasks
  if tasks is not None and tasks > 1 and env.get("SLURM_PROCID", "").strip():
    coordinator = env.get("VISATB_COORDINATOR", "").strip()
    if not coordinator:
      node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
      if not node_list:
        raise ValueError("SLURM job without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: set "
                         "VISATB_COORDINATOR=host:port")
      port = env.get("VISATB_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
      if not port:
        port = str(61440 + (_env_int(env, "SLURM_JOB_ID") or 0) % 4096)  # As JAX's SlurmCluster.
      coordinator = f"{first_slurm_host(node_list)}:{port}"
    if "VISATB_LOCAL_DEVICE_IDS" in env:
      local = _device_ids(env["VISATB_LOCAL_DEVICE_IDS"])
    elif (_slurm_tasks_per_node(env) or 1) > 1 and env.get("SLURM_LOCALID", "").strip():
      local = (_env_int(env, "SLURM_LOCALID"),)
    else:
      local = None
    return DistributedArgs("slurm", coordinator, tasks, _env_int(env, "SLURM_PROCID"), local)

  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  slices = _env_int(env, "MEGASCALE_NUM_SLICES") or 1
  if flag in ("1", "true", "yes", "on", "auto") or len(hosts.split(",")) > 1 or slices > 1:
    return DistributedArgs("auto")
  return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Starts JAX's multi-process runtime when this is one process of several; idempotent.

  Call it first, before anything touches a device (`jax.devices()`, any computation): JAX refuses
  to initialise afterwards. The environment decides (see `distributed_args`); with none of the
  variables set this is a no-op, so the same entry point runs on a laptop.

  Args:
    env: the environment; default `os.environ`.

  Returns:
    True when the distributed runtime is running (started now or before), False for a single
    process.
  """
  global _INITIALIZED
  if _INITIALIZED or jax.distributed.is_initialized():
    _INITIALIZED = True
    return True
  args = distributed_args(env)
  if args is None:
    return False
  _log.info("jax.distributed.initialize (%s): %s", args.source, args.kwargs())
  jax.distributed.initialize(**args.kwargs())
  _INITIALIZED = True
  return True
