"""A checkpoint saved on 8 devices restores on 1 and on 4, and training continues the same way."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from visatb_jax import train
from visatb_jax.runtime import checkpoint
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding

from test_train import CFG, LAM, TASKS, make_batch, new_model, params_of


class Crash(Exception):
  pass


def _crash_at(index):
  def get_batch(i):
    if i == index:
      raise Crash()
    return make_batch(i)
  return get_batch


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
  """A run on 8 devices killed after step 4 (last checkpoint: step 3), and the straight run."""
  root = tmp_path_factory.mktemp("restore")
  mesh8 = sharding.make_mesh({"data": 2, "fsdp": 4})
  straight = train.train(new_model(), make_batch, LAM, CFG, root / "straight", mesh=mesh8,
                         task_names=TASKS)
  with pytest.raises(Crash):
    train.train(new_model(), _crash_at(4), LAM, CFG, root / "killed", mesh=mesh8,
                task_names=TASKS)
  return root, params_of(straight)


@pytest.mark.parametrize("mesh_config", [{"data": 1}, {"data": 2, "fsdp": 2}])
def test_resume_on_another_device_count(saved_on_8, tmp_path, mesh_config):
  root, straight_params = saved_on_8
  workdir = tmp_path / "run"
  shutil.copytree(root / "killed", workdir)
  devices = jax.devices()[:int(np.prod(list(mesh_config.values())))]
  mesh = sharding.make_mesh(mesh_config, devices)

  # The restored parameters are exactly the saved ones, now laid out on the new mesh.
  graphdef, params, frozen = train.split_model(new_model())
  del graphdef, frozen
  target = train.init_train_state(params, train.make_optimizer(CFG))
  target = jax.device_put(target, sharding.param_shardings(target, mesh))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
  restored = ckpt.restore(target)
  saved = checkpoint.Checkpointer(root / "killed" / "checkpoints").restore(
      train.init_train_state(params, train.make_optimizer(CFG)))
  ckpt.close()
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(saved.params))
  assert all(len(x.sharding.device_set) == len(devices) for x in jax.tree.leaves(restored.params))

  # Training continues to the same losses and parameters as the uninterrupted 8-device run.
  resumed = train.train(new_model(), make_batch, LAM, CFG, workdir, mesh=mesh, task_names=TASKS)
  losses = [r["loss"] for r in metrics_log.read_metrics(workdir / metrics_log.METRICS_FILE)]
  reference = [r["loss"] for r in metrics_log.read_metrics(
      root / "straight" / metrics_log.METRICS_FILE)]
  assert len(losses) == len(reference) == CFG["steps"]
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_of(resumed)), jax.tree.leaves(straight_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
