"""--dry-run: abstract model, compiled step for a mesh, per-device memory — without weights.

Tests that only need the memory figures pass `analyse=False`: the cost analysis (runtime/cost.py,
tested on its own in tests/runtime/test_cost.py) dumps and parses the compiled HLO.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from visatb_jax.cli import dryrun
from visatb_jax.model import factory

from conftest import REPO, micro_config


def _config(**mesh):
  config = micro_config()
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
  config.model.text.vocab_size = 300
  config.model.image_token_id = 4
  return config


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_counts_match_the_real_model_and_fsdp_divides_the_params():
  config = _config()
  single = dryrun.dry_run(config, jax.devices()[:1], analyse=False)
  model = factory.build_model(config.model, factory.model_config(config.model))
  trainable = sum(int(np.prod(x.shape)) for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
                  if "vision_tower" not in path)
  assert single["parameters"]["trainable"] == trainable
  pd = single["per_device_bytes"]
  assert pd["trainable_params"] == trainable * 4
  assert pd["optimizer_state"] >= 2 * trainable * 4  # Adam's two moments, float32
  assert pd["activations_and_temps"] > 0

  sharded = dryrun.dry_run(_config(fsdp=8), analyse=False)
  assert sharded["devices"] == 8 and sharded["mesh"]["fsdp"] == 8
  ratio = sharded["per_device_bytes"]["trainable_params"] / pd["trainable_params"]
  # Norm scales and odd-sized dimensions stay replicated, so not exactly 1/8 of the bytes.
  assert ratio >= 0.125, ratio  # nothing is split finer than the 8 devices
  assert ratio < 0.3, ratio  # but the matrices are split
  text = dryrun.format_report(sharded)
  assert "optimizer_state" in text and "activations_and_temps" in text and "'fsdp': 8" in text


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_remat_bounds_activation_memory_whatever_the_depth():
  """Remat scans the layers: XLA keeps one layer's activations live, not all of them."""
  temps = {}
  for remat in ("none", "full"):
    config = _config()
    config.model.text.num_hidden_layers = 6
    config.model.remat = remat
    temps[remat] = dryrun.dry_run(config, jax.devices()[:1], analyse=False)[
        "per_device_bytes"]["activations_and_temps"]
  assert temps["full"] < 0.6 * temps["none"], temps


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_activation_memory_follows_rows_per_device_not_the_device_count():
  """The model pins its activations to the batch axes: more FSDP devices with the same rows per
  device must not cost more temporaries per device (without the constraints XLA followed the
  sharded weights and kept the whole global batch's attention scores on every device)."""
  temps = {}
  for devices in (2, 8):
    config = _config(fsdp=devices)
    config.data.seq_len = 256
    # Weights large against activations, as at 7B: XLA then prefers moving activations.
    text = config.model.text
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 2048, 1
    text.num_attention_heads = text.num_key_value_heads = 16
    config.train.batch_size = 2 * devices
    config.train.accum_steps = 1
    temps[devices] = dryrun.dry_run(config, jax.devices()[:devices], analyse=False)[
        "per_device_bytes"]["activations_and_temps"]
  assert temps[8] < 1.25 * temps[2], temps  # unconstrained: 1.68x


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_bf16_and_remat_are_reported():
  config = _config()
  config.model.dtype = "bfloat16"
  config.model.remat = "dots_with_no_batch_dims_saveable"
  r = dryrun.dry_run(config, jax.devices()[:1], analyse=False)
  assert r["dtype"] == "bfloat16" and r["param_dtype"] == "float32"
  assert r["remat"] == "dots_with_no_batch_dims_saveable"
  assert jax.devices()  # the step compiled on the local devices


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_cli_dry_run_without_weights(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  overrides = ["--config.model.vision.hidden_size=16", "--config.model.vision.intermediate_size=32",
               "--config.model.vision.num_hidden_layers=2", "--config.model.vision.num_attention_heads=2",
               "--config.model.text.hidden_size=32", "--config.model.text.intermediate_size=64",
               "--config.model.text.num_hidden_layers=2", "--config.model.text.num_attention_heads=2",
               "--config.model.text.num_key_value_heads=1", "--config.train.batch_size=4",
               "--config.data.seq_len=64", "--config.mesh.data=2", "--config.mesh.fsdp=2"]
  out = subprocess.run(
      [sys.executable, "-m", "visatb_jax.launch", "--config", "demo.py", "--dry-run",
       "--dry_run_devices=4", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "on 4 cpu device(s)" in out.stdout and "total (compiled step)" in out.stdout
  assert "memory at the peak" in out.stdout and "PLANNING ESTIMATE" in out.stdout
  # The report ends with a verdict per device. The demo computes in float32: nothing is
  # widened, and the accelerator estimate is the measured figure.
  last = out.stdout.rstrip("\n").splitlines()[-3:]
  assert [line.split(":")[0] for line in last] == [
      "  H100 SXM5 (80 GB)", "  TPU v5p (95 GB)", "  H200 SXM (141 GB)"], last
  for line in last:
    assert re.fullmatch(r"  .* \(\d+ GB\): fits; margin (\d+\.\d\d) GB as measured, "
                        r"margin \1 GB on the accelerator estimate", line), line
  assert "widening: 0.0 KiB of the" in out.stdout
  assert not os.path.exists(tmp_path / "runs")


def test_bad_remat_name_is_a_clear_error():
  config = _config()
  config.model.remat = "sometimes"
  with pytest.raises(ValueError, match="config.model.remat='sometimes' is not a remat policy"):
    dryrun.dry_run(config, jax.devices()[:1], analyse=False)


def test_lora_trains_adapters_and_projector_only():
  config = _config()
  config.model.lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ("q_proj",)}
  r = dryrun.dry_run(config, jax.devices()[:1], analyse=False)
  text, vision = config.model.text, config.model.vision
  q_proj = 4 * (text.hidden_size + text.hidden_size) * text.num_hidden_layers
  projector = (vision.hidden_size + 1) * text.hidden_size + (text.hidden_size + 1) * text.hidden_size
  assert r["parameters"]["trainable"] == q_proj + projector
  config.model.lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ("q_proj",)}
  assert dryrun.dry_run(config, jax.devices()[:1], analyse=False)["parameters"][
      "trainable"] == q_proj + projector


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_cost_report_on_8_devices():
  """The analysis of the compiled step: the peak's buffers traced to the model code, compiled
  FLOPs near the model's, FSDP's collectives against their minimum, a roofline per chip; a
  second dry run, served by the session's persistent compilation cache, still gets its buffers."""
  config = _config(fsdp=8)
  config.model.remat = "full"
  config.model.dtype = "bfloat16"
  config.data.seq_len = 192  # a step no other test compiles
  config.train.batch_size, config.train.accum_steps = 16, 1  # 2 rows per device
  r = dryrun.dry_run(config)
  c = r["cost"]
  peak = c["peak_buffers"]
  assert peak and [b.bytes for b in peak] == sorted((b.bytes for b in peak), reverse=True)
  assert any(b.source.startswith("model/llama.py:") for b in peak)
  assert any(b.role == "argument" and b.source.startswith("batch[") for b in peak)
  # Remat recomputes the forward (+1/3 on the dense FLOPs), the causal query blocks skip about
  # half the scores that the model formula counts: about 1.0 for this attention-heavy model.
  assert 0.8 < c["flops_ratio"] < 1.5, c["flops_ratio"]
  assert c["collectives"]["all-gather"]["count"] > 0
  # The ratio is the compiled traffic over FSDP's minimum, which no compiled step can undercut;
  # undoing XLA:CPU's artifacts (f32-widened gathers, all-reduces for reduce-scatters) only
  # removes bytes.
  assert c["wire_ratio"] == c["wire_bytes"] / c["fsdp_minimum"]["total"]
  assert c["wire_bytes"] == sum(t["wire_bytes"] for t in c["collectives"].values())
  assert c["wire_ratio"] >= 1.0, c["wire_ratio"]
  assert c["accelerator_wire_ratio"] <= c["wire_ratio"]
  assert set(c["roofline"]) == {"v5p", "h100", "h200"}
  assert all(0 < e["mfu"] <= 1 and e["step_s"] > 0 for e in c["roofline"].values())
  # bf16 compute: XLA:CPU holds activations in f32, the estimate halves them; the roofline's
  # HBM time (hence its bound) comes from the halved bytes.
  widened = r["widened_at_peak"]
  assert widened == c["widened_at_peak"] >= sum(b.bytes for b in peak if b.widened) > 0  # top 12
  assert any(b.widened and b.source.startswith("model/llama.py:") for b in peak)
  assert r["accelerator_total_per_device"] == r["compiled_total_per_device"] - widened / 2
  assert c["hbm_bytes_accelerator"] < c["hbm_bytes"]
  for e in c["roofline"].values():
    assert e["times"]["memory"] == c["hbm_bytes_accelerator"] / e["chip"].hbm_bytes_per_s
  assert [v["verdict"] for v in r["memory_verdict"].values()] == ["fits"] * 3
  text = dryrun.format_report(r)
  lines = text.splitlines()
  # Every ratio is followed by a line that says what it divides and why it is not 1.
  for ratio in ("  measured temporaries / estimate:", "  compiled / model:",
                "  measured / minimum:"):
    at = next(i for i, line in enumerate(lines) if line.startswith(ratio))
    assert lines[at + 1].startswith("    = "), (ratio, lines[at + 1])
  assert any(line.startswith("  MFU = the model's FLOPs") for line in lines)
  assert any(line.startswith("  widening: ") and "f32 buffers of values the program holds in "
             "bf16" in line for line in lines)
  assert lines[-3].startswith("  H100 SXM5 (80 GB): fits; margin ")
  for part in ("memory at the peak", "full-remat activation estimate", "compiled / model",
               "FSDP minimum", "PLANNING ESTIMATE", "h100", "459"):
    assert part in text, part
  only = dryrun.format_report(r, targets=["v5p"])
  assert "  v5p " in only and "  h100 " not in only
  assert only.splitlines()[-1].startswith("  TPU v5p (95 GB): fits;") and "H100" not in only
  with pytest.raises(ValueError, match="unknown target 'tpu'"):
    dryrun.format_report(r, targets=["tpu"])
  assert dryrun.check_targets(None) == ["v5p", "h100", "h200"]

  again = dryrun.dry_run(config)["cost"]
  assert again["flops"] == c["flops"] and again["peak_buffers"] == peak


def test_unknown_roofline_target_is_refused_before_compiling(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "visatb_jax.launch", "--config", "demo.py", "--dry-run",
       "--target=h100,tpu9"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "'tpu9'" in lines[0], out.stderr


def _verdicts(measured, accelerator, platform="cpu", targets=None):
  r = {"platform": platform, "compiled_total_per_device": measured,
       "accelerator_total_per_device": accelerator,
       "widened_at_peak": None if accelerator is None else 2 * (measured - accelerator),
       "memory_verdict": dryrun.memory_verdicts(measured, accelerator)}
  return dryrun.verdict_lines(r, targets)


def test_verdict_lines_per_device_with_margins_and_shortfalls():
  lines = _verdicts(85e9, 70e9)
  assert lines[0].startswith("fits or not, per device: the compiled step (arguments, outputs, "
                             "temporaries) needs 85.00 GB (79.16 GiB) as measured on cpu, "
                             "about 70.00 GB (65.19 GiB) on TPU/GPU")
  assert "less half the 27.94 GiB of widened bf16 buffers" in lines[0]
  assert lines[-3:] == [
      "  H100 SXM5 (80 GB): fits on the accelerator estimate only; short by 5.00 GB as "
      "measured, margin 10.00 GB on the accelerator estimate",
      "  TPU v5p (95 GB): fits; margin 10.00 GB as measured, margin 25.00 GB on the accelerator "
      "estimate",
      "  H200 SXM (141 GB): fits; margin 56.00 GB as measured, margin 71.00 GB on the "
      "accelerator estimate"]
  assert [line.split(": ")[1].split(";")[0] for line in _verdicts(150e9, 142e9)[-3:]] == [
      "does not fit"] * 3
  assert _verdicts(150e9, 142e9)[-1].endswith("short by 9.00 GB as measured, short by 1.00 GB "
                                              "on the accelerator estimate")
  # Without an estimate (no dump), the measured figure decides and the report says why.
  lines = _verdicts(79e9, None)
  assert "no TPU/GPU estimate" in lines[0]
  assert lines[-3] == "  H100 SXM5 (80 GB): fits; margin 1.00 GB as measured"
  # Compiled on an accelerator, its own figure is the one.
  assert _verdicts(90e9, 90e9, platform="gpu")[-3] == (
      "  H100 SXM5 (80 GB): does not fit; short by 10.00 GB as measured")
  assert [line.split(" (")[0] for line in _verdicts(85e9, 70e9, targets=["h200", "v5p"])[-2:]] == [
      "  TPU v5p", "  H200 SXM"]
