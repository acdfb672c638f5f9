"""The pretrain stage: a base model that every later run starts from, resumable like the others."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from visatb_jax import pipeline
from visatb_jax.data import packing
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.workspace import Workspace
from visatb_jax.runtime import fileio

from conftest import micro_config

pytestmark = pytest.mark.slow

PRETRAIN = {"tasks": {"caption": 16, "chat": 8}, "trains": "projector+lm", "epochs": 2.0,
            "lr": 3e-3}


def pretrain_config(**overrides):
  config = micro_config()
  with config.unlocked():
    config.pretrain = dict(PRETRAIN, **overrides)
  config.baselines = ("ew",)
  return config


def params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  pipeline.run(pretrain_config(), workdir, stages=["data", "pretrain", "prep"])
  return workdir


def test_prep_and_final_start_from_the_pretrained_weights(pretrained):
  ws = Workspace(config_lib.build(pretrain_config()), pretrained)
  ws.enter_stage("final", [s for s in ws.run_config.sections])
  base, initial = params(ws.models.new_model()), params(ws.models.new_model(from_base=False))
  assert not same(base, initial)  # pretraining moved the LM and the projector
  pretrain_info = fileio.read_json(os.path.join(pretrained, "pretrain", "run.json"))
  assert pretrain_info["done"] and pretrain_info["train"]["lr"] == PRETRAIN["lr"]
  assert "pretrained" not in pretrain_info["start"]
  for name in ("mini", "vqa+mini"):
    info = fileio.read_json(os.path.join(pretrained, "prep", name, "run.json"))
    assert info["start"]["pretrained"] == {"dir": "pretrain", "hash": pretrain_info["hash"]}
  # The pretrained samples are images of their own, none of the task splits'.
  names = {os.path.basename(s["image_path"]) for s in ws.data.pretrain_samples()
           if s.get("image_path")}
  task_images = {os.path.basename(s["image_path"]) for split in ("train", "val", "test")
                 for s in ws.data.samples(split) if s.get("image_path")}
  assert names and not {os.path.join("pretrain", n) for n in names} & task_images


def test_projector_only_pretraining_leaves_the_language_model(tmp_path):
  config = pretrain_config(trains="projector", epochs=1.0)
  pipeline.run(config, str(tmp_path), stages=["data", "pretrain"])
  ws = Workspace(config_lib.build(config), str(tmp_path))
  ws.enter_stage("final", list(ws.run_config.sections))
  base = nnx.state(ws.models.new_model(), nnx.Param)
  initial = nnx.state(ws.models.new_model(from_base=False), nnx.Param)
  assert not same(params_of(base, "multi_modal_projector"),
                  params_of(initial, "multi_modal_projector"))
  assert same(params_of(base, "language_model"), params_of(initial, "language_model"))


def params_of(state, part):
  return [np.asarray(x) for x in jax.tree.leaves(state[part])]


def test_pretrain_resumes_where_it_stopped(pretrained, tmp_path, monkeypatch):
  """Killed after its first checkpoint, the stage resumes and ends with the same weights."""
  assert fileio.read_json(os.path.join(pretrained, "pretrain", "run.json"))["train"]["steps"] > 2
  workdir = str(tmp_path / "killed")
  real = packing.PackedDataset.batch_at

  def crash_at_step_2(self, step, batch_size):
    if step == 2:  # after the checkpoint of step 2 (checkpoint_every=2)
      raise KeyboardInterrupt("killed")
    return real(self, step, batch_size)

  monkeypatch.setattr(packing.PackedDataset, "batch_at", crash_at_step_2)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(pretrain_config(), workdir, stages=["data", "pretrain"])
  assert os.listdir(os.path.join(workdir, "pretrain", "checkpoints"))
  monkeypatch.setattr(packing.PackedDataset, "batch_at", real)
  pipeline.run(pretrain_config(), workdir, stages=["data", "pretrain"])
  got = Workspace(config_lib.build(pretrain_config()), workdir)
  want = Workspace(config_lib.build(pretrain_config()), pretrained)
  for ws in (got, want):
    ws.enter_stage("final", list(ws.run_config.sections))
  assert same(params(got.models.new_model()), params(want.models.new_model()))


def test_a_changed_pretrain_makes_prep_stale(pretrained, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "copy")
  shutil.copytree(pretrained, workdir)
  with pytest.raises(pipeline.PipelineError, match="stage prep needs .*pretrain/ from stage "
                     "pretrain, which was made under another config"):
    pipeline.run(pretrain_config(lr=1e-3), workdir, stages=["prep"])
