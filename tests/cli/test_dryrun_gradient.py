"""--dry-run of a gradient method (config.weighting=imgrad, ...): the per-task-gradient step is
lowered and compiled, and the report gives its per-task gradients per device."""

import pytest

from visatb_jax.cli import dryrun

from conftest import micro_config


def _config(method, **mesh):
  config = micro_config()
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
  config.model.text.vocab_size = 300
  config.model.image_token_id = 4
  config.weighting = method
  return config


def test_gradient_method_is_recognised():
  assert dryrun.gradient_method(_config("visatb")) is None
  assert dryrun.gradient_method(_config("dwa")) is None
  config = _config("cagrad")
  config.weighting_options = {"cagrad": {"c": 0.2}}
  assert dryrun.gradient_method(config) == ("cagrad", {"c": 0.2})


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_gradient_method_dry_run_reports_per_task_gradients():
  r = dryrun.dry_run(_config("imgrad", fsdp=8), analyse=False)
  g = r["gradient_method"]
  tasks = len(micro_config().task_order)
  assert g["method"] == "imgrad" and g["tasks"] == tasks
  # T x the trainable parameters' share of one device: sharded like them, not whole.
  share = r["per_device_bytes"]["trainable_params"]
  assert g["per_task_gradients"] == tasks * share
  assert g["per_task_gradients"] < tasks * r["parameters"]["trainable"] * 4 / 2
  assert g["refusal"] is None and g["plan"]["per_task_gradients"] > 0
  text = dryrun.format_report(r)
  line = next(l for l in text.splitlines() if l.startswith("  per_task_gradients"))
  assert f"(imgrad: {tasks} tasks x" in line
  assert "planned before any stage:" in text and "within one 80 GB device" in text
  # The step compiled is the per-task one: it holds more than the VITW step's temporaries.
  plain = dryrun.dry_run(_config("visatb", fsdp=8), analyse=False)
  assert plain["gradient_method"] is None
  assert "per_task_gradients" not in dryrun.format_report(plain)
  temps = r["per_device_bytes"]["activations_and_temps"]
  assert temps > plain["per_device_bytes"]["activations_and_temps"] + g["per_task_gradients"] / 2
