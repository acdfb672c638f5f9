"""Tests of the train step (global normalisation, sharding, accumulation) and the loop."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from visatb_jax import train
from visatb_jax.runtime import checkpoint
from visatb_jax.core import loss
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding
from visatb_jax.core import weighting
from visatb_jax.train import step as step_lib
from visatb_jax.train import vitw_step

VOCAB, DIM, SEQ, ROWS, TASKS = 16, 8, 6, 8, ("caption", "vqa")
TRACES = {"n": 0}  # incremented by Python only while jit traces the model


class VisionTower(nnx.Module):
  """Frozen by default; its parameter feeds every token, so gradients reach it."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(
        3, DIM, use_bias=False, rngs=rngs,
        kernel_init=lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * 0.5)

  def __call__(self, images):
    return self.linear_1(jnp.mean(images, axis=(1, 2, 3)))  # [B, M, H, W, 3] → [B, D]


class TinyModel(nnx.Module):
  """Stand-in following the Model contract: embed + image feature + MLP + head (modules named as
  in the real model, so that the sharding rules cover every parameter)."""

  def __init__(self, rngs: nnx.Rngs):
    self.vision_tower = VisionTower(rngs)
    self.embed_tokens = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.up_proj = nnx.Linear(DIM, DIM, rngs=rngs)
    self.lm_head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, input_ids, images=None, positions=None, segment_ids=None):
    TRACES["n"] += 1
    h = self.embed_tokens(input_ids)
    if images is not None:
      h = h + self.vision_tower(images)[:, None, :]
    h = h + jnp.tanh(self.up_proj(h))
    return self.lm_head(h)


def make_batch(seed: int = 0, rows: int = ROWS, task_of_row=None) -> dict[str, np.ndarray]:
  """Batch contract by hand; uneven loss tokens per row so that per-shard normalisation
  would give a different loss than global normalisation. Row r belongs to task r % 2 unless
  `task_of_row` says otherwise."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((rows, SEQ), np.float32)
  for r in range(rows):
    mask[r, SEQ - 1 - (r % (SEQ - 1)):] = 1.0  # 1 .. SEQ-1 loss tokens
  task_of_row = (np.arange(rows) % len(TASKS) if task_of_row is None
                 else np.asarray(task_of_row))
  return {
      "input_ids": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32),
      "targets": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32),
      "loss_mask": mask,
      "task_ids": np.where(mask > 0, task_of_row[:, None], -1).astype(np.int32),
      "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy(),
      "segment_ids": np.ones((rows, SEQ), np.int32),
      "images": rng.normal(size=(rows, 1, 2, 2, 3)).astype(np.float32),
  }


def new_model(seed: int = 0) -> TinyModel:
  return TinyModel(nnx.Rngs(seed))


LAM = np.array([2.0, 0.5], np.float32)


def one_step(mesh, *, accum_steps=1, tla=False, tx=None, lam=LAM, batch=None):
  """One train step from the same initial model; returns (old state, new state, metrics)."""
  tx = tx or optax.sgd(1.0)  # plain SGD: the update is exactly −grads
  graphdef, params, frozen = train.split_model(new_model())
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  step = train.make_train_step(graphdef, tx, mesh=mesh, accum_steps=accum_steps, tla=tla)
  batch = sharding.shard_batch(make_batch(0) if batch is None else batch, mesh)
  new_state, metrics = step(state, sharding.replicate(frozen, mesh), batch, jnp.asarray(lam), 1.0)
  return state, new_state, jax.device_get(metrics)


def assert_rel_close(a, b, tol=1e-5):
  """Normwise relative error of every leaf pair ≤ tol."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= tol * max(np.max(np.abs(y)), 1e-30), (x, y)


def grads_of(old, new):
  return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), old.params, new.params)




def test_step_matches_host_reference(meshes):
  # The jitted step's loss is the VITW loss of the whole batch computed eagerly.
  _, _, metrics = one_step(meshes[1])
  b = make_batch(0)
  logits = new_model()(b["input_ids"], images=b["images"])
  weighted, weight, task_sum, task_count = loss.token_loss(
      logits, b["targets"], b["loss_mask"], b["task_ids"], LAM)
  np.testing.assert_allclose(metrics["loss"], weighted / weight, rtol=1e-6)
  np.testing.assert_allclose(metrics["per_task_loss"], task_sum / task_count, rtol=1e-6)
  np.testing.assert_array_equal(metrics["per_task_count"], task_count)
  assert int(metrics["tokens"]) == int(b["loss_mask"].sum())
  np.testing.assert_array_equal(metrics["lam"], LAM)


def test_sharded_step_equals_single_device(meshes):
  old1, new1, m1 = one_step(meshes[1])
  old8, new8, m8 = one_step(meshes[8])
  assert len(jax.tree.leaves(new8.params)[0].sharding.device_set) == 8
  assert_rel_close(m8["loss"], m1["loss"])
  assert_rel_close(m8["per_task_loss"], m1["per_task_loss"])
  assert_rel_close(grads_of(old8, new8), grads_of(old1, new1))
  # The test is sensitive: normalising per shard (one row per device) and averaging
  # would give a visibly different loss.
  b = make_batch(0)
  logits = new_model()(b["input_ids"], images=b["images"])
  per_row = [loss.token_loss(logits[r:r + 1], b["targets"][r:r + 1], b["loss_mask"][r:r + 1],
                             b["task_ids"][r:r + 1], LAM) for r in range(ROWS)]
  per_shard_mean = np.mean([w / s for w, s, _, _ in per_row])
  assert abs(per_shard_mean - m1["loss"]) > 1e-3


@pytest.mark.parametrize("tla,rows,accum", [(False, 8, 4), (True, 8, 4), (False, 16, 2)])
def test_accumulation_equals_full_batch(meshes, tla, rows, accum):
  # rows=16, accum=2: each micro-batch of 8 rows is itself spread over the 8 devices.
  batch = make_batch(0, rows=rows)
  lam = np.ones_like(LAM) if tla else LAM
  old1, new1, m1 = one_step(meshes[8], accum_steps=1, tla=tla, batch=batch, lam=lam)
  old4, new4, m4 = one_step(meshes[8], accum_steps=accum, tla=tla, batch=batch, lam=lam)
  assert_rel_close(m4["loss"], m1["loss"])
  assert_rel_close(m4["per_task_count"], m1["per_task_count"])
  assert_rel_close(m4["grad_norm"], m1["grad_norm"])
  assert_rel_close(grads_of(old4, new4), grads_of(old1, new1))
  if tla:
    # TLA over the global batch: λ_k = 1/count_k and loss = mean of the per-task means.
    np.testing.assert_allclose(m4["lam"], 1.0 / m1["per_task_count"], rtol=1e-6)
    np.testing.assert_allclose(m4["loss"], np.mean(m1["per_task_loss"]), rtol=1e-5)


def test_tla_keeps_base_weights(meshes):
  """TLA with base weights w (a fixed-weight task): λ_k = w_k / count_k, so the loss is the
  w-weighted mean of the per-task means."""
  _, _, m = one_step(meshes[8], tla=True, lam=LAM)
  np.testing.assert_allclose(m["lam"], LAM / m["per_task_count"], rtol=1e-6)
  want = np.sum(LAM * m["per_task_loss"]) / np.sum(LAM)
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)


def test_new_lambda_does_not_recompile(meshes):
  tx = optax.sgd(0.1)
  graphdef, params, frozen = train.split_model(new_model())
  mesh = meshes[8]
  state = sharding.replicate(train.init_train_state(params, tx), mesh)
  frozen = sharding.replicate(frozen, mesh)
  step = train.make_train_step(graphdef, tx, mesh=mesh)
  batch = sharding.shard_batch(make_batch(0), mesh)
  compiles = []

  def on_event(name, _, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    TRACES["n"] = 0
    # The loop passes a fresh numpy λ every step, as here.
    _, m_a = step(state, frozen, batch, np.array([1.0, 1.0], np.float32), 1.0)
    traces, n_compiles = TRACES["n"], len(compiles)
    assert traces >= 1 and n_compiles >= 1
    _, m_b = step(state, frozen, batch, np.array([3.0, 0.2], np.float32), 1.0)
    _, m_c = step(state, frozen, batch, np.array([0.5, 4.0], np.float32), 1.0)
    assert TRACES["n"] == traces and len(compiles) == n_compiles
    assert step._cache_size() == 1  # pylint: disable=protected-access
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert len({float(m["loss"]) for m in (m_a, m_b, m_c)}) == 3  # λ is actually used


def test_frozen_tower_untouched_and_without_optimizer_state(meshes):
  tx = optax.adamw(1e-2)
  graphdef, params, frozen = train.split_model(new_model())
  param_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert not any("vision_tower" in jax.tree_util.keystr(p) for p in param_paths)
  assert any("vision_tower" in jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
  state = train.init_train_state(params, tx)
  # Adam's mu and nu mirror exactly the trainable params, nothing of the tower.
  opt_paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(
      state.opt_state) if np.ndim(x) > 0]
  assert not any("vision_tower" in p for p in opt_paths)
  assert len(opt_paths) == 2 * len(param_paths)
  n_trainable = sum(np.size(x) for x in jax.tree.leaves(params))
  assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) == 2 * n_trainable + 1

  mesh = meshes[1]
  frozen_before = jax.tree.map(np.asarray, frozen)
  step = train.make_train_step(graphdef, tx, mesh=mesh)
  new_state, _ = step(sharding.replicate(state, mesh), sharding.replicate(frozen, mesh),
                      sharding.shard_batch(make_batch(0), mesh), jnp.asarray(LAM), 1.0)
  tower = frozen["vision_tower"]["linear_1"]["kernel"][...]
  np.testing.assert_array_equal(tower, frozen_before["vision_tower"]["linear_1"]["kernel"][...])
  assert not np.array_equal(new_state.params["lm_head"]["kernel"][...],
                            params["lm_head"]["kernel"][...])
  # Unfrozen, the tower becomes trainable.
  _, params_all, _ = train.split_model(new_model(), freeze_vision_tower=False)
  assert "vision_tower" in params_all


def test_optimizer_schedule():
  cfg = {"steps": 100, "lr": 1e-3, "warmup_frac": 0.1}
  schedule = train.make_schedule(cfg)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(55), 5e-4, rtol=1e-5)  # cosine midpoint
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
  # Clipping: a huge gradient gives the same first Adam step as a unit-norm one.
  tx = train.make_optimizer({**cfg, "clip_norm": 1.0, "warmup_frac": 0.0})
  p = {"w": jnp.ones(3)}
  u_big, _ = tx.update({"w": jnp.array([300.0, 0.0, 0.0])}, tx.init(p), p)
  u_unit, _ = tx.update({"w": jnp.array([1.0, 0.0, 0.0])}, tx.init(p), p)
  np.testing.assert_allclose(u_big["w"], u_unit["w"], rtol=1e-6)
  # Unit learning rate (the step scales by the schedule's value): Adam's first update is
  # −g/(|g| + eps) per coordinate, so −1 where the gradient is non-zero.
  np.testing.assert_allclose(u_unit["w"], [-1.0, 0.0, 0.0], atol=1e-4)


def test_one_compiled_step_serves_runs_of_any_length(tmp_path):
  """The schedule is an argument: runs of different lengths reuse one compiled step."""
  cfg_short = {**CFG, "steps": 2, "accum_steps": 1}
  cfg_long = {**cfg_short, "steps": 4, "lr": 3e-2}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  vitw_step.cached_train_step.cache_clear()
  train.train(new_model(), make_batch, LAM, cfg_short, tmp_path / "a", mesh=mesh)
  assert vitw_step.cached_train_step.cache_info().misses == 1
  train.train(new_model(), make_batch, LAM, cfg_long, tmp_path / "b", mesh=mesh)
  info = vitw_step.cached_train_step.cache_info()
  assert (info.misses, info.hits) == (1, 1)  # the second run got the first run's step function
  assert info.currsize == 1


# ---------------------------------------------------------------------------------- loop

CFG = {"steps": 6, "batch_size": ROWS, "accum_steps": 2, "lr": 1e-2, "warmup_frac": 0.2,
       "clip_norm": 1.0, "weight_decay": 0.0, "checkpoint_every": 3, "log_every": 1,
       "seed": 0, "freeze_vision_tower": True}
TIMING = ("tokens_per_s", "elapsed_s")


class Crash(Exception):
  pass


def deterministic(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def params_of(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_resume_after_crash_is_identical(tmp_path, meshes):
  mesh = meshes[8]
  straight = train.train(new_model(), make_batch, LAM, CFG, tmp_path / "a", mesh=mesh,
                         task_names=TASKS)

  def crashing_batch(i):
    if i == 4:  # after step 4 was logged; the last checkpoint is step 3
      raise Crash()
    return make_batch(i)

  with pytest.raises(Crash):
    train.train(new_model(), crashing_batch, LAM, CFG, tmp_path / "b", mesh=mesh,
                task_names=TASKS)
  log_b = tmp_path / "b" / metrics_log.METRICS_FILE
  assert [r["step"] for r in metrics_log.read_metrics(log_b)] == [1, 2, 3, 4]
  # "New process": everything rebuilt from scratch, only the workdir survives.
  resumed = train.train(new_model(), make_batch, LAM, CFG, tmp_path / "b", mesh=mesh,
                        task_names=TASKS)

  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  rec_a = metrics_log.read_metrics(tmp_path / "a" / metrics_log.METRICS_FILE)
  rec_b = metrics_log.read_metrics(log_b)
  assert [r["step"] for r in rec_b] == [1, 2, 3, 4, 5, 6]
  assert deterministic(rec_b) == deterministic(rec_a)
  first = rec_a[0]
  assert set(first["per_task_loss"]) == set(TASKS) and first["lambda"] == {"caption": 2.0,
                                                                            "vqa": 0.5}
  assert first["lr"] == 0.0 and rec_a[1]["lr"] > 0  # warm-up starts at 0
  assert all(r["tokens_per_s"] > 0 for r in rec_a)
  # Checkpoints: the last two kept, and the model was really trained.
  assert checkpoint.Checkpointer(tmp_path / "a" / "checkpoints").all_steps() == [3, 6]
  assert rec_a[-1]["loss"] < rec_a[0]["loss"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "a" / "tb"))
  # Training further with the same config is a no-op that returns the trained model.
  again = train.train(new_model(), make_batch, LAM, CFG, tmp_path / "a", mesh=mesh,
                      task_names=TASKS)
  jax.tree.map(np.testing.assert_array_equal, params_of(again), params_of(straight))


class CountingLoader:
  """A stateful loader: batch k is make_batch(100 + k); its state is the next k."""

  def __init__(self, crash_at=None):
    self.next_index, self.crash_at, self.served = 0, crash_at, []

  def __iter__(self):
    return self

  def __next__(self):
    if self.next_index == self.crash_at:
      raise Crash()
    self.served.append(self.next_index)
    self.next_index += 1
    return make_batch(100 + self.next_index - 1)

  def get_state(self):
    return {"next_index": self.next_index}

  def set_state(self, state):
    self.next_index = int(state["next_index"])


def test_stateful_loader_resumes_at_the_saved_batch(tmp_path, meshes):
  mesh = meshes[8]
  straight = CountingLoader()
  a = train.train(new_model(), straight, LAM, CFG, tmp_path / "a", mesh=mesh, task_names=TASKS)
  assert straight.served == [0, 1, 2, 3, 4, 5]
  with pytest.raises(Crash):
    train.train(new_model(), CountingLoader(crash_at=4), LAM, CFG, tmp_path / "b", mesh=mesh,
                task_names=TASKS)
  # Each process's position sits in the checkpoint (grain's per-process JSON files).
  data_dir = tmp_path / "b" / "checkpoints" / "3" / checkpoint.DATA_ITEM
  assert json.loads((data_dir / "process_0-of-1.json").read_text()) == {"next_index": 3}
  resumed_loader = CountingLoader()  # a fresh loader, as after a restart
  b = train.train(new_model(), resumed_loader, LAM, CFG, tmp_path / "b", mesh=mesh,
                  task_names=TASKS)
  assert resumed_loader.served == [3, 4, 5]
  jax.tree.map(np.testing.assert_array_equal, params_of(b), params_of(a))
  # A stateless run's checkpoint cannot position a stateful loader.
  train.train(new_model(), make_batch, LAM, dict(CFG, steps=3), tmp_path / "c", mesh=mesh,
              task_names=TASKS)
  with pytest.raises(ValueError, match="holds no input iterator state"):
    train.train(new_model(), CountingLoader(), LAM, CFG, tmp_path / "c", mesh=mesh,
                task_names=TASKS)


@pytest.mark.parametrize("method", ["nash", "pcgrad"])
def test_gradient_method_in_the_loop_resumes_identically(tmp_path, meshes, method):
  """Nash-MTL's α and PCGrad's key live in the checkpoint: a resumed run is the same run."""
  mesh = meshes[8]
  cfg = dict(CFG, accum_steps=1)
  gradient = train.TrainMethod.gradient(method, np.ones(len(LAM)))
  straight = train.train(new_model(), make_batch, gradient, cfg, tmp_path / "a", mesh=mesh,
                         task_names=TASKS)

  def crashing_batch(i):
    if i == 4:
      raise Crash()
    return make_batch(i)

  with pytest.raises(Crash):
    train.train(new_model(), crashing_batch, gradient, cfg, tmp_path / "b", mesh=mesh,
                task_names=TASKS)
  assert checkpoint.GRADMTL_ITEM in checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").items()
  logged = metrics_log.read_metrics(tmp_path / "a" / metrics_log.METRICS_FILE)
  assert all(set(r["mtl_weights"]) == set(TASKS) for r in logged)
  resumed = train.train(new_model(), make_batch, gradient, cfg, tmp_path / "b", mesh=mesh,
                        task_names=TASKS)
  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  plain = train.train(new_model(), make_batch, LAM, CFG, tmp_path / "c", mesh=mesh,
                      task_names=TASKS)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params_of(plain)), jax.tree.leaves(params_of(straight)), strict=True))
  with pytest.raises(ValueError, match="written with a gradient method"):
    train.train(new_model(), make_batch, LAM, dict(CFG, steps=7), tmp_path / "b", mesh=mesh,
                task_names=TASKS)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, meshes):
  def poisoned_batch(i):
    b = make_batch(i)
    if i == 4:  # step 5: NaN images on the rows of task "vqa" only
      b["images"][1::2] = np.nan
    return b

  cfg = {**CFG, "steps": 8, "checkpoint_every": 2}
  with pytest.raises(train.TrainingDiverged, match=r"step 5\b.*vqa") as err:
    train.train(new_model(), poisoned_batch, LAM, cfg, tmp_path, mesh=meshes[1],
                task_names=TASKS)
  assert "caption" not in str(err.value)
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.all_steps() == [2, 4]
  records = metrics_log.read_metrics(tmp_path / metrics_log.METRICS_FILE)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in records)
  ckpt.close()


def test_metrics_truncation_skips_torn_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
  metrics_log.truncate_after(path, 2)
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [1, 2]


@pytest.mark.parametrize("mesh_config", [{"data": 2, "fsdp": 2, "tensor": 2},
                                         {"data": 1, "fsdp": 8, "tensor": 1},
                                         {"data": 2, "fsdp": 1, "tensor": 4}])
def test_step_on_multi_axis_meshes_equals_one_device(meshes, mesh_config):
  """data/fsdp/tensor meshes, parameters placed by the logical-axis rules, 2 micro-batches."""
  mesh = sharding.make_mesh(mesh_config)
  tx = optax.sgd(1.0)  # the update is exactly −grads
  graphdef, params, frozen = train.split_model(new_model())
  state = train.init_train_state(params, tx)
  state_sh, frozen_sh = sharding.param_shardings(state, mesh), sharding.param_shardings(frozen, mesh)
  step = train.make_train_step(graphdef, tx, mesh=mesh, accum_steps=2, state_sharding=state_sh,
                               frozen_sharding=frozen_sh)
  new_state, metrics = step(jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh),
                            sharding.shard_batch(make_batch(0), mesh), jnp.asarray(LAM), 1.0)
  old1, new1, m1 = one_step(meshes[1])
  assert_rel_close(grads_of(old1, new1), grads_of(train.init_train_state(params, tx), new_state))
  np.testing.assert_allclose(metrics["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["per_task_loss"], m1["per_task_loss"], rtol=1e-5)


# ------------------------------------------------------------------------ weighting strategies

# Short runs on one device; windows small enough that every dynamic λ moves within them.
WCFG = {**CFG, "accum_steps": 1}
STRATEGY_OPTIONS = {"rlw": {}, "dwa": {"window": 1}, "igb": {"base_start": 1, "base_end": 3}}


def lambdas(records):
  return np.array([[r["lambda"][t] for t in TASKS] for r in records], np.float32)


def replay(strategy, records, seed):
  """The λ of every logged step, from the strategy called by hand on the logged losses."""
  state = strategy.init(len(TASKS))
  out = []
  for index, r in enumerate(records):
    assert r["step"] == index + 1
    out.append(np.asarray(state["lam"]))
    losses = np.array([r["per_task_loss"][t] for t in TASKS], np.float32)
    counts = np.array([r["per_task_count"][t] for t in TASKS], np.float32)
    _, state = strategy.update(state, losses, index, train.weighting_rng(seed, index),
                               per_task_count=counts)
  return np.stack(out)


def test_ew_strategy_equals_no_strategy(tmp_path, meshes):
  mesh, ones = meshes[1], np.ones(len(TASKS), np.float32)
  plain = train.train(new_model(), make_batch, ones, WCFG, tmp_path / "plain", mesh=mesh,
                      task_names=TASKS)
  ew_method = train.TrainMethod.from_strategy(weighting.get_strategy("ew"), ones)
  ew = train.train(new_model(), make_batch, ew_method, WCFG, tmp_path / "ew", mesh=mesh,
                   task_names=TASKS)
  jax.tree.map(np.testing.assert_array_equal, params_of(ew), params_of(plain))
  rec_plain, rec_ew = (metrics_log.read_metrics(tmp_path / d / metrics_log.METRICS_FILE)
                       for d in ("plain", "ew"))
  assert deterministic(rec_ew) == deterministic(rec_plain)
  # The new layout: the weighting state is a second item of the same step.
  assert checkpoint.Checkpointer(tmp_path / "ew" / "checkpoints").items() == {"state", "weighting"}
  assert checkpoint.Checkpointer(tmp_path / "plain" / "checkpoints").items() == {"state"}
  # Resuming across a change of weighting would change the λ sequence: refused.
  with pytest.raises(ValueError, match="without a weighting strategy"):
    train.train(new_model(), make_batch, ew_method, WCFG, tmp_path / "plain", mesh=mesh)
  with pytest.raises(ValueError, match="called without a strategy"):
    train.train(new_model(), make_batch, ones, WCFG, tmp_path / "ew", mesh=mesh)


@pytest.mark.parametrize("name", sorted(STRATEGY_OPTIONS))
def test_strategy_lambda_sequence_is_the_strategy_on_logged_losses(tmp_path, meshes, name):
  strategy = weighting.get_strategy(name, **STRATEGY_OPTIONS[name])
  train.train(new_model(), make_batch, train.TrainMethod.from_strategy(strategy, LAM), WCFG,
              tmp_path, mesh=meshes[1], task_names=TASKS)
  records = metrics_log.read_metrics(tmp_path / metrics_log.METRICS_FILE)
  logged = lambdas(records)
  assert len(logged) == WCFG["steps"]
  # `lam` gave only T: its values [2, 0.5] are never used.
  np.testing.assert_array_equal(logged[0], [1.0, 1.0])
  assert np.ptp(logged[-1]) > 1e-3  # the dynamic rule is active by the last step
  np.testing.assert_allclose(logged, replay(strategy, records, WCFG["seed"]), rtol=1e-6)


@pytest.mark.parametrize("name", ["dwa", "rlw"])
def test_resume_with_strategy_is_identical(tmp_path, meshes, name):
  strategy = weighting.get_strategy(name, **STRATEGY_OPTIONS[name])
  run = functools.partial(train.train, mesh=meshes[1], task_names=TASKS)
  method = train.TrainMethod.from_strategy(strategy, LAM)
  straight = run(new_model(), make_batch, method, WCFG, tmp_path / "a")

  def crashing_batch(i):
    if i == 4:  # the last checkpoint is step 3
      raise Crash()
    return make_batch(i)

  with pytest.raises(Crash):
    run(new_model(), crashing_batch, method, WCFG, tmp_path / "b")
  # "New process": a fresh strategy object too (its jitted update is compiled anew).
  fresh = weighting.get_strategy(name, **STRATEGY_OPTIONS[name])
  resumed = train.train(new_model(), make_batch, train.TrainMethod.from_strategy(fresh, LAM),
                        WCFG, tmp_path / "b", mesh=meshes[1], task_names=TASKS)
  jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
  rec_a, rec_b = (metrics_log.read_metrics(tmp_path / d / metrics_log.METRICS_FILE)
                  for d in ("a", "b"))
  assert [r["step"] for r in rec_b] == [1, 2, 3, 4, 5, 6]
  assert deterministic(rec_b) == deterministic(rec_a)
  # Sensitive: the steps after the resume point train with a λ that is not the initial one,
  # so a weighting state not restored (λ = 1 again) would differ.
  assert all(np.ptp(row) > 1e-3 for row in lambdas(rec_a)[3:])
  # restore_model reads the params of a checkpoint that also holds a weighting state.
  restored = train.restore_model(new_model(), WCFG, tmp_path / "a")
  jax.tree.map(np.testing.assert_array_equal, params_of(restored), params_of(straight))


def test_restore_model_reads_legacy_single_item_checkpoint(tmp_path):
  """Checkpoints written before the composite layout (orbax's unnamed `default` item)."""
  model = new_model(seed=1)
  _, params, _ = train.split_model(model)
  state = train.init_train_state(params, train.make_optimizer(WCFG))
  manager = ocp.CheckpointManager(os.path.abspath(tmp_path / "checkpoints"))
  manager.save(3, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.items() == {"state"}
  ckpt.close()
  restored = train.restore_model(new_model(seed=0), WCFG, tmp_path)
  # Only the trainable params are in a checkpoint; the frozen tower stays the caller's.
  trainable = lambda m: jax.tree.map(np.asarray, train.split_model(m)[1])
  jax.tree.map(np.testing.assert_array_equal, trainable(restored), trainable(model))


def _tiny_llava_config(**fields):
  from visatb_jax.model.config import LlavaConfig
  return LlavaConfig.from_dict({
      "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                 "num_hidden_layers": 1, "num_attention_heads": 2},
      "text": {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
      "image_token_id": 3, **fields})


def _llava_batch():
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((4, 4), 3), rng.integers(4, 40, (4, 12))], 1).astype(np.int32)
  mask = np.zeros(ids.shape, np.float32)
  mask[:, 6:-1] = 1.0
  return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
          "task_ids": np.where(mask > 0, np.arange(4)[:, None] % 2, -1).astype(np.int32),
          "images": rng.normal(size=(4, 1, 16, 16, 3)).astype(np.float32)}


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_bf16_compute_keeps_float32_master_weights_and_state(meshes):
  from visatb_jax.model.llava import LlavaForConditionalGeneration
  out = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, params, frozen = train.split_model(LlavaForConditionalGeneration(
        _tiny_llava_config(dtype=dtype, param_dtype="float32"), rngs=nnx.Rngs(0)))
    tx = train.make_optimizer({"clip_norm": 1.0, "weight_decay": 0.0})
    state = train.init_train_state(params, tx)
    step = train.make_train_step(graphdef, tx, mesh=meshes[1])
    new, metrics = step(state, frozen, _llava_batch(), jnp.asarray(LAM), 1e-3)
    dtypes = {x.dtype for x in jax.tree.leaves((new.params, new.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtype  # master weights and Adam moments
    out[dtype] = jax.device_get(metrics)
  # bf16 matmuls: the loss moves by bf16 rounding only.
  np.testing.assert_allclose(out["bfloat16"]["loss"], out["float32"]["loss"], rtol=2e-2)
  assert out["bfloat16"]["loss"] != out["float32"]["loss"]


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_chunked_cross_entropy_step_equals_full_logits_step(meshes):
  """ce_chunk_size: same loss and update as the full-logits step on a (tiny) real LLaVA."""
  from visatb_jax.model.llava import LlavaForConditionalGeneration
  config = _tiny_llava_config()
  batch = _llava_batch()
  results = []
  for chunk in (0, 7):
    graphdef, params, frozen = train.split_model(
        LlavaForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    tx = optax.sgd(1.0)
    step = train.make_train_step(graphdef, tx, mesh=meshes[1], ce_chunk_size=chunk)
    state = train.init_train_state(params, tx)
    new, metrics = step(state, frozen, batch, jnp.asarray(LAM), 1.0)
    results.append((jax.device_get(metrics), grads_of(state, new)))
  (m_full, g_full), (m_chunk, g_chunk) = results
  np.testing.assert_allclose(m_chunk["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_chunk["per_task_loss"], m_full["per_task_loss"], rtol=1e-6)
  assert_rel_close(g_chunk, g_full)


def test_no_compilation_after_the_first_steps_of_a_run(tmp_path, meshes):
  """λ changes every step (RLW), the learning rate too, checkpoints are written: the train step is
  compiled once, and once the first step, the strategy's first update and orbax's first save have
  compiled their functions, nothing is lowered again."""
  lowerings = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *_, **__: lowerings.append(name)
      if name == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
  seen = []

  def get_batch(i):
    seen.append(len(lowerings))
    return make_batch(i)

  cfg = dict(CFG, steps=8, checkpoint_every=3)
  strategy = weighting.get_strategy("rlw")
  train.train(new_model(), get_batch, train.TrainMethod.from_strategy(strategy, LAM), cfg,
              tmp_path, mesh=meshes[8], task_names=TASKS)
  records = metrics_log.read_metrics(tmp_path / metrics_log.METRICS_FILE)
  assert len({json.dumps(r["lambda"]) for r in records}) == 8  # a new λ at every step
  # seen[k] counts lowerings before batch k; the first checkpoint is saved after batch 2.
  assert len(lowerings) > 0 and seen[3] == seen[-1] == len(lowerings), (seen, len(lowerings))
  graphdef, params, frozen = train.split_model(new_model())
  state = train.init_train_state(params, train.make_optimizer(cfg))
  # pylint: disable=protected-access
  step = vitw_step.cached_train_step(
      graphdef, train.TrainConfig.of(cfg).optimizer_spec, meshes[8], 2, False, 0,
      step_lib.flat_tree(sharding.param_shardings(state, meshes[8])),
      step_lib.flat_tree(sharding.param_shardings(frozen, meshes[8])), None)
  assert step._cache_size() == 1


def _qwen2vl_batch(image_format, rows=8, length=48):
  """Packed rows as the pipeline makes them for Qwen2-VL: two samples per row, images of two
  sizes (4 and 6 merged tokens) through `NativeImages`, M-RoPE positions restarting per sample."""
  from visatb_jax.data import packing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  sizes = [(56, 56), (56, 84)]
  examples = []
  for i in range(2 * rows):
    image = rng.integers(0, 256, sizes[i % 2] + (3,), dtype=np.uint8)
    n_img = image_format.num_tokens(image)
    ids = np.concatenate([rng.integers(10, 60, 3), [5], np.full(n_img, 3), [6],
                          rng.integers(10, 60, 12)]).astype(np.int32)
    mask = np.zeros(ids.size, bool)
    mask[-10:] = True
    examples.append(packing.Example(ids, mask, i % 2, [image]))
  rows_of = [[2 * r, 2 * r + 1] for r in range(rows)]
  return packing.rows_to_batch(examples, rows_of, seq_len=length, max_images=2, pad_id=0,
                               image_format=image_format)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_qwen2vl_trains_with_remat_chunked_ce_and_a_mesh_as_without(meshes):
  """Qwen2-VL through the same train step as LLaVA: full remat + chunked CE on 8 devices gives
  the loss and update of the plain single-device step; a frozen tower gets no update, and an
  unfrozen one does."""
  from visatb_jax.data import image_format  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import qwen2vl  # pylint: disable=g-import-not-at-top
  from visatb_jax.model.config import TextConfig  # pylint: disable=g-import-not-at-top
  config = qwen2vl.Qwen2VLConfig(
      vision=qwen2vl.Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=4,
                                         mlp_ratio=2),
      text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
      image_token_id=3, vision_start_token_id=5, vision_end_token_id=6, mrope_section=(2, 1, 1))
  batch = _qwen2vl_batch(image_format.NativeImages(image_token_id=3, max_pixels=56 * 84))
  assert batch["positions"].shape == (8, 3, 48) and batch["image_grid"].shape == (8, 2, 3)
  results = {}
  for name, remat, chunk, mesh, freeze in (("plain", False, 0, meshes[1], True),
                                           ("remat+chunked, 8 devices", True, 7, meshes[8], True),
                                           ("tower trained", False, 0, meshes[1], False)):
    model = qwen2vl.Qwen2VLForConditionalGeneration(config, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params, frozen = train.split_model(model, freeze_vision_tower=freeze)
    tx = optax.sgd(1.0)
    state = sharding.replicate(train.init_train_state(params, tx), mesh)
    step = train.make_train_step(graphdef, tx, mesh=mesh, ce_chunk_size=chunk)
    new, metrics = step(state, sharding.replicate(frozen, mesh), sharding.shard_batch(batch, mesh),
                        jnp.asarray(LAM), 1.0)
    results[name] = (jax.device_get(metrics), grads_of(state, new), frozen)
  (m_plain, g_plain, frozen), (m_fast, g_fast, _), (_, g_tower, _) = results.values()
  np.testing.assert_allclose(m_fast["loss"], m_plain["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_fast["per_task_loss"], m_plain["per_task_loss"], rtol=1e-5)
  assert_rel_close(g_fast, g_plain, tol=1e-4)
  assert "blocks" in frozen["visual"] and "blocks" not in g_plain["visual"]  # frozen tower
  tower = g_tower["visual"]["blocks"][0]["attn"]["qkv"]["kernel"]
  merger = g_plain["visual"]["merger"]["mlp"][0]["kernel"]
  assert np.abs(np.asarray(tower[...])).max() > 0 and np.abs(np.asarray(merger[...])).max() > 0
