"""What a compiled step costs, read from its optimized HLO: FLOPs, collective and HBM bytes, the
buffers live at the memory peak; the model's own FLOPs and activation estimate; a roofline.

Pure functions on text and numbers (no jax import), so every figure can be checked on a few lines
of hand-made HLO. `cli/dryrun.py` feeds them the compiled train step (`compiled.as_text()`, the
post-SPMD-partitioning module of ONE device) and XLA's live-range dump.

Why not XLA's `cost_analysis()`: it counts the body of a `while` loop once, and the train step
runs its decoder layers and its accumulation micro-batches as `lax.scan`s, so it undercounts by
about layers x micro-batches. Here every computation is weighted by how often it runs per step:
a while body by its `known_trip_count` (XLA's backend_config), a fusion or a call by its caller.

Conventions (per device, per step):
  * FLOPs: matmuls and convolutions only (2 per multiply-add); elementwise work is left out, as
    in the model FLOPs it is compared with.
  * Collective bytes: `buffer` is the full array a collective assembles or reduces (an
    all-gather's result, a reduce-scatter's operand); `wire` is what one device sends over its
    links with ring algorithms: (n-1)/n x buffer for all-gather, reduce-scatter and all-to-all,
    2 (n-1)/n x buffer for all-reduce (a reduce-scatter then an all-gather), the buffer for a
    collective-permute; n is the size of the replica group. An async start/done pair counts once.
  * HBM bytes: every non-fused op reads its operands and writes its result once (a fusion is one
    op); a dynamic slice reads only the slice and a dynamic-update-slice writes only the update.
    A planning proxy: a TPU or GPU compiler fuses differently from the CPU one measured here.
  * XLA:CPU artifacts, marked per collective so a reader can undo them: XLA:CPU computes bf16
    ops in f32, so data the program moves in bf16 travels as f32 (`widened`); and it keeps an
    all-reduce whose users each keep 1/n of it, which TPU and GPU compile to a reduce-scatter
    (`scatter_share`). The same widening inflates buffers and HBM bytes: `is_widened` finds the
    f32 buffers that hold bf16 values of the program (with the module before optimizations),
    so that the memory at the peak and the HBM bytes can be estimated as on TPU and GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# Bits per element of HLO primitive types.
DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8,
    "f8e4m3b11fnuz": 8, "f8e4m3": 8, "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4, "token": 0,
}

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute", "ragged-all-to-all", "collective-broadcast")

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")


# ------------------------------------------------------------------------------------ shapes


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in an HLO shape, e.g. "(f32[2,3]{1,0}, s32[])"."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in DTYPE_BITS:
      continue
    out.append((dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())))
  return out


def shape_bytes(shape: str) -> int:
  """Bytes of all arrays in an HLO shape (a tuple's elements summed)."""
  return sum(math.prod(dims) * DTYPE_BITS[dtype] // 8 for dtype, dims in array_shapes(shape))


def tuple_elements(shape: str) -> list[str]:
  """The top-level element shapes of a tuple shape; [shape] for an array."""
  shape = re.sub(r"/\*[^*]*\*/", "", shape).strip()
  if not shape.startswith("("):
    return [shape]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
      element = shape[start:i].strip()
      if element:
        out.append(element)
      start = i + 1
  return out


def describe_shape(shape: str, max_arrays: int = 4) -> str:
  """"bf16[4,2048,4096]" (layout dropped); a tuple as "(a, b)", or "(9 arrays, 772.0 MiB)"
  beyond `max_arrays` elements."""
  arrays = [f"{d}[{','.join(map(str, dims))}]" for d, dims in array_shapes(shape)]
  if len(arrays) == 1 and not shape.lstrip().startswith("("):
    return arrays[0]
  if len(arrays) > max_arrays:
    return f"({len(arrays)} arrays, {shape_bytes(shape) / 2**20:.1f} MiB)"
  return "(" + ", ".join(arrays) + ")"


# ------------------------------------------------------------------------------------ parsing


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: `name = shape opcode(operands), attrs`."""
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str
  computation: str
  is_root: bool = False

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""

  @property
  def stack_frame_id(self) -> int | None:
    m = re.search(r"stack_frame_id=(\d+)", self.attrs)
    return int(m.group(1)) if m else None

  @property
  def source_line(self) -> tuple[str, int] | None:
    """(file, line) of older HLO metadata (`source_file=`, `source_line=`), if present."""
    f, line = re.search(r'source_file="([^"]*)"', self.attrs), re.search(
        r"source_line=(\d+)", self.attrs)
    return (f.group(1), int(line.group(1))) if f and line else None


@dataclasses.dataclass(frozen=True)
class Frame:
  file: str
  line: int
  function: str
  parent: int | None


@dataclasses.dataclass
class HloModule:
  """A parsed HLO module: computations in text order, instructions by name, source frames."""
  computations: dict[str, list[Instruction]]
  entry: str
  frames: dict[int, Frame]
  num_partitions: int = 1

  def __post_init__(self):
    self.by_name = {i.name: i for insts in self.computations.values() for i in insts}
    self._users: dict[str, dict[str, list[tuple[Instruction, int]]]] = {}
    self._sites: dict[str, list[tuple[Instruction, str]]] | None = None

  def users(self, computation: str) -> dict[str, list[tuple[Instruction, int]]]:
    """name -> [(user, operand index)] within one computation (cached)."""
    if computation not in self._users:
      self._users[computation] = _users(self.computations.get(computation, []))
    return self._users[computation]

  def shape(self, name: str) -> str | None:
    inst = self.by_name.get(name)
    return None if inst is None else inst.shape

  def root(self, computation: str) -> Instruction | None:
    insts = self.computations.get(computation, [])
    return next((i for i in insts if i.is_root), insts[-1] if insts else None)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str, computation: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  is_root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    end = len(rest) if end < 0 else end
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  inner = rest[op.end():close - 1]
  operands = tuple(tok.split()[-1].lstrip("%") for tok in _split_top(inner) if tok.strip())
  return Instruction(name=name, shape=shape, opcode=op.group(1), operands=operands,
                     attrs=rest[close:], computation=computation, is_root=is_root)


def _split_top(text: str) -> list[str]:
  """Splits on commas outside brackets (and drops /*index=N*/ comments)."""
  text = re.sub(r"/\*[^*]*\*/", "", text)
  out, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(text[start:i])
      start = i + 1
  out.append(text[start:])
  return out


def parse_stack_frames(text: str) -> dict[int, Frame]:
  """The FileNames / FunctionNames / FileLocations / StackFrames tables of an HLO module's text.

  XLA prints a frame's parent as its 1-based id + 1 (so 1 means "no parent"), hence the - 1.
  """
  sections: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(line, [])
    elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
      current = None
    elif current is not None:
      current.append(line)
  files = {int(k): v for k, v in (re.match(r'(\d+) "(.*)"$', s).groups()
                                  for s in sections.get("FileNames", []))}
  functions = {int(k): v for k, v in (re.match(r'(\d+) "(.*)"$', s).groups()
                                      for s in sections.get("FunctionNames", []))}
  locations = {}
  for s in sections.get("FileLocations", []):
    i, body = s.split(" ", 1)
    fields = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", body))
    locations[int(i)] = (files.get(fields.get("file_name_id"), "?"),
                         fields.get("line", 0), functions.get(fields.get("function_name_id"), "?"))
  frames = {}
  for s in sections.get("StackFrames", []):
    i, body = s.split(" ", 1)
    fields = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", body))
    file, line, function = locations.get(fields.get("file_location_id"), ("?", 0, "?"))
    parent = fields.get("parent_frame_id", 1) - 1
    frames[int(i)] = Frame(file, line, function, parent if 0 < parent < int(i) else None)
  return frames


def parse_hlo(text: str) -> HloModule:
  """Parses the text of an HLO module (`compiled.as_text()`)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line:
      continue
    if not line[0].isspace():
      if line == "}":
        current = None
        continue
      header = _HEADER.match(line)
      if header and line.rstrip().endswith("{") and not line.startswith("HloModule"):
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if current is not None:
      inst = _parse_instruction(line, current)
      if inst is not None:
        computations[current].append(inst)
  partitions = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
  return HloModule(computations=computations, entry=entry, frames=parse_stack_frames(text),
                   num_partitions=int(partitions.group(1)) if partitions else 1)


# ----------------------------------------------------------------------- how often each runs


_CALLS = re.compile(r"\b(condition|body|calls|to_apply|branch_computations|true_computation|"
                    r"false_computation|called_computations|select|scatter)=(\{[^}]*\}|%?[\w.\-]+)")


def trip_count(inst: Instruction) -> int | None:
  """A while loop's trip count from XLA's backend_config, None when XLA did not find it."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
  return int(m.group(1)) if m else None


def call_sites(module: HloModule) -> dict[str, list[tuple[Instruction, str]]]:
  """callee -> [(calling instruction, attribute: body, calls, to_apply, ...)]."""
  sites: dict[str, list[tuple[Instruction, str]]] = {}
  for insts in module.computations.values():
    for inst in insts:
      if inst.opcode in ("async-update", "async-done"):
        continue  # the same computation as its async-start: count it once
      for attr, value in _CALLS.findall(inst.attrs):
        for callee in re.findall(r"%?([\w.\-]+)", value):
          if callee in module.computations:
            sites.setdefault(callee, []).append((inst, attr))
  return sites


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many times each computation runs per step, and which run inside a fusion."""
  runs: dict[str, float]
  fused: frozenset[str]  # fusion bodies and reducers: their ops touch no HBM of their own
  unknown_trip_counts: tuple[str, ...]  # while loops counted once for want of a trip count


def execution_counts(module: HloModule) -> Counts:
  """Runs per step of every computation: the entry once, a while body trip-count times per run
  of the loop, anything else as often as its callers (summed over call sites)."""
  sites = call_sites(module)
  runs: dict[str, float] = {}
  unknown = set()

  def count(name: str, visiting: frozenset[str] = frozenset()) -> float:
    if name == module.entry:
      return 1.0
    if name in runs:
      return runs[name]
    if name in visiting:
      return 0.0
    total = 0.0
    for inst, attr in sites.get(name, []):
      factor = 1.0
      if inst.opcode == "while" and attr in ("body", "condition"):
        trips = trip_count(inst)
        if trips is None:
          unknown.add(inst.name)
        factor = float(trips if trips is not None else 1) + (attr == "condition")
      total += factor * count(inst.computation, visiting | {name})
    runs[name] = total
    return total

  for name in module.computations:
    runs[name] = count(name)
  fused = frozenset(
      name for name, callers in sites.items()
      if callers and all((i.opcode == "fusion" and a == "calls") or a in ("to_apply", "select",
                                                                           "scatter")
                         for i, a in callers))
  return Counts(runs=runs, fused=fused, unknown_trip_counts=tuple(sorted(unknown)))


# ------------------------------------------------------------------------------------- FLOPs


def _dims_attr(attrs: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([\d,]*)\}", attrs)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def instruction_flops(inst: Instruction, module: HloModule) -> float:
  """2 x multiply-adds of a dot or convolution; 0 for anything else (or an unknown operand)."""
  out = array_shapes(inst.shape)
  if inst.opcode not in ("dot", "convolution") or len(out) != 1 or not inst.operands:
    return 0.0
  out_elems = math.prod(out[0][1])
  if inst.opcode == "dot":
    lhs = array_shapes(module.shape(inst.operands[0]) or "")
    if not lhs:
      return 0.0
    contracted = math.prod(lhs[0][1][d] for d in _dims_attr(inst.attrs, "lhs_contracting_dims"))
    return 2.0 * out_elems * contracted
  kernel = array_shapes(module.shape(inst.operands[1]) or "") if len(inst.operands) > 1 else []
  labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attrs)
  if not kernel or not labels or "o" not in labels.group(1):
    return 0.0
  dims = kernel[0][1]
  out_features = dims[labels.group(1).index("o")]
  # Each output element takes (kernel elements / output features) multiply-adds.
  return 2.0 * out_elems * math.prod(dims) / out_features


def matmul_flops(module: HloModule, counts: Counts) -> float:
  """FLOPs of every dot and convolution, each weighted by how often its computation runs."""
  return sum(matmul_flops_by(module, counts, lambda i: "").values())


def matmul_flops_by(module: HloModule, counts: Counts,
                    key: Callable[[Instruction], str]) -> dict[str, float]:
  """`matmul_flops` split by `key(instruction)`, e.g. the pass of its op_name."""
  out: dict[str, float] = {}
  for c, insts in module.computations.items():
    for i in insts:
      if i.opcode in ("dot", "convolution"):
        flops = counts.runs.get(c, 0.0) * instruction_flops(i, module)
        if flops:
          out[key(i)] = out.get(key(i), 0.0) + flops
  return out


# ------------------------------------------------------------------------------- collectives


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of the module, with its per-step totals."""
  kind: str
  name: str
  shape: str
  group: int
  runs: float             # times per step
  buffer_bytes: float     # per run: the full array gathered / reduced
  wire_bytes: float       # per run: what one device sends (ring algorithms)
  op_name: str
  source: str
  scatter_share: float = 0.0  # of an all-reduce's bytes, the share each device keeps 1/n of
  widened: bool = False  # f32 data that the program had in bf16 (XLA:CPU computes bf16 in f32)


def group_size(attrs: str, num_partitions: int) -> int:
  """Devices per replica group, from any of the three printed forms of `replica_groups`."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len([d for d in m.group(1).split(",") if d.strip()])
  return num_partitions  # replica_groups={}: every device


def collective_bytes(kind: str, result_bytes: float, group: int) -> tuple[float, float]:
  """(buffer, wire) bytes of one collective with this result size over `group` devices."""
  if kind == "collective-permute":
    return result_bytes, result_bytes
  if kind == "collective-broadcast":
    return result_bytes, result_bytes if group > 1 else 0.0
  share = (group - 1) / group if group > 0 else 0.0
  if kind == "reduce-scatter":
    return result_bytes * group, result_bytes * group * share
  if kind == "all-reduce":
    return result_bytes, 2 * result_bytes * share
  return result_bytes, result_bytes * share  # all-gather, all-to-all


def _users(insts: Sequence[Instruction]) -> dict[str, list[tuple[Instruction, int]]]:
  users: dict[str, list[tuple[Instruction, int]]] = {}
  for inst in insts:
    for k, operand in enumerate(inst.operands):
      users.setdefault(operand, []).append((inst, k))
  return users


_PASS_THROUGH = ("bitcast", "reshape", "copy", "convert", "get-tuple-element")


def _elements(name: str, module: HloModule) -> int:
  arrays = array_shapes(module.shape(name) or "")
  return math.prod(arrays[0][1]) if len(arrays) == 1 else 0


def _reaches_root_unchanged(inst: Instruction, module: HloModule, depth: int = 0) -> bool:
  """Whether `inst` flows only through bitcasts, converts and copies into its computation's
  root (an elementwise wrapper fusion), keeping its element count."""
  if inst.is_root:
    return True
  uses = module.users(inst.computation).get(inst.name, [])
  return bool(uses) and depth < 8 and all(
      u.opcode in _PASS_THROUGH and u.opcode != "get-tuple-element"
      and _elements(u.name, module) == _elements(inst.name, module)
      and _reaches_root_unchanged(u, module, depth + 1) for u, _ in uses)


def _only_sliced(name: str, computation: str, module: HloModule, group: int,
                 depth: int = 0) -> bool:
  """Whether every use of `name` keeps a 1/group slice of it (dynamic-slice), looking through
  tuple elements, bitcasts and converts and into fusions. Such an all-reduce is a reduce-scatter
  on TPU and GPU, whose compilers run ReduceScatterCreator; XLA:CPU leaves it an all-reduce."""
  uses = module.users(computation).get(name, [])
  if not uses or depth > 6:
    return False
  for user, k in uses:
    if user.opcode == "dynamic-slice" and k == 0:
      elements = _elements(name, module)
      if not elements or _elements(user.name, module) * group > elements:
        return False
    elif user.opcode in _PASS_THROUGH:
      if not _only_sliced(user.name, computation, module, group, depth + 1):
        return False
    elif user.opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", user.attrs)
      body = module.computations.get(called.group(1), []) if called else []
      param = next((i for i in body if i.opcode == "parameter" and i.operands == (str(k),)), None)
      if param is None:
        return False
      if _reaches_root_unchanged(param, module):  # e.g. a wrapped convert: follow its result
        if not _only_sliced(user.name, computation, module, group, depth + 1):
          return False
      elif not _only_sliced(param.name, param.computation, module, group, depth + 1):
        return False
    else:
      return False
  return True


def _scatter_share(inst: Instruction, module: HloModule, group: int) -> float:
  """Share of an all-reduce's bytes that every use slices to 1/group (see `_only_sliced`); a
  variadic all-reduce is judged element by element (its replicated parameters' gradients, say,
  are used whole)."""
  total = shape_bytes(inst.shape)
  if not total:
    return 0.0
  if not inst.shape.startswith("("):
    return 1.0 if _only_sliced(inst.name, inst.computation, module, group) else 0.0
  uses = module.users(inst.computation).get(inst.name, [])
  if not uses or any(u.opcode != "get-tuple-element" for u, _ in uses):
    return 0.0
  sliced = sum(shape_bytes(u.shape) for u, _ in uses
               if _only_sliced(u.name, inst.computation, module, group))
  return min(1.0, sliced / total)


def _frame_chain(frames: Mapping[int, Frame], frame_id: int | None) -> Iterable[Frame]:
  seen = set()
  while frame_id is not None and frame_id in frames and frame_id not in seen:
    seen.add(frame_id)
    yield frames[frame_id]
    frame_id = frames[frame_id].parent


def _described_by(inst: Instruction, module: HloModule) -> list[Instruction]:
  """Where to look for an instruction's metadata: itself, its fused computation (root first),
  then its operands; XLA drops the metadata of some fusions and copies it creates."""
  out = [inst]
  called = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
  if called:
    out += sorted(module.computations.get(called.group(1), []), key=lambda i: not i.is_root)
  return out + [module.by_name[o] for o in inst.operands if o in module.by_name]


def source_of(inst: Instruction, module: HloModule, project: str = "visatb_jax") -> str:
  """"model/llama.py:143 (_attend)": the innermost frame in `project` (else the innermost one)
  of the instruction's metadata (see `_described_by`), "?" when there is none."""
  for cand in _described_by(inst, module):
    chain = list(_frame_chain(module.frames, cand.stack_frame_id))
    if not chain and cand.source_line:
      chain = [Frame(cand.source_line[0], cand.source_line[1], "?", None)]
    if not chain:
      continue
    frame = next((f for f in chain if f"/{project}/" in f.file), chain[0])
    path = frame.file.split(f"/{project}/", 1)[-1] if f"/{project}/" in frame.file else (
        frame.file.rsplit("/", 1)[-1])
    return f"{path}:{frame.line} ({frame.function})"
  return "?"


def op_name_of(inst: Instruction, module: HloModule) -> str:
  """The op_name of the instruction's metadata (see `_described_by`), "" when there is none."""
  return next((c.op_name for c in _described_by(inst, module) if c.op_name), "")


def _widened_from_bf16(name: str, module: HloModule, depth: int = 0) -> bool:
  """Whether f32 value `name` is a bf16 value converted up: a convert of bf16 data, seen through
  bitcasts, copies and the root of a fusion. XLA:CPU's float normalization computes bf16 ops in
  f32, so a collective the program does in bf16 (weights cast before their all-gather) moves
  f32 there; a TPU or GPU compilation keeps bf16."""
  inst = module.by_name.get(name)
  if inst is None or depth > 8 or not inst.shape.startswith("f32"):
    return False
  if inst.opcode in ("bitcast", "copy", "reshape", "transpose") and inst.operands:
    return _widened_from_bf16(inst.operands[0], module, depth + 1)
  if inst.opcode == "convert" and inst.operands:
    return (module.shape(inst.operands[0]) or "").startswith("bf16")
  if inst.opcode == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
    root = module.root(called.group(1)) if called else None
    return root is not None and _widened_from_bf16(root.name, module, depth + 1)
  return False


def collectives(module: HloModule, counts: Counts) -> list[Collective]:
  """Every collective of the module with its group, runs per step and bytes."""
  out = []
  for comp, insts in module.computations.items():
    runs = counts.runs.get(comp, 0.0)
    for inst in insts:
      kind, attrs_from = inst.opcode, inst
      if kind.endswith("-start"):
        continue  # counted at its -done, whose shape is the result
      if kind.endswith("-done"):
        kind = kind[:-len("-done")]
        attrs_from = module.by_name.get(inst.operands[0], inst) if inst.operands else inst
      if kind not in COLLECTIVE_KINDS:
        continue
      # A permute moves each buffer between a pair of devices, whatever the mesh.
      group = 2 if kind == "collective-permute" else group_size(attrs_from.attrs,
                                                                module.num_partitions)
      buffer, wire = collective_bytes(kind, shape_bytes(inst.shape), group)
      share = _scatter_share(inst, module, group) if kind == "all-reduce" and group > 1 else 0.0
      source_op = attrs_from if attrs_from is not inst else inst
      widened = bool(source_op.operands) and all(
          _widened_from_bf16(o, module) for o in source_op.operands)
      out.append(Collective(
          kind=kind, name=inst.name, shape=inst.shape, group=group, runs=runs,
          buffer_bytes=buffer, wire_bytes=wire, op_name=op_name_of(attrs_from, module),
          source=source_of(attrs_from, module), scatter_share=share, widened=widened))
  return out


def collective_totals(ops: Iterable[Collective]) -> dict[str, dict[str, float]]:
  """kind -> {count (per step), buffer_bytes, wire_bytes} summed over a step."""
  totals: dict[str, dict[str, float]] = {}
  for c in ops:
    t = totals.setdefault(c.kind, {"count": 0.0, "buffer_bytes": 0.0, "wire_bytes": 0.0})
    t["count"] += c.runs
    t["buffer_bytes"] += c.runs * c.buffer_bytes
    t["wire_bytes"] += c.runs * c.wire_bytes
  return totals


def wire_bytes_by_group(ops: Iterable[Collective], *, as_on_accelerators: bool = False
                        ) -> dict[int, float]:
  """Replica-group size -> wire bytes per step (the roofline prices large groups differently).

  With `as_on_accelerators`, the two XLA:CPU artifacts are undone: widened collectives move
  bf16 (half the bytes), the sliced share of an all-reduce moves as a reduce-scatter (half).
  """
  out: dict[int, float] = {}
  for c in ops:
    wire = c.runs * c.wire_bytes
    if as_on_accelerators:
      wire *= (0.5 if c.widened else 1.0) * (1.0 - 0.5 * c.scatter_share)
    out[c.group] = out.get(c.group, 0.0) + wire
  return out


# ------------------------------------------------------------------------------- HBM traffic


_NO_TRAFFIC = frozenset((
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
    "domain", "async-start", "async-update", "async-done", "copy-start", "copy-done"))


def _through_bitcasts(name: str, users: Mapping[str, list[tuple[Instruction, int]]]
                      ) -> list[tuple[Instruction, int]]:
  out = []
  for user, k in users.get(name, []):
    if user.opcode == "bitcast":
      out += _through_bitcasts(user.name, users)
    else:
      out.append((user, k))
  return out


Scale = Callable[[str], float]  # value name -> the share of its bytes that counts


def no_scale(name: str) -> float:
  return 1.0


def _fusion_bytes(inst: Instruction, module: HloModule, scale: Scale = no_scale) -> float:
  """Operands read and result written by one fusion, slicing-aware (see the module doc)."""
  called = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
  body = module.computations.get(called.group(1), []) if called else []
  users = module.users(called.group(1)) if called else {}
  params = {i.operands[0]: i for i in body if i.opcode == "parameter" and i.operands}
  total = 0.0
  for k, operand in enumerate(inst.operands):
    full = shape_bytes(module.shape(operand) or "")
    param = params.get(str(k))
    uses = _through_bitcasts(param.name, users) if param is not None else []
    if uses and all(u.opcode == "dynamic-slice" and j == 0 for u, j in uses):
      total += min(full, sum(shape_bytes(u.shape) for u, _ in uses)) * scale(operand)
    elif uses and all(u.opcode == "dynamic-update-slice" and j == 0 for u, j in uses):
      pass  # updated in place: only the update is written (counted with the result)
    else:
      total += full * scale(operand)
  root = module.root(called.group(1)) if called else None
  return total + _written_bytes(root, inst, module, scale)


def _written_bytes(root: Instruction | None, out: Instruction, module: HloModule,
                   scale: Scale = no_scale) -> float:
  """Bytes a fusion whose fused root is `root` writes into its result `out` (an instruction of
  the fused computation when `out` is an element of a tuple root)."""
  if root is None:
    return shape_bytes(out.shape) * scale(out.name)
  while root.opcode == "bitcast" and root.operands and root.operands[0] in module.by_name:
    root = module.by_name[root.operands[0]]
  if root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
    return shape_bytes(module.shape(root.operands[1]) or "") * scale(out.name)
  if root.opcode == "tuple":
    return sum(_written_bytes(module.by_name.get(o), module.by_name[o], module, scale)
               for o in root.operands if o in module.by_name)
  return shape_bytes(out.shape) * scale(out.name)


def instruction_hbm_bytes(inst: Instruction, module: HloModule, scale: Scale = no_scale) -> float:
  """Bytes one run of a non-fused instruction reads and writes; each value's bytes times
  `scale(its name)` (`widening_scale`: bf16 values that XLA:CPU widened count at 2 bytes)."""
  op = inst.opcode
  if op in _NO_TRAFFIC or op.endswith("-start"):
    return 0.0
  if op == "fusion":
    return _fusion_bytes(inst, module, scale)
  if op == "dynamic-slice":
    return 2.0 * shape_bytes(inst.shape) * scale(inst.name)
  if op == "dynamic-update-slice" and len(inst.operands) > 1:
    return 2.0 * shape_bytes(module.shape(inst.operands[1]) or "") * scale(inst.operands[1])
  if op.endswith("-done"):
    return 2.0 * shape_bytes(inst.shape) * scale(inst.name)
  return shape_bytes(inst.shape) * scale(inst.name) + sum(
      shape_bytes(module.shape(o) or "") * scale(o) for o in inst.operands)


def hbm_bytes(module: HloModule, counts: Counts, scale: Scale = no_scale) -> float:
  """HBM bytes per step: non-fused ops of the computations that run on their own."""
  return sum(hbm_bytes_by(module, counts, lambda i: "", scale).values())


def hbm_bytes_by(module: HloModule, counts: Counts, key: Callable[[Instruction], str],
                 scale: Scale = no_scale) -> dict[str, float]:
  """`hbm_bytes` split by `key(instruction)`, e.g. its source line."""
  out: dict[str, float] = {}
  for c, insts in module.computations.items():
    if c in counts.fused:
      continue
    for i in insts:
      moved = counts.runs.get(c, 0.0) * instruction_hbm_bytes(i, module, scale)
      if moved:
        out[key(i)] = out.get(key(i), 0.0) + moved
  return out


# ----------------------------------------------------------------------- memory at the peak


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
  value: str        # XLA's name of the buffer, e.g. "fusion.12{}" or "while.3{2}"
  bytes: int
  shape: str
  role: str         # "argument", "loop state" or "temporary"
  op_name: str
  source: str
  widened: bool = False  # an f32 buffer of a value the program holds in bf16 (`is_widened`)


def parse_live_range_peak(text: str) -> list[tuple[str, str, int]]:
  """(instruction, shape index, bytes) of every buffer XLA lists as live at its peak, from the
  `*-live-range.txt` file of an `--xla_dump_to` dump ("Live ranges at N (peak):" section)."""
  out, inside = [], False
  for line in text.splitlines():
    if re.match(r"\s*Live ranges at \d+ \(peak\):", line):
      inside = True
      continue
    if inside:
      m = re.match(r"\s+([^\s{]+)(\{[\d,]*\})?: (\d+) bytes", line)
      if not m:
        break
      out.append((m.group(1), m.group(2) or "{}", int(m.group(3))))
  return out


def _subshape(shape: str, index: str) -> str:
  for k in (int(i) for i in index.strip("{}").split(",") if i):
    elements = tuple_elements(shape)
    if k >= len(elements):
      return shape
    shape = elements[k]
  return shape


def peak_buffers(module: HloModule, live: Sequence[tuple[str, str, int]],
                 precisions: Mapping[tuple[str, str], frozenset[str]] | None = None
                 ) -> list[PeakBuffer]:
  """The buffers live at the peak, largest first, with shape, role and where they come from.

  A parameter of the entry computation is a step argument (weights, optimizer state, batch);
  a parameter of a loop body is loop state: it is described by the while loop that carries it.
  With `precisions` (`model_precisions`), each is marked `widened` or not.
  """
  sites = call_sites(module)
  out = []
  for name, index, size in live:
    inst = module.by_name.get(name)
    if inst is None:
      out.append(PeakBuffer(f"{name}{index}", size, "?", "?", "", "?"))
      continue
    shape = describe_shape(_subshape(inst.shape, index))
    if inst.opcode == "parameter" and inst.computation == module.entry:
      # JAX names a step argument by its pytree path in op_name: that is its "source".
      path = inst.op_name.replace("\\'", "'") or "?"
      out.append(PeakBuffer(f"{name}{index}", size, shape, "argument", "", path))
      continue
    role, described = "temporary", inst
    if inst.opcode == "parameter":
      role = "loop state"
      callers = sites.get(inst.computation, [])
      described = callers[0][0] if callers else inst
    out.append(PeakBuffer(
        value=f"{name}{index}", bytes=size, shape=shape, role=role,
        op_name=op_name_of(described, module), source=source_of(described, module),
        widened=precisions is not None and is_widened(module, name, index, precisions)))
  return sorted(out, key=lambda b: -b.bytes)


def short_op_name(op_name: str) -> str:
  """"bwd remat dot_general" from "jit(step)/.../transpose(jvp())/.../rematted_computation/
  dot_general": the pass (fwd, bwd; remat when recomputed) and the primitive."""
  if not op_name:
    return "-"
  tags = ["bwd" if "transpose(" in op_name else "fwd"]
  if "rematted_computation" in op_name:
    tags.append("remat")
  merged = re.search(r"/\(([^()]*:[^()]*)\)$", op_name)
  if merged:  # ops XLA combined: "prefix/(a/dot_general:reduce_sum)"
    names = sorted({part.rsplit("/", 1)[-1] for part in merged.group(1).split(":")})
    return " ".join(tags + ["+".join(names)])
  return " ".join(tags + [op_name.rsplit("/", 1)[-1]])


# -------------------------------------------------------------------- XLA:CPU's f32 widening
#
# XLA:CPU computes bf16 ops in f32 and, allowed excess precision, drops the rounding between
# them, so a value the program holds in bf16 (an activation, a saved matmul output) is an f32
# buffer in the CPU-compiled step, twice its size on a TPU or GPU. The optimized HLO no longer
# says which f32 buffers those are; the module before optimizations does: it still has the
# program's dtypes, and both carry the same metadata (source line, primitive). A buffer is
# "widened" when the op computing it is either a convert of bf16 data that XLA inserted (no
# metadata: the program did not ask for it) or an op whose source line and primitive produce
# only bf16 results before optimization. Anything ambiguous counts as f32: the accelerator
# estimate errs on the large side.

_FLOAT_TYPES = frozenset(("f16", "bf16", "f32", "f64"))
# Ops that copy their values from one operand unchanged (its index): a value they produce has
# that operand's origin.
_MOVES = {"bitcast": 0, "copy": 0, "reshape": 0, "transpose": 0, "broadcast": 0, "slice": 0,
          "dynamic-slice": 0, "pad": 0, "reverse": 0, "concatenate": 0,
          "dynamic-update-slice": 1, "all-gather": 0, "all-to-all": 0,
          "collective-permute": 0, "optimization-barrier": 0}


def _own_source(inst: Instruction, module: HloModule, project: str = "visatb_jax") -> str:
  """`source_of` from the instruction's own metadata only ("" without any)."""
  chain = list(_frame_chain(module.frames, inst.stack_frame_id))
  if not chain and inst.source_line:
    chain = [Frame(inst.source_line[0], inst.source_line[1], "?", None)]
  if not chain:
    return ""
  frame = next((f for f in chain if f"/{project}/" in f.file), chain[0])
  path = frame.file.split(f"/{project}/", 1)[-1] if f"/{project}/" in frame.file else (
      frame.file.rsplit("/", 1)[-1])
  return f"{path}:{frame.line} ({frame.function})"


def _primitive(op_name: str) -> str:
  """"dot_general" from ".../rematted_computation/dot_general" (op names before optimization
  are relative to their computation, after it absolute: the last part is common to both)."""
  return op_name.rsplit("/", 1)[-1]


def _metadata_key(inst: Instruction, module: HloModule) -> tuple[str, str] | None:
  source, name = _own_source(inst, module), inst.op_name
  return (source, _primitive(name)) if source and name else None


def model_precisions(before: HloModule) -> dict[tuple[str, str], frozenset[str]]:
  """(source line, primitive) -> the floating-point dtypes of the results carrying that
  metadata in a module BEFORE optimizations (XLA's `*.before_optimizations.txt` dump), where
  the dtypes are still the program's."""
  out: dict[tuple[str, str], set[str]] = {}
  for inst in before.by_name.values():
    arrays = array_shapes(inst.shape)
    key = _metadata_key(inst, before)
    if key is None or len(arrays) != 1 or arrays[0][0] not in _FLOAT_TYPES:
      continue
    out.setdefault(key, set()).add(arrays[0][0])
  return {k: frozenset(v) for k, v in out.items()}


def _sites(module: HloModule) -> dict[str, list[tuple[Instruction, str]]]:
  if module._sites is None:
    module._sites = call_sites(module)
  return module._sites


def _called(inst: Instruction, attr: str = "calls") -> str | None:
  m = re.search(attr + r"=%?([\w.\-]+)", inst.attrs)
  return m.group(1) if m else None


def value_origin(module: HloModule, name: str, index: tuple[int, ...] = ()
                 ) -> tuple[Instruction | None, Instruction | None]:
  """(the op that computes the value `name{index}`, the fusion around it, if any).

  Looks through data movement (`_MOVES`), tuples, fusions and calls, and through loops: a
  loop's state is what the body's root puts there, or, for state the body passes through
  unchanged, what the loop started with. An entry parameter (a step argument) is its own origin.
  """
  seen: set[tuple[str, tuple[int, ...]]] = set()
  context = None
  inst = module.by_name.get(name)
  while inst is not None and (inst.name, index) not in seen and len(seen) < 256:
    seen.add((inst.name, index))
    op = inst.opcode
    if op == "get-tuple-element" and inst.operands:
      k = re.search(r"index=(\d+)", inst.attrs)
      inst, index = module.by_name.get(inst.operands[0]), (int(k.group(1)) if k else 0,) + index
    elif op == "tuple" and index:
      inst, index = module.by_name.get(inst.operands[index[0]]) if index[0] < len(
          inst.operands) else None, index[1:]
    elif op in ("fusion", "call", "while") and _called(
        inst, "body" if op == "while" else ("to_apply" if op == "call" else "calls")):
      body = _called(inst, "body" if op == "while" else ("to_apply" if op == "call" else "calls"))
      context = inst if op == "fusion" and inst.op_name else context
      inst = module.root(body)
    elif op == "parameter" and inst.computation != module.entry:
      callers = _sites(module).get(inst.computation, [])
      if not callers:
        return inst, context
      caller = callers[0][0]
      if caller.opcode == "while":  # the body's state (or the condition's: the same)
        body = _called(caller, "body") or inst.computation
        root = module.root(body)
        element = module.by_name.get(root.operands[index[0]]) if (
            root is not None and index and index[0] < len(root.operands)) else None
        source = (module.by_name.get(element.operands[0]) if element is not None
                  and element.opcode == "get-tuple-element" and element.operands else None)
        passes_through = (source is not None and source.opcode == "parameter"
                          and source.computation == body
                          and re.search(rf"\bindex={index[0]}\b", element.attrs) is not None)
        if element is not None and not passes_through:
          inst, index = element, index[1:]
        else:  # loop-invariant state: what the loop started with
          inst = module.by_name.get(caller.operands[0]) if caller.operands else None
      else:
        number = int(inst.operands[0]) if inst.operands and inst.operands[0].isdigit() else -1
        inst = module.by_name.get(caller.operands[number]) if 0 <= number < len(
            caller.operands) else None
    elif op.endswith("-done") and inst.operands and not index:
      start = module.by_name.get(inst.operands[0])
      inst = module.by_name.get(start.operands[0]) if start is not None and start.operands else None
    elif op in _MOVES and not index and len(inst.operands) > _MOVES[op]:
      inst = module.by_name.get(inst.operands[_MOVES[op]])
    else:
      return inst, context
  return inst, context


def is_widened(module: HloModule, name: str, index: str,
               precisions: Mapping[tuple[str, str], frozenset[str]]) -> bool:
  """Whether buffer `name{index}` is an f32 value that the program holds in bf16 (see the
  section's comment; `precisions`: `model_precisions` of the module before optimizations)."""
  inst = module.by_name.get(name)
  arrays = array_shapes(_subshape(inst.shape, index)) if inst is not None else []
  if len(arrays) != 1 or arrays[0][0] != "f32":
    return False
  path = tuple(int(i) for i in index.strip("{}").split(",") if i)
  origin, context = value_origin(module, name, path)
  if origin is None or (origin.opcode == "parameter" and origin.computation == module.entry):
    return False  # a step argument: its dtype is the caller's
  if origin.opcode == "convert" and not origin.op_name and origin.operands:
    return (module.shape(origin.operands[0]) or "").startswith("bf16")
  key = _metadata_key(origin, module)
  if key is None and context is not None:
    key = _metadata_key(context, module)
  return key is not None and precisions.get(key) == frozenset(("bf16",))


def widened_bytes(module: HloModule, live: Sequence[tuple[str, str, int]],
                  precisions: Mapping[tuple[str, str], frozenset[str]]) -> float:
  """Bytes of the buffers in `live` (`parse_live_range_peak`) that are widened bf16 values."""
  return float(sum(size for name, index, size in live
                   if is_widened(module, name, index, precisions)))


def widening_scale(module: HloModule, precisions: Mapping[tuple[str, str], frozenset[str]]
                   ) -> Scale:
  """A `Scale` for `hbm_bytes`: 0.5 for a value that `is_widened` (a TPU or GPU moves it in
  bf16, half the bytes), else 1."""
  memo: dict[str, float] = {}

  def scale(name: str) -> float:
    if name not in memo:
      memo[name] = 0.5 if is_widened(module, name, "{}", precisions) else 1.0
    return memo[name]
  return scale


# ---------------------------------------------------------------------------- model figures


def decoder_flops_per_token(*, matmul_params: float, trainable_matmul_params: float, layers: int,
                            seq_len: int, attention_width: int) -> dict[str, float]:
  """Training FLOPs per token of a decoder (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
  App. B): 2 N forward + 2 N activation gradients + 2 N_trainable weight gradients (6 N when
  everything trains), plus attention 12 L S w (QK^T and PV, 2 S w each forward, x3 with the
  backward), counted over the full S x S score matrix, NOT halved for the causal mask.

  Args:
    matmul_params: N, the parameters every token goes through in matmuls (decoder layers, LM
      head, projector; not the input embedding, a gather).
    trainable_matmul_params: those of N that get a weight gradient.
    layers, seq_len: L and S.
    attention_width: w, query heads x head dim.
  """
  dense = 4.0 * matmul_params + 2.0 * trainable_matmul_params
  attention = 12.0 * layers * seq_len * attention_width
  return {"dense": dense, "attention": attention, "total": dense + attention}


def vit_forward_flops(*, layers: int, tokens: int, hidden: int, intermediate: int,
                      patches: int, patch_inputs: int) -> float:
  """Forward FLOPs of one image through a ViT (a frozen tower: no backward): the patch
  embedding, then per layer 2 T (4 d^2 + 2 d f) in matmuls and 4 T^2 d in attention."""
  per_layer = 2.0 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
  per_layer += 4.0 * tokens * tokens * hidden
  return 2.0 * patches * patch_inputs * hidden + layers * per_layer


def causal_block_fraction(seq_len: int, block: int) -> float:
  """Share of the S x S scores that causal query blocks of `block` rows compute: block i of n
  reads keys [0, (i+1) block), so (n + 1) / 2n of the matrix."""
  if block <= 0 or block >= seq_len:
    return 1.0
  n = math.ceil(seq_len / block)
  return (n + 1) / (2 * n)


def full_remat_activation_bytes(*, layers: int, seq_len: int, hidden: int, intermediate: int,
                                heads: int, act_bytes: int, score_bytes: int,
                                score_fraction: float = 1.0) -> dict[str, float]:
  """Activation bytes per row of a decoder trained with every layer rematerialised.

  residuals: the saved layer inputs, L S d bytes. layer: one layer's working set while its
  backward runs, i.e. everything its recomputed forward keeps: 12 hidden-sized tensors (input,
  norm, q, k, v, rotated q and k, attention output, o-proj output, residual, norm, MLP output),
  4 intermediate-sized (gate, up, silu(gate), their product) and the attention scores and
  probabilities, 2 H f S^2 at `score_bytes` (f: `causal_block_fraction`). Parameters,
  gradients, optimizer state and the LM head are not activations and are not included.
  tests/runtime/test_memory_per_row.py holds XLA to it: the growth of a compiled step's
  temporaries per row lies between 1 and 1.5 times this total (1.3-1.4 measured, float32).
  """
  residuals = float(layers * seq_len * hidden * act_bytes)
  layer = seq_len * act_bytes * (12.0 * hidden + 4.0 * intermediate)
  layer += 2.0 * heads * score_fraction * seq_len * seq_len * score_bytes
  return {"residuals": residuals, "layer": layer, "total": residuals + layer}


def fsdp_min_wire_bytes(*, gathered_trainable_bytes: float, gathered_frozen_bytes: float,
                        gradient_bytes: float, fsdp: int, accum_steps: int = 1,
                        gathers_per_pass: int = 2, data: int = 1) -> dict[str, float]:
  """What ZeRO-3 / FSDP must send per device per step, with ring collectives over `fsdp`.

  Per micro-batch: gather the sharded trainable weights `gathers_per_pass` times (2: for the
  forward and again for the backward, which needs them after they were freed; with remat the
  recomputed forward shares the backward's gather), the frozen ones once (forward only), and
  reduce-scatter the gradients once. Per step, with `data` replicas: all-reduce the gradient
  shards across them. Gathers in the compute dtype and gradients in the parameter dtype are the
  callers' choice of `*_bytes`.
  """
  share = (fsdp - 1) / fsdp if fsdp > 1 else 0.0
  gather = accum_steps * (gathers_per_pass * gathered_trainable_bytes + gathered_frozen_bytes)
  gather *= share
  scatter = accum_steps * gradient_bytes * share
  replicas = 2.0 * (data - 1) / data * gradient_bytes / max(fsdp, 1) if data > 1 else 0.0
  return {"all-gather": gather, "reduce-scatter": scatter, "all-reduce": replicas,
          "total": gather + scatter + replicas}


# ---------------------------------------------------------------------------------- roofline


@dataclasses.dataclass(frozen=True)
class Chip:
  """Peak figures of one accelerator chip, as its vendor publishes them.

  hbm_bytes: the memory capacity as the vendor states it, in bytes (GB of 10^9; what a GPU's
  runtime reports is a little more, less its own reserve).
  link_bytes_per_s: what one chip can send at once over its fast interconnect (one direction,
  all links); beyond `scale_up` chips (an NVLink node) a collective is limited by the per-chip
  scale-out network, `scale_out_bytes_per_s`.
  """
  name: str
  bf16_flops_per_s: float
  hbm_bytes_per_s: float
  hbm_bytes: float
  link_bytes_per_s: float
  link: str
  scale_up: int | None = None
  scale_out_bytes_per_s: float | None = None
  source: str = ""

  def link_bandwidth(self, group: int) -> float:
    if self.scale_up is not None and group > self.scale_up and self.scale_out_bytes_per_s:
      return self.scale_out_bytes_per_s
    return self.link_bytes_per_s


# Dense (no 2:4 sparsity) bf16 peaks. Sources:
#   v5p: cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GB/s, ICI 1200 GB/s
#     bidirectional per chip (4800 Gbps) -> 600 GB/s each way over all 6 links of the 3D torus
#     (a collective along one torus axis gets a third of it).
#   H100 SXM5: nvidia.com/en-us/data-center/h100 datasheet: 1979 TFLOPS bf16 with sparsity ->
#     989 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional -> 450 each way within
#     an 8-GPU NVSwitch node; across nodes one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100)
#     -> 50 GB/s.
#   H200 SXM: nvidia.com/en-us/data-center/h200 datasheet: the H100's compute (989 dense),
#     141 GB HBM3e at 4.8 TB/s, same NVLink and per-GPU 400 Gb/s InfiniBand (DGX H200).
CHIPS: dict[str, Chip] = {
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95e9, 600e9, "ICI",
                source="cloud.google.com/tpu/docs/v5p"),
    "h100": Chip("H100 SXM5", 989e12, 3350e9, 80e9, 450e9, "NVLink", scale_up=8,
                 scale_out_bytes_per_s=50e9, source="NVIDIA H100 datasheet"),
    "h200": Chip("H200 SXM", 989e12, 4800e9, 141e9, 450e9, "NVLink", scale_up=8,
                 scale_out_bytes_per_s=50e9, source="NVIDIA H200 datasheet"),
}


def roofline(*, flops: float, hbm_bytes: float, wire_by_group: Mapping[int, float],
             model_flops: float, chip: Chip) -> dict[str, Any]:
  """Planning estimate of one step on `chip` (all figures per device).

  step = max(compute, memory, communication): each at its peak, perfectly overlapped; the
  no-overlap bound is their sum. MFU = model FLOPs / (step x peak FLOP/s).
  """
  compute = flops / chip.bf16_flops_per_s
  memory = hbm_bytes / chip.hbm_bytes_per_s
  comm = sum(b / chip.link_bandwidth(g) for g, b in wire_by_group.items() if b)
  times = {"compute": compute, "memory": memory, "communication": comm}
  step = max(times.values())
  bound = max(times, key=times.get)
  return {"times": times, "step_s": step, "bound": bound, "no_overlap_s": sum(times.values()),
          "mfu": model_flops / (step * chip.bf16_flops_per_s) if step > 0 else 0.0,
          "mfu_no_overlap": (model_flops / (sum(times.values()) * chip.bf16_flops_per_s)
                             if step > 0 else 0.0)}


# ------------------------------------------------------------------------------ fits or not


def memory_verdict(*, measured_bytes: float, accelerator_bytes: float | None,
                   capacity_bytes: float) -> dict[str, Any]:
  """Whether a step's memory per device fits a device of `capacity_bytes`.

  `measured_bytes` (the CPU-compiled step) bounds the accelerator's figure from above: XLA:CPU
  only widens, and an accelerator holds those buffers at half. `accelerator_bytes` (the
  measured figure less half the widened buffers live at the CPU's peak) bounds it from below:
  the accelerator's own peak may fall at another point of the step. Hence three verdicts:
  "fits" (the measured figure fits), "fits on the accelerator estimate only" (likely, not
  certain), "does not fit" (neither does; or the measured figure alone when there is no
  estimate). Margins are capacity minus figure: negative is the shortfall.
  """
  fits_measured = measured_bytes <= capacity_bytes
  fits_estimate = None if accelerator_bytes is None else accelerator_bytes <= capacity_bytes
  if fits_measured:
    verdict = "fits"
  elif fits_estimate:
    verdict = "fits on the accelerator estimate only"
  else:
    verdict = "does not fit"
  return {"verdict": verdict, "capacity_bytes": capacity_bytes,
          "fits_measured": fits_measured, "fits_accelerator": fits_estimate,
          "measured_margin": capacity_bytes - measured_bytes,
          "accelerator_margin": (None if accelerator_bytes is None
                                 else capacity_bytes - accelerator_bytes)}
