"""runtime/cost.py: FLOPs, collectives, HBM bytes and peak buffers from HLO text; model formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.runtime import cost

# A while loop of 4 trips whose body gathers a weight shard (async pair), multiplies with it in a
# fusion, all-reduces a [64, 64] array and keeps 1/8 of it (a reduce-scatter in all but name);
# after the loop a reduce-scatter over 2 devices and a collective-permute. Frames: the dot's
# innermost frame is flax's, its caller the project's.
HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4,8,64]{2,1,0}, f32[2,64]{1,0})->f32[2,64]{1,0}}, num_partitions=8

FileNames
1 "/venv/site-packages/flax/nnx/nn/linear.py"
2 "/repo/visatb_jax/model/llama.py"

FunctionNames
1 "Linear.__call__"
2 "dense"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=82 end_line=82 column=1 end_column=2}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}

%fused_dot (param_0: f32[2,64], param_1: f32[64,64]) -> f32[2,64] {
  %param_0 = f32[2,64]{1,0} parameter(0)
  %param_1 = f32[64,64]{1,0} parameter(1)
  ROOT %dot.1 = f32[2,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/while/body/dot_general" stack_frame_id=2}
}

%fused_slice (param_0.1: f32[4,8,64], param_1.1: s32[]) -> f32[8,64] {
  %param_0.1 = f32[4,8,64]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f32[1,8,64]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %c0, %c0), dynamic_slice_sizes={1,8,64}
  ROOT %bc = f32[8,64]{1,0} bitcast(%ds)
}

%fused_scatter (p0: f32[64,64], p1: s32[]) -> f32[8,64] {
  %p0 = f32[64,64]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c1 = s32[] constant(0)
  ROOT %ds.1 = f32[8,64]{1,0} dynamic-slice(%p0, %p1, %c1), dynamic_slice_sizes={8,64}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (param: (s32[], f32[2,64], f32[4,8,64])) -> (s32[], f32[2,64], f32[4,8,64]) {
  %param = (s32[], f32[2,64]{1,0}, /*index=2*/f32[4,8,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %h = f32[2,64]{1,0} get-tuple-element(%param), index=1
  %w = f32[4,8,64]{2,1,0} get-tuple-element(%param), index=2
  %shard = f32[8,64]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %ag-start = (f32[8,64]{1,0}, f32[64,64]{1,0}) all-gather-start(%shard), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %ag-done = f32[64,64]{1,0} all-gather-done(%ag-start)
  %mm = f32[2,64]{1,0} fusion(%h, %ag-done), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/while/body/dot_general" stack_frame_id=2}
  %ar = f32[64,64]{1,0} all-reduce(%ag-done), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %rs = f32[8,64]{1,0} fusion(%ar, %i), kind=kLoop, calls=%fused_scatter
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[2,64]{1,0}, f32[4,8,64]{2,1,0}) tuple(%next, %mm, %w)
}

%cond (param.1: (s32[], f32[2,64], f32[4,8,64])) -> pred[] {
  %param.1 = (s32[], f32[2,64]{1,0}, f32[4,8,64]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%param.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (w.1: f32[4,8,64], x.1: f32[2,64]) -> f32[2,64] {
  %w.1 = f32[4,8,64]{2,1,0} parameter(0), metadata={op_name="state.params[\\'w\\']"}
  %x.1 = f32[2,64]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,64]{1,0}, f32[4,8,64]{2,1,0}) tuple(%zero, %x.1, %w.1)
  %loop = (s32[], f32[2,64]{1,0}, f32[4,8,64]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %out = f32[2,64]{1,0} get-tuple-element(%loop), index=1
  %rs.2 = f32[1,64]{1,0} reduce-scatter(%out), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, dimensions={0}, to_apply=%add
  %cp = f32[2,64]{1,0} collective-permute(%out), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[2,64]{1,0} add(%out, %cp)
}
"""

LIVE_RANGE = """\
HloLiveRange (max 20):
  BufferLiveRange:
    w.1{}:0-20
  Live ranges at 7 (peak):
    ag-done{}: 16384 bytes (cumulative: 16384 bytes)
    w.1{}: 8192 bytes (cumulative: 24576 bytes)
    param{2}: 8192 bytes (cumulative: 32768 bytes)
    mm{}: 512 bytes (cumulative: 33280 bytes)
  Stack trace breakdown for peak usage: 33 280 bytes
"""


@pytest.fixture(scope="module")
def module():
  return cost.parse_hlo(HLO)


def test_shapes():
  shape = "(s32[], bf16[4,2048]{1,0:T(8,128)(2,1)}, /*index=2*/f32[<=3,5]{1,0})"
  assert cost.array_shapes(shape) == [("s32", ()), ("bf16", (4, 2048)), ("f32", (3, 5))]
  assert cost.shape_bytes(shape) == 4 + 4 * 2048 * 2 + 15 * 4
  assert cost.tuple_elements(shape) == ["s32[]", "bf16[4,2048]{1,0:T(8,128)(2,1)}",
                                        "f32[<=3,5]{1,0}"]
  assert cost.describe_shape("f32[2,3]{1,0}") == "f32[2,3]"
  assert cost.describe_shape("(f32[2], s32[])") == "(f32[2], s32[])"
  assert cost.describe_shape("(f32[1024], f32[1024], f32[1024])", max_arrays=2) == (
      "(3 arrays, 0.0 MiB)")
  assert cost.shape_bytes("pred[8]") == 8 and cost.shape_bytes("s4[8]") == 4


def test_parse_and_execution_counts(module):
  assert module.entry == "main" and module.num_partitions == 8
  assert len(module.computations) == 7
  counts = cost.execution_counts(module)
  assert counts.runs["body"] == 4 and counts.runs["cond"] == 5  # the condition runs once more
  assert counts.runs["fused_dot"] == 4 and counts.runs["fused_scatter"] == 4
  assert counts.runs["add"] == 5  # reducer of the loop's all-reduce (4) and the reduce-scatter
  assert counts.fused == {"fused_dot", "fused_slice", "fused_scatter", "add"}
  assert counts.unknown_trip_counts == ()


def test_loop_without_trip_count_runs_once_and_is_reported():
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
  counts = cost.execution_counts(cost.parse_hlo(text))
  assert counts.runs["body"] == 1 and counts.unknown_trip_counts == ("loop",)


def test_matmul_flops_weight_the_loop_body(module):
  counts = cost.execution_counts(module)
  dot = module.by_name["dot.1"]
  assert cost.instruction_flops(dot, module) == 2 * 2 * 64 * 64
  assert cost.matmul_flops(module, counts) == 4 * 2 * 2 * 64 * 64


def test_convolution_flops():
  text = """\
HloModule m

ENTRY %main (x: f32[2,28,28,3], k: f32[14,14,3,16]) -> f32[2,2,2,16] {
  %x = f32[2,28,28,3]{3,2,1,0} parameter(0)
  %k = f32[14,14,3,16]{3,2,1,0} parameter(1)
  ROOT %conv = f32[2,2,2,16]{3,2,1,0} convolution(%x, %k), window={size=14x14 stride=14x14}, dim_labels=b01f_01io->b01f
}
"""
  m = cost.parse_hlo(text)
  # 2 x 8 output positions x 16 features, each 14*14*3 multiply-adds.
  assert cost.matmul_flops(m, cost.execution_counts(m)) == 2 * (2 * 2 * 2 * 16) * (14 * 14 * 3)


def test_group_sizes_in_every_printed_form():
  assert cost.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, x", 8) == 4
  assert cost.group_size("replica_groups=[2,4]<=[8], dimensions={0}", 8) == 4
  assert cost.group_size("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == 2
  assert cost.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, x", 8) == 2
  assert cost.group_size("replica_groups=mesh['a'=4,'b'=2] {'a', 'b'}, x", 8) == 8
  assert cost.group_size("replica_groups={}, x", 8) == 8


def test_collective_bytes_ring_arithmetic():
  assert cost.collective_bytes("all-gather", 800, 8) == (800, 700)
  assert cost.collective_bytes("reduce-scatter", 100, 8) == (800, 700)
  assert cost.collective_bytes("all-reduce", 800, 8) == (800, 1400)
  assert cost.collective_bytes("all-to-all", 800, 4) == (800, 600)
  assert cost.collective_bytes("collective-permute", 800, 2) == (800, 800)
  assert cost.collective_bytes("all-reduce", 800, 1) == (800, 0)


def test_collectives_count_async_pairs_once_and_weight_loops(module):
  ops = cost.collectives(module, cost.execution_counts(module))
  assert sorted(c.kind for c in ops) == ["all-gather", "all-reduce", "collective-permute",
                                         "reduce-scatter"]
  totals = cost.collective_totals(ops)
  ag, ar = totals["all-gather"], totals["all-reduce"]
  assert ag == {"count": 4, "buffer_bytes": 4 * 16384, "wire_bytes": 4 * 16384 * 7 / 8}
  assert ar == {"count": 4, "buffer_bytes": 4 * 16384, "wire_bytes": 4 * 2 * 16384 * 7 / 8}
  assert totals["reduce-scatter"] == {"count": 1, "buffer_bytes": 512, "wire_bytes": 256}
  assert totals["collective-permute"]["wire_bytes"] == 512
  by_kind = {c.kind: c for c in ops}
  assert by_kind["all-reduce"].scatter_share == 1  # its only use keeps this device's 1/8
  assert by_kind["reduce-scatter"].scatter_share == 0
  # The permute is priced as a pair exchange; the reduce-scatter's group has 2 devices.
  assert cost.wire_bytes_by_group(ops) == {8: 4 * 16384 * 7 / 8 + 4 * 2 * 16384 * 7 / 8,
                                           2: 256.0 + 512.0}


def test_tuple_all_reduce_sliced_element_by_element_is_scatter_like():
  text = HLO.replace(
      "%ar = f32[64,64]{1,0} all-reduce(%ag-done), channel_id=2",
      "%art = (f32[64,64]{1,0}, f32[64,64]{1,0}) all-reduce(%ag-done, %ag-done), channel_id=2"
  ).replace("%rs = f32[8,64]{1,0} fusion(%ar, %i)",
            "%ar = f32[64,64]{1,0} get-tuple-element(%art), index=0\n"
            "  %ar2 = f32[64,64]{1,0} get-tuple-element(%art), index=1\n"
            "  %rs2 = f32[8,64]{1,0} fusion(%ar2, %i), kind=kLoop, calls=%fused_scatter\n"
            "  %rs = f32[8,64]{1,0} fusion(%ar, %i)")
  m = cost.parse_hlo(text)
  ar = next(c for c in cost.collectives(m, cost.execution_counts(m)) if c.kind == "all-reduce")
  assert ar.buffer_bytes == 2 * 16384 and ar.scatter_share == 1
  half = text.replace("%rs2 = f32[8,64]{1,0} fusion(%ar2, %i), kind=kLoop, calls=%fused_scatter",
                      "%rs2 = f32[64,64]{1,0} negate(%ar2)")
  m = cost.parse_hlo(half)
  ar = next(c for c in cost.collectives(m, cost.execution_counts(m)) if c.kind == "all-reduce")
  assert ar.scatter_share == 0.5  # one element used whole (a replicated parameter's gradient)


def test_all_reduce_sliced_after_an_elementwise_fusion_is_scatter_like():
  text = HLO.replace(
      "%rs = f32[8,64]{1,0} fusion(%ar, %i), kind=kLoop, calls=%fused_scatter",
      "%narrow = bf16[64,64]{1,0} fusion(%ar), kind=kLoop, calls=%to_bf16\n"
      "  %rs = f32[8,64]{1,0} fusion(%narrow, %i), kind=kLoop, calls=%fused_scatter"
  ).replace("%add (x: f32[]", """%to_bf16 (q: f32[64,64]) -> bf16[64,64] {
  %q = f32[64,64]{1,0} parameter(0)
  ROOT %cv = bf16[64,64]{1,0} convert(%q)
}

%add (x: f32[]""")
  m = cost.parse_hlo(text)
  ar = next(c for c in cost.collectives(m, cost.execution_counts(m)) if c.kind == "all-reduce")
  assert ar.scatter_share == 1


def test_f32_collective_of_bf16_data_is_marked_widened():
  text = """\
HloModule m, num_partitions=8

%cast (p: f32[8,64]) -> f32[8,64] {
  %p = f32[8,64]{1,0} parameter(0)
  %narrow = bf16[8,64]{1,0} convert(%p)
  ROOT %wide = f32[8,64]{1,0} convert(%narrow)
}

ENTRY %main (w: f32[8,64]) -> (f32[64,64], f32[64,64]) {
  %w = f32[8,64]{1,0} parameter(0)
  %c = f32[8,64]{1,0} fusion(%w), kind=kLoop, calls=%cast
  %ag = f32[64,64]{1,0} all-gather(%c), replica_groups={}, dimensions={0}
  %ag.f32 = f32[64,64]{1,0} all-gather(%w), replica_groups={}, dimensions={0}
  ROOT %t = (f32[64,64]{1,0}, f32[64,64]{1,0}) tuple(%ag, %ag.f32)
}
"""
  m = cost.parse_hlo(text)
  ops = {c.name: c for c in cost.collectives(m, cost.execution_counts(m))}
  assert ops["ag"].widened and not ops["ag.f32"].widened
  assert ops["ag"].group == 8  # replica_groups={}: every partition


def test_all_reduce_used_whole_is_not_scatter_like(module):
  text = HLO.replace("%rs = f32[8,64]{1,0} fusion(%ar, %i), kind=kLoop, calls=%fused_scatter",
                     "%rs = f32[64,64]{1,0} negate(%ar)")
  m = cost.parse_hlo(text)
  ar = next(c for c in cost.collectives(m, cost.execution_counts(m)) if c.kind == "all-reduce")
  assert ar.scatter_share == 0


def test_hbm_bytes_read_slices_not_whole_buffers(module):
  counts = cost.execution_counts(module)
  by = module.by_name
  # The stacked weights [4, 8, 64] are read one [8, 64] slice at a time; the index is read whole.
  assert cost.instruction_hbm_bytes(by["shard"], module) == 2048 + 4 + 2048
  assert cost.instruction_hbm_bytes(by["ag-start"], module) == 0  # counted at its done
  assert cost.instruction_hbm_bytes(by["ag-done"], module) == 2 * 16384
  assert cost.instruction_hbm_bytes(by["mm"], module) == 512 + 16384 + 512
  assert cost.instruction_hbm_bytes(by["rs"], module) == 2048 + 4 + 2048
  body = 4100 + 32768 + 17408 + 2 * 16384 + 4100 + 12  # + the counter's add
  entry = (256 + 512) + (512 + 512) + 3 * 512  # reduce-scatter, permute, add
  assert cost.hbm_bytes(module, counts) == 4 * body + 5 * (1 + 4 + 4) + entry


def test_dynamic_update_slice_fusion_writes_the_update_only():
  text = """\
HloModule m

%fused_dus (p0: f32[32,1024], p1: f32[1,1024], p2: s32[]) -> f32[32,1024] {
  %p0 = f32[32,1024]{1,0} parameter(0)
  %p1 = f32[1,1024]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = f32[32,1024]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c)
}

ENTRY %main (a: f32[32,1024], b: f32[1,1024], i: s32[]) -> f32[32,1024] {
  %a = f32[32,1024]{1,0} parameter(0)
  %b = f32[1,1024]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = f32[32,1024]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%fused_dus
}
"""
  m = cost.parse_hlo(text)
  assert cost.hbm_bytes(m, cost.execution_counts(m)) == 4096 + 4 + 4096  # update in, index, out


def test_sources_prefer_the_project_frame(module):
  assert module.frames[2].parent == 1 and module.frames[1].parent is None
  assert cost.source_of(module.by_name["mm"], module) == "model/llama.py:82 (dense)"
  assert cost.source_of(module.by_name["dot.1"], module) == "model/llama.py:82 (dense)"
  assert cost.source_of(module.by_name["next"], module) == "?"
  assert cost.short_op_name("jit(step)/while/body/closed_call/transpose(jvp())/while/body/"
                            "checkpoint/rematted_computation/dot_general") == "bwd remat dot_general"
  assert cost.short_op_name("jit(step)/jvp()/reduce_max") == "fwd reduce_max"
  assert cost.short_op_name("jit(step)/transpose(jvp())/(a/dot_general:reduce_sum:b/dot_general)"
                            ) == "bwd dot_general+reduce_sum"


def test_peak_buffers_roles_and_shapes(module):
  live = cost.parse_live_range_peak(LIVE_RANGE)
  assert live == [("ag-done", "{}", 16384), ("w.1", "{}", 8192), ("param", "{2}", 8192),
                  ("mm", "{}", 512)]
  peak = cost.peak_buffers(module, live)
  assert [(b.value, b.role, b.shape) for b in peak] == [
      ("ag-done{}", "temporary", "f32[64,64]"), ("w.1{}", "argument", "f32[4,8,64]"),
      ("param{2}", "loop state", "f32[4,8,64]"), ("mm{}", "temporary", "f32[2,64]")]
  assert peak[1].source == "state.params['w']"
  assert peak[3].source == "model/llama.py:82 (dense)"
  assert cost.parse_live_range_peak("no peak here") == []


def test_decoder_flops_is_6n_plus_attention_when_everything_trains():
  f = cost.decoder_flops_per_token(matmul_params=1e9, trainable_matmul_params=1e9, layers=32,
                                   seq_len=2048, attention_width=4096)
  assert f["dense"] == 6e9 and f["attention"] == 12 * 32 * 2048 * 4096
  lora = cost.decoder_flops_per_token(matmul_params=1e9, trainable_matmul_params=1e6, layers=1,
                                      seq_len=1, attention_width=1)
  assert lora["dense"] == 4e9 + 2e6  # the frozen base still runs forward and backward


def test_vit_and_causal_fraction():
  # One 1-token layer without attention cost: 2 (4 d^2 + 2 d f) + 4 d, plus the patch embedding.
  assert cost.vit_forward_flops(layers=1, tokens=1, hidden=2, intermediate=3, patches=1,
                                patch_inputs=5) == 2 * 5 * 2 + 2 * (16 + 12) + 4 * 2
  assert cost.causal_block_fraction(2048, 256) == 9 / 16  # 8 blocks: 36 of 64 block tiles
  assert cost.causal_block_fraction(256, 256) == 1.0


def test_full_remat_activation_estimate_of_the_7b():
  est = cost.full_remat_activation_bytes(layers=32, seq_len=2048, hidden=4096,
                                         intermediate=11008, heads=32, act_bytes=2, score_bytes=4,
                                         score_fraction=9 / 16)
  mib = 1 << 20
  assert est["residuals"] == 512 * mib  # 32 x 2048 x 4096 x 2 bytes
  hidden, inter = 12 * 2048 * 4096 * 2, 4 * 2048 * 11008 * 2
  scores = 2 * 32 * (9 / 16) * 2048 ** 2 * 4
  assert est["layer"] == hidden + inter + scores
  assert est["total"] == est["residuals"] + est["layer"]  # ~1.42 GiB per row


def test_fsdp_minimum():
  m = cost.fsdp_min_wire_bytes(gathered_trainable_bytes=800, gathered_frozen_bytes=80,
                               gradient_bytes=1600, fsdp=8, accum_steps=2, gathers_per_pass=2)
  assert m["all-gather"] == 2 * (2 * 800 + 80) * 7 / 8
  assert m["reduce-scatter"] == 2 * 1600 * 7 / 8 and m["all-reduce"] == 0
  assert m["total"] == m["all-gather"] + m["reduce-scatter"]
  replicas = cost.fsdp_min_wire_bytes(gathered_trainable_bytes=0, gathered_frozen_bytes=0,
                                      gradient_bytes=1600, fsdp=8, data=2)
  assert replicas["all-reduce"] == 2 * 0.5 * 1600 / 8


def test_roofline_takes_the_slowest_resource():
  chip = cost.Chip("x", bf16_flops_per_s=100.0, hbm_bytes_per_s=10.0, hbm_bytes=1.0,
                   link_bytes_per_s=5.0, link="L", scale_up=8, scale_out_bytes_per_s=1.0)
  r = cost.roofline(flops=200.0, hbm_bytes=10.0, wire_by_group={8: 5.0, 64: 3.0},
                    model_flops=100.0, chip=chip)
  assert r["times"] == {"compute": 2.0, "memory": 1.0, "communication": 1.0 + 3.0}
  assert r["step_s"] == 4.0 and r["bound"] == "communication"
  assert r["mfu"] == 100.0 / (4.0 * 100.0) and r["no_overlap_s"] == 7.0
  for name in ("v5p", "h100", "h200"):
    assert cost.CHIPS[name].bf16_flops_per_s > 1e14 and cost.CHIPS[name].source


# ------------------------------------------------------------------ compiled on simulated devices


@pytest.fixture(scope="module")
def mesh8():
  assert len(jax.devices()) >= 8, "tests/conftest.py simulates 8 CPU devices"
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def _analysed(compiled):
  module = cost.parse_hlo(compiled.as_text())
  return module, cost.execution_counts(module)


def test_fsdp_scan_with_remat_on_8_devices(mesh8):
  """A 4-layer rematerialised scan, weights sharded over 8 devices: the HLO count matches the
  hand count (4 matmuls per layer), XLA's cost analysis counts the loop bodies once, the weights
  are gathered twice per layer and their gradients reduced once."""
  layers, d, rows = 4, 64, 16

  def step(w, x):
    def layer(h, wl):
      return jnp.tanh(h @ wl), None

    def loss(w):
      h, _ = jax.lax.scan(jax.checkpoint(layer), x, w)
      return jnp.sum(h ** 2)

    return jax.grad(loss)(w)

  w = jax.ShapeDtypeStruct((layers, d, d), jnp.float32, sharding=NamedSharding(mesh8, P(
      None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((rows, d), jnp.float32, sharding=NamedSharding(mesh8, P("fsdp")))
  # Gradients sharded like the weights, as FSDP keeps them.
  compiled = jax.jit(step, out_shardings=w.sharding).lower(w, x).compile()
  module, counts = _analysed(compiled)
  per_matmul = 2 * (rows // 8) * d * d  # each device multiplies its 2 rows
  flops = cost.matmul_flops(module, counts)
  assert flops == layers * 4 * per_matmul  # forward, recomputed forward, two gradients
  assert compiled.cost_analysis()["flops"] < flops / 2
  ops = cost.collectives(module, counts)
  gathers = [c for c in ops if c.kind == "all-gather"]
  assert sum(c.runs * c.buffer_bytes for c in gathers) == 2 * layers * d * d * 4
  reduced = sum(c.runs * c.buffer_bytes * (1.0 if c.kind == "reduce-scatter" else c.scatter_share)
                for c in ops)
  assert reduced == layers * d * d * 4
  assert all(c.group == 8 for c in ops)


def test_nested_loops_multiply_and_agree_with_xla_without_loops():
  a = jax.ShapeDtypeStruct((8, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 32), jnp.float32)

  def nested(a, w):
    def outer(h, _):
      return jax.lax.fori_loop(0, 3, lambda i, g: jnp.sin(g @ w), h), None
    return jax.lax.scan(outer, a, None, length=5)[0]

  module, counts = _analysed(jax.jit(nested).lower(a, w).compile())
  assert cost.matmul_flops(module, counts) == 15 * 2 * 8 * 32 * 32

  compiled = jax.jit(lambda a, w: (a @ w) @ w.T).lower(a, w).compile()
  module, counts = _analysed(compiled)
  xla = compiled.cost_analysis()
  assert cost.matmul_flops(module, counts) == xla["flops"] == 2 * 2 * 8 * 32 * 32
  hbm = cost.hbm_bytes(module, counts)
  assert 0.5 < hbm / xla["bytes accessed"] < 2.0, (hbm, xla["bytes accessed"])


# ------------------------------------------------------------------------ XLA:CPU's f32 widening

# Both modules share the source tables: line 10 computes tanh (bf16 in the program), line 11 is
# the program's own upcast to f32, line 12 a multiply done in bf16 and in f32 (ambiguous).
_FRAMES = """\
FileNames
1 "/repo/visatb_jax/model/toy.py"

FunctionNames
1 "layer"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=1 function_name_id=1 line=11 end_line=11 column=1 end_column=2}
3 {file_name_id=1 function_name_id=1 line=12 end_line=12 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=1}
"""

BEFORE = "HloModule jit_f\n\n" + _FRAMES + """
ENTRY %main (x: f32[8,64], b: bf16[8,64]) -> bf16[8,64] {
  %x = f32[8,64]{1,0} parameter(0)
  %b = bf16[8,64]{1,0} parameter(1)
  %tanh.1 = bf16[8,64]{1,0} tanh(%b), metadata={op_name="while/body/tanh" stack_frame_id=1}
  %up = f32[8,64]{1,0} convert(%tanh.1), metadata={op_name="convert_element_type" stack_frame_id=2}
  %m1 = bf16[8,64]{1,0} multiply(%b, %b), metadata={op_name="mul" stack_frame_id=3}
  %m2 = f32[8,64]{1,0} multiply(%up, %x), metadata={op_name="mul" stack_frame_id=3}
  ROOT %r = bf16[8,64]{1,0} tanh(%m1), metadata={op_name="while/body/tanh" stack_frame_id=1}
}
"""

# After optimization: XLA's own upcast of `b` (a fusion, no metadata) starts a loop whose body
# computes tanh in f32 and carries `x` through unchanged; the program's upcast and both
# multiplies are f32.
AFTER = "HloModule jit_f, num_partitions=1\n\n" + _FRAMES + """
%fused_up (p: bf16[8,64]) -> f32[8,64] {
  %p = bf16[8,64]{1,0} parameter(0)
  ROOT %cv = f32[8,64]{1,0} convert(%p)
}

%body (s: (s32[], f32[8,64], f32[8,64])) -> (s32[], f32[8,64], f32[8,64]) {
  %s = (s32[], f32[8,64]{1,0}, f32[8,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %h = f32[8,64]{1,0} get-tuple-element(%s), index=1
  %keep = f32[8,64]{1,0} get-tuple-element(%s), index=2
  %act = f32[8,64]{1,0} tanh(%h), metadata={op_name="jit(f)/while/body/tanh" stack_frame_id=1}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,64]{1,0}, f32[8,64]{1,0}) tuple(%next, %act, %keep)
}

%cond (c: (s32[], f32[8,64], f32[8,64])) -> pred[] {
  %c = (s32[], f32[8,64]{1,0}, f32[8,64]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

ENTRY %main (x: f32[8,64], b: bf16[8,64]) -> f32[8,64] {
  %x = f32[8,64]{1,0} parameter(0)
  %b = bf16[8,64]{1,0} parameter(1)
  %wide = f32[8,64]{1,0} fusion(%b), kind=kLoop, calls=%fused_up
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,64]{1,0}, f32[8,64]{1,0}) tuple(%zero, %wide, %x)
  %loop = (s32[], f32[8,64]{1,0}, f32[8,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[8,64]{1,0} get-tuple-element(%loop), index=1
  %own = f32[8,64]{1,0} convert(%b), metadata={op_name="jit(f)/convert_element_type" stack_frame_id=2}
  %mul = f32[8,64]{1,0} multiply(%own, %out), metadata={op_name="jit(f)/mul" stack_frame_id=3}
  ROOT %bc = f32[8,64]{1,0} bitcast(%out)
}
"""


def test_model_precisions_key_by_source_line_and_primitive():
  precisions = cost.model_precisions(cost.parse_hlo(BEFORE))
  assert precisions == {
      ("model/toy.py:10 (layer)", "tanh"): {"bf16"},
      ("model/toy.py:11 (layer)", "convert_element_type"): {"f32"},
      ("model/toy.py:12 (layer)", "mul"): {"bf16", "f32"}}


def test_widened_buffers_are_bf16_values_held_in_f32():
  m = cost.parse_hlo(AFTER)
  precisions = cost.model_precisions(cost.parse_hlo(BEFORE))

  def widened(name, index="{}", p=precisions):
    return cost.is_widened(m, name, index, p)

  assert widened("wide")  # XLA's own convert of bf16 data
  assert not widened("own")  # the program's upcast: f32 in the program too
  assert not widened("x") and not widened("b")  # an argument; a bf16 buffer
  assert not widened("mul")  # its line multiplies in bf16 and in f32: ambiguous, f32
  # Loop state: what the body's root puts there (tanh, bf16 in the program), or what the loop
  # started with when the body passes it through (the f32 argument x).
  assert widened("loop", "{1}") and widened("s", "{1}") and widened("out") and widened("bc")
  assert not widened("loop", "{2}") and not widened("s", "{2}")
  assert widened("c", "{1}") and not widened("c", "{2}")  # the condition sees the same state
  assert cost.value_origin(m, "loop", (2,))[0].name == "x"
  assert not widened("loop", "{0}")  # s32
  assert not widened("act", p={("model/toy.py:10 (layer)", "tanh"): frozenset(("bf16", "f32"))})
  live = [("loop", "{1}", 2048), ("loop", "{2}", 2048), ("own", "{}", 2048), ("b", "{}", 1024)]
  assert cost.widened_bytes(m, live, precisions) == 2048
  peak = cost.peak_buffers(m, live, precisions)
  assert [b.widened for b in peak] == [True, False, False, False]
  assert not any(b.widened for b in cost.peak_buffers(m, live))  # no precisions, no marks


def test_hbm_bytes_count_widened_values_at_two_bytes():
  m = cost.parse_hlo(AFTER)
  counts = cost.execution_counts(m)
  scale = cost.widening_scale(m, cost.model_precisions(cost.parse_hlo(BEFORE)))
  f32 = 8 * 64 * 4
  # The loop's tanh reads and writes a widened value: half of 2 x f32 per trip.
  assert cost.instruction_hbm_bytes(m.by_name["act"], m) == 2 * f32
  assert cost.instruction_hbm_bytes(m.by_name["act"], m, scale) == f32
  # The program's multiply: its f32 operand `own` stays whole, the widened `out` is halved.
  assert cost.instruction_hbm_bytes(m.by_name["mul"], m, scale) == f32 + f32 + f32 / 2
  assert cost.hbm_bytes(m, counts, scale) < cost.hbm_bytes(m, counts)


def _compiled_with_dump(fn, *args):
  """(optimized module, module before optimizations, live ranges at the peak) of `fn`."""
  import tempfile
  from visatb_jax.cli import dryrun
  with tempfile.TemporaryDirectory() as directory:
    # A nonce: a step served by the persistent compilation cache would leave no dump.
    compiled = jax.jit(fn).lower(*args).compile(dryrun._dump_options(directory, nonce=4321))
    live, before = dryrun._dump_texts(directory)
  return (cost.parse_hlo(compiled.as_text()), cost.parse_hlo(before),
          cost.parse_live_range_peak(live))


def _chain(dtype):
  """Two [256, 256] matmuls in `dtype`, then a loop that reads both results: they are live
  buffers at the peak. x is the program's only f32 value in bf16."""
  def fn(x):
    a = x.astype(dtype)
    h1 = jnp.tanh(a @ a)
    h2 = jnp.tanh(a @ h1)
    return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ h1 + h2), a)
  return fn


def test_widening_of_a_compiled_bf16_program_is_its_f32_temporaries():
  """The same program in bf16 and in f32: in bf16 every f32 buffer at the peak but the argument
  x holds a bf16 value of the program, so the widened bytes are exactly those buffers' bytes; in
  f32 nothing is widened."""
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  m, before, live = _compiled_with_dump(_chain(jnp.bfloat16), x)
  precisions = cost.model_precisions(before)
  assert precisions and all(p == {"bf16"} for k, p in precisions.items() if k[1] == "tanh")
  f32_temps = sum(size for name, index, size in live
                  if cost.array_shapes(cost._subshape(m.by_name[name].shape, index))[0][0] == "f32"
                  and not (m.by_name[name].opcode == "parameter"
                           and m.by_name[name].computation == m.entry))
  assert f32_temps >= 2 * 256 * 256 * 4, live  # XLA:CPU holds h1 and h2 in f32
  assert cost.widened_bytes(m, live, precisions) == f32_temps
  counts = cost.execution_counts(m)
  assert cost.hbm_bytes(m, counts, cost.widening_scale(m, precisions)) < cost.hbm_bytes(m, counts)

  m, before, live = _compiled_with_dump(_chain(jnp.float32), x)
  precisions = cost.model_precisions(before)
  assert cost.widened_bytes(m, live, precisions) == 0
  counts = cost.execution_counts(m)
  assert cost.hbm_bytes(m, counts, cost.widening_scale(m, precisions)) == cost.hbm_bytes(
      m, counts)


# ------------------------------------------------------------------------------- fits or not


def test_memory_verdict_at_the_boundaries():
  gb = 1e9
  v = cost.memory_verdict(measured_bytes=80 * gb, accelerator_bytes=70 * gb, capacity_bytes=80 * gb)
  assert v["verdict"] == "fits" and v["measured_margin"] == 0 and v["accelerator_margin"] == 10 * gb
  v = cost.memory_verdict(measured_bytes=80 * gb + 1, accelerator_bytes=80 * gb,
                          capacity_bytes=80 * gb)
  assert v["verdict"] == "fits on the accelerator estimate only"
  assert v["measured_margin"] == -1 and v["accelerator_margin"] == 0
  v = cost.memory_verdict(measured_bytes=90 * gb, accelerator_bytes=80 * gb + 1,
                          capacity_bytes=80 * gb)
  assert v["verdict"] == "does not fit" and not v["fits_measured"] and not v["fits_accelerator"]
  # Without an estimate (no dump to read), the measured figure decides alone.
  assert cost.memory_verdict(measured_bytes=81 * gb, accelerator_bytes=None,
                             capacity_bytes=80 * gb)["verdict"] == "does not fit"
  v = cost.memory_verdict(measured_bytes=79 * gb, accelerator_bytes=None, capacity_bytes=80 * gb)
  assert v["verdict"] == "fits" and v["accelerator_margin"] is None
  assert {n: c.hbm_bytes for n, c in cost.CHIPS.items()} == {"v5p": 95e9, "h100": 80e9,
                                                             "h200": 141e9}


@settings(max_examples=200, deadline=None)
@given(measured=st.floats(0, 300e9), share=st.floats(0, 1), capacity=st.floats(1e9, 300e9))
def test_memory_verdict_follows_the_two_bounds(measured, share, capacity):
  accelerator = measured * (1 - share / 2)  # widened buffers at half: never above measured
  v = cost.memory_verdict(measured_bytes=measured, accelerator_bytes=accelerator,
                          capacity_bytes=capacity)
  assert v["fits_measured"] == (measured <= capacity)
  assert v["measured_margin"] == capacity - measured
  if v["verdict"] == "fits":  # the upper bound fits, so does the lower one
    assert v["fits_accelerator"] and v["accelerator_margin"] >= v["measured_margin"]
  elif v["verdict"] == "does not fit":
    assert not v["fits_accelerator"] and v["accelerator_margin"] < 0
  else:
    assert v["measured_margin"] < 0 <= v["accelerator_margin"]
  # More memory never turns a verdict worse.
  bigger = cost.memory_verdict(measured_bytes=measured, accelerator_bytes=accelerator,
                               capacity_bytes=capacity * 2)["verdict"]
  order = ["does not fit", "fits on the accelerator estimate only", "fits"]
  assert order.index(bigger) >= order.index(v["verdict"])
