"""B3b: the LM head's gradient in the chunked cross-entropy's backward pass, before and after the
custom VJP (issue 31): compiled memory and the float32 buffers of the head's shape.

  python benchmarks/b3_head_grad_memory.py [--hidden 512] [--vocab 32000] [--rows 4]
      [--length 512] [--chunk 256] [--layers 2] [--fsdp 8] [--before-rev c707508]
      [--out benchmarks/results/b3_head_grad_memory.json]

Compiled, never run, on 8 simulated CPU devices (mesh fsdp=8 unless --fsdp says less; the rest on
`data`): loss + gradient of the VITW weighted sum, `loss.chunked_token_loss` on the hidden states
of `--layers` residual tanh layers (a stand-in for the decoder, whose backward pass follows the
loss's), `--rows` × `--length` tokens per device, the head kernel [hidden, vocab] float32 and
FSDP-sharded as the LM head's rules shard it. "before" is `core/loss.py` at `--before-rev`
(autodiff through a rematerialised scan, read with `git show`); "after" is the working tree's.

Printed for each: XLA's `compiled.memory_analysis()` (temp = the buffers the step allocates for
itself), the optimised HLO's float32 arrays of the head's full shape — how many instructions
make one, how many of those are loop carries (a while loop's state: live for the whole loop) —
and the collectives that move the head's gradient (kind, per-device result, runs per call).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from visatb_jax.core import loss as loss_after  # noqa: E402
from visatb_jax.runtime import cost  # noqa: E402
from visatb_jax.runtime import sharding  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = 5
MIB = 2.0 ** 20


def _module_at(rev: str):
  """core/loss.py at git revision `rev`, imported as a module of its own."""
  text = subprocess.run(["git", "show", f"{rev}:visatb_jax/core/loss.py"], cwd=REPO, check=True,
                        capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"loss_{rev}.py")
  with open(path, "w") as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location(f"loss_{rev}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _step(loss_module, chunk: int):
  """(params, batch) -> (weighted sum, grads): the head closes over the differentiated kernel."""
  def weighted(params, batch):
    kernel, layers, x = params
    h = x
    for w in layers:  # the "decoder": its backward pass runs after the loss's
      h = h + jnp.tanh(h @ w)
    head = lambda y: jnp.dot(y, kernel, preferred_element_type=jnp.float32)
    return loss_module.chunked_token_loss(h, head, *batch, chunk_size=chunk)[0]
  return jax.value_and_grad(weighted)


def _compile(loss_module, args, mesh):
  d, v, rows, length = args.hidden, args.vocab, args.rows * 8, args.length
  spec = lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))
  sds = jax.ShapeDtypeStruct
  params = (sds((d, v), jnp.float32, sharding=spec(("embed", "vocab"), (d, v))),
            [sds((d, d), jnp.float32, sharding=spec(("embed", "mlp"), (d, d)))
             for _ in range(args.layers)],
            sds((rows, length, d), jnp.float32,
                sharding=spec(("batch", "length", "embed"), (rows, length, d))))
  row = spec(("batch", "length"), (rows, length))
  batch = (sds((rows, length), jnp.int32, sharding=row),
           sds((rows, length), jnp.float32, sharding=row),
           sds((rows, length), jnp.int32, sharding=row),
           sds((TASKS,), jnp.float32, sharding=NamedSharding(mesh, P())))
  param_sh = jax.tree.map(lambda s: s.sharding, params)
  step = jax.jit(sharding.under_mesh(_step(loss_module, args.chunk), mesh),
                 out_shardings=(NamedSharding(mesh, P()), param_sh))
  return step.lower(params, batch).compile()


def _head_buffers(text: str, d: int, v: int) -> dict[str, object]:
  """Float32 arrays of the head's shape ([d, v] or [v, d]) in the optimised HLO: how many
  instructions make one in the entry computation and in the loop bodies (live for one block),
  and how many each while loop carries (live for the whole loop; the gathered head is one)."""
  module = cost.parse_hlo(text)
  shapes = {(d, v), (v, d)}
  out = {"made_in_entry": 0, "made_elsewhere": 0, "while_carries": []}
  for comp, insts in module.computations.items():
    for inst in insts:
      if inst.opcode in ("parameter", "get-tuple-element", "tuple", "bitcast"):
        continue
      n = sum(1 for dtype, dims in cost.array_shapes(inst.shape)
              if dtype == "f32" and tuple(dims) in shapes)
      if inst.opcode == "while":
        out["while_carries"].append(n)
      elif comp == module.entry:
        out["made_in_entry"] += n
      else:
        out["made_elsewhere"] += n
  out["while_carries"].sort()
  return out


def _head_collectives(text: str, d: int, v: int) -> list[dict[str, object]]:
  module = cost.parse_hlo(text)
  counts = cost.execution_counts(module)
  out = []
  for c in cost.collectives(module, counts):
    dims = [tuple(x) for _, x in cost.array_shapes(c.shape)]
    if any(v in x for x in dims) and any(len(x) == 2 for x in dims):
      out.append({"kind": c.kind, "shape": c.shape, "runs": c.runs,
                  "result_mib": cost.shape_bytes(c.shape) / MIB, "wire_mib": c.wire_bytes / MIB})
  return out


def measure(name: str, loss_module, args, mesh) -> dict[str, object]:
  compiled = _compile(loss_module, args, mesh)
  m = compiled.memory_analysis()
  text = compiled.as_text()
  r = {"name": name, "temp_mib": m.temp_size_in_bytes / MIB,
       "argument_mib": m.argument_size_in_bytes / MIB, "output_mib": m.output_size_in_bytes / MIB,
       "head_f32_buffers": _head_buffers(text, args.hidden, args.vocab),
       "head_collectives": _head_collectives(text, args.hidden, args.vocab)}
  hb = r["head_f32_buffers"]
  print(f"{name:>6}: temp {r['temp_mib']:.2f} MiB (arguments {r['argument_mib']:.2f}, outputs "
        f"{r['output_mib']:.2f}); f32[{args.hidden},{args.vocab}]: made {hb['made_in_entry']} "
        f"time(s) in the entry computation, {hb['made_elsewhere']} in loop bodies and fusions; "
        f"carried by the while loops {hb['while_carries']}")
  for c in r["head_collectives"]:
    print(f"        {c['kind']} {re.sub(r'[{][^}]*[}]', '', c['shape'])} x {c['runs']:g} per "
          f"call: result {c['result_mib']:.2f} MiB, wire {c['wire_mib']:.2f} MiB per device")
  return r


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--rows", type=int, default=4, help="rows per device")
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--chunk", type=int, default=256, help="ce_chunk_size: tokens per block "
                      "and device")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--before-rev", default="c707508",
                      help="git revision of core/loss.py before the custom VJP")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "b3_head_grad_memory.json"))
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh({"data": 8 // args.fsdp, "fsdp": args.fsdp}, jax.devices()[:8])
  head_mib = args.hidden * args.vocab * 4 / MIB
  print(f"B3b: head f32[{args.hidden},{args.vocab}] = {head_mib:.2f} MiB, {args.rows} x "
        f"{args.length} tokens per device, chunk {args.chunk}, mesh {dict(mesh.shape)}, "
        f"{args.layers} layers before the loss")
  results = {"device": jax.devices()[0].device_kind, "args": vars(args), "head_mib": head_mib,
             "runs": [measure("before", _module_at(args.before_rev), args, mesh),
                      measure("after", loss_after, args, mesh)]}
  common.write_json(args.out, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
