"""Tests for LoRA on the language model: identity at init, merge parity, trainable state, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from visatb_jax import train
from visatb_jax.runtime import metrics_log
from visatb_jax.runtime import sharding
from visatb_jax.model import lora
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration

IMG = 3
CFG = LlavaConfig(
    vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    image_token_id=IMG)
P = CFG.num_image_tokens
RANK, ALPHA = 2, 8.0
# Hand-computed for CFG (hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers, tower width 32):
# rank * (in + out) per adapted Linear.
LORA_SIZES = {"q_proj": RANK * (32 + 32), "k_proj": RANK * (32 + 16), "v_proj": RANK * (32 + 16),
              "o_proj": RANK * (32 + 32), "gate_proj": RANK * (32 + 64),
              "up_proj": RANK * (32 + 64), "down_proj": RANK * (64 + 32)}
PROJECTOR_SIZE = (32 * 32 + 32) + (32 * 32 + 32)  # linear_1, linear_2 with biases.


def _model(seed: int = 0, **kw) -> LlavaForConditionalGeneration:
  return LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(seed), **kw)


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  t = lambda n: list(rng.integers(4, CFG.text.vocab_size, n))
  ids = jnp.asarray([t(2) + [IMG] * P + t(3), [IMG] * P + t(5)], jnp.int32)
  images = jnp.asarray(rng.normal(size=(2, 1, 16, 16, 3)), jnp.float32)
  return ids, images


IDS, IMAGES = _inputs()


@nnx.jit
def _fwd(model, ids, images):
  return model(ids, images)


def _logits(model, images: bool = True) -> np.ndarray:
  """Logits on IDS, with IMAGES or (cheaper to compile, where the tower is beside the point) not."""
  return np.asarray(_fwd(model, IDS, IMAGES if images else None))


def _flat(model) -> dict:
  return {p: v for p, v in nnx.to_flat_state(nnx.state(model))}


def _randomize_b(model, seed: int = 7) -> None:
  """Non-zero B everywhere (zero-initialised B would make every check below vacuous)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for layer in lora.lora_layers(model).values():
    b = layer.lora.lora_b
    b.set_value(0.05 * jax.random.normal(next(keys), b.shape, b.dtype))


def _size(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------- apply / merge


def test_zero_init_is_identity_and_keeps_hf_paths():
  plain = _model()
  before = _flat(plain)
  ref = _logits(plain)
  model = lora.apply_lora(plain, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  assert model is plain and lora.has_lora(model)
  np.testing.assert_array_equal(_logits(model), ref)
  after = _flat(model)
  # Every base parameter keeps its path (hence its HF name) and its value; only adapters are new.
  assert set(before) <= set(after)
  for p, v in before.items():
    assert type(after[p]) is nnx.Param
    np.testing.assert_array_equal(after[p].get_value(), v.get_value())
  new = {p: v for p, v in after.items() if p not in before}
  assert all(isinstance(v, nnx.LoRAParam) for v in new.values())
  # One A and one B per adapted Linear, stacked over the decoder layers as their kernels are.
  assert len(new) == 2 * 7
  layers = CFG.text.num_hidden_layers
  q = model.language_model.layers.self_attn.q_proj
  assert isinstance(q, nnx.LoRALinear) and isinstance(q, nnx.Linear)
  assert q.lora.lora_a.shape == (layers, 32, RANK) and q.lora.lora_b.shape == (layers, RANK, 32)
  assert q.lora_scaling == ALPHA / RANK
  np.testing.assert_array_equal(q.lora.lora_b[...], 0)
  assert float(jnp.abs(q.lora.lora_a[...]).max()) > 0
  assert not np.array_equal(q.lora.lora_a[0], q.lora.lora_a[1])  # Each layer its own A.
  # Only the language model is adapted.
  assert not lora.has_lora(model.vision_tower) and not lora.has_lora(model.multi_modal_projector)
  assert all(p[0] == "language_model" for p in lora.lora_layers(model))


def test_layer_math_by_hand():
  """y = x W + b + alpha/r · x A B for one layer, against numpy."""
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  linear.bias.set_value(jnp.arange(4.0))
  layer = lora.lora_linear_from(linear, rank=2, alpha=6.0, dropout=0.0, rngs=nnx.Rngs(1))
  layer.lora.lora_b.set_value(jnp.asarray([[1.0, 0, -1, 2], [0.5, 1, 0, 0]]))
  x = np.asarray([[1.0, 2, 3], [-1, 0, 0.5]], np.float32)
  w, a, b = (np.asarray(v, np.float64) for v in
             (linear.kernel[...], layer.lora.lora_a[...], layer.lora.lora_b[...]))
  want = x @ w + np.arange(4.0) + 3.0 * (x @ a @ b)
  np.testing.assert_allclose(layer(jnp.asarray(x)), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(layer.merged_kernel(), w + 3.0 * a @ b, atol=1e-6, rtol=0)
  assert layer.kernel is linear.kernel  # Shared, not copied.


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_equals_unmerged_and_restores_plain_model(family):
  cfg = CFG
  if family == "qwen2":  # q/k/v biases and tied embeddings: the bias path of the merge.
    import dataclasses
    cfg = dataclasses.replace(CFG, text=dataclasses.replace(
        CFG.text, attention_bias=True, tie_word_embeddings=True))
  plain = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
  plain_paths = set(_flat(plain))
  ref_graph = nnx.graphdef(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(5)))
  base = _logits(plain)
  model = lora.apply_lora(plain, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  _randomize_b(model)
  adapted = _logits(model)
  assert np.abs(adapted - base).max() > 1e-2  # The adapters do something.

  exported = {p: get() for p, _, get in lora.merged_params(model)}
  assert set(exported) == plain_paths and lora.has_lora(model)  # merged_params changes nothing.
  lora.merge_lora(model)
  assert not lora.has_lora(model)
  np.testing.assert_allclose(_logits(model), adapted, atol=1e-5, rtol=0)
  after = _flat(model)
  assert set(after) == plain_paths and all(type(v) is nnx.Param for v in after.values())
  for p, v in after.items():
    np.testing.assert_array_equal(v.get_value(), exported[p])
  assert all(type(m) is not lora.LoRALinear for _, m in nnx.iter_graph(model))
  assert nnx.graphdef(model) == ref_graph  # A plain model again, structure included.


def test_target_subset_and_bad_options():
  model = lora.apply_lora(_model(), rank=1, alpha=1, target_modules=("v_proj", "down_proj"),
                          rngs=nnx.Rngs(1))
  names = sorted({p[-1] for p in lora.lora_layers(model)})
  assert names == ["down_proj", "v_proj"]
  assert type(model.language_model.layers.self_attn.q_proj) is nnx.Linear
  with pytest.raises(ValueError, match="already has LoRA"):
    lora.apply_lora(model, rank=1, alpha=1, rngs=nnx.Rngs(1))

  fresh = _model()
  with pytest.raises(ValueError, match=r"unknown lora target_modules \['fc1', 'qproj'\]; "
                     r"valid: \['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                     r"'up_proj', 'down_proj'\]"):
    lora.apply_lora(fresh, rank=1, alpha=1, target_modules=("q_proj", "qproj", "fc1"),
                    rngs=nnx.Rngs(1))
  for kw, message in [({"rank": 0}, "rank"), ({"rank": 1.5}, "rank"), ({"alpha": 0}, "alpha"),
                      ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                      ({"target_modules": ()}, "empty")]:
    with pytest.raises(ValueError, match=message):
      lora.apply_lora(fresh, **{"rank": 1, "alpha": 1, **kw}, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="string 'q_proj'"):
    lora.apply_lora(fresh, rank=1, alpha=1, target_modules="q_proj", rngs=nnx.Rngs(1))
  assert not lora.has_lora(fresh)  # A refused call leaves the model alone.
  with pytest.raises(TypeError, match="language_model"):
    lora.apply_lora(fresh.vision_tower, rank=1, alpha=1, rngs=nnx.Rngs(1))


# ---------------------------------------------------------------- what the optimizer sees


@pytest.mark.parametrize("targets", [lora.LORA_TARGETS, ("q_proj", "v_proj")])
def test_trainable_state_and_adam_moments_cover_only_adapters_and_projector(targets):
  model = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, target_modules=targets,
                          rngs=nnx.Rngs(1))
  _, params, frozen = nnx.split(model, lora.trainable_filter(freeze_vision_tower=True, lora=True),
                                ...)
  want = CFG.text.num_hidden_layers * sum(LORA_SIZES[t] for t in targets) + PROJECTOR_SIZE
  assert _size(params) == want
  paths = [p for p, _ in nnx.to_flat_state(params)]
  assert all(p[-1] in ("lora_a", "lora_b") or p[0] == "multi_modal_projector" for p in paths)
  total = _size(nnx.state(model))
  assert _size(params) + _size(frozen) == total and _size(params) < total // 10

  opt_state = optax.adamw(1e-3).init(params)
  floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert sum(x.size for x in floats) == 2 * want  # mu and nu; nothing for the frozen base.
  # The trainer's own state builder gives the same.
  state = train.init_train_state(params, optax.adamw(1e-3))
  assert _size(state.opt_state) - 1 == 2 * want  # + the int32 step count.

  # Unfrozen tower: the tower joins; the LM base stays frozen.
  _, params, _ = nnx.split(model, lora.trainable_filter(freeze_vision_tower=False, lora=True), ...)
  assert _size(params) == want + _size(nnx.state(model.vision_tower))


@pytest.mark.parametrize("freeze", [True, False])
def test_filter_without_lora_is_the_trainers_rule(freeze):
  model = _model()
  ours = nnx.split(model, lora.trainable_filter(freeze, lora=False), ...)[1]
  theirs = train.split_model(model, freeze_vision_tower=freeze)[1]
  assert [p for p, _ in nnx.to_flat_state(ours)] == [p for p, _ in nnx.to_flat_state(theirs)]


def test_gradient_step_changes_only_adapters_and_projector():
  model = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  _randomize_b(model)  # So that A gets a gradient too.
  graphdef, params, frozen = nnx.split(model, lora.trainable_filter(True, lora=True), ...)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, frozen, opt_state):
    def loss(params):
      logits = nnx.merge(graphdef, params, frozen)(IDS, IMAGES)
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), grads

  new_params, grads = step(params, frozen, opt_state)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  new = _flat(nnx.merge(graphdef, new_params, frozen))
  for p, v in _flat(model).items():
    changed = not np.array_equal(new[p].get_value(), v.get_value())
    trainable = isinstance(v, nnx.LoRAParam) or p[0] == "multi_modal_projector"
    assert changed == trainable, p


# ---------------------------------------------------------------- dropout


def test_dropout_only_in_train_mode_and_reseedable():
  # Separate streams: the dropout seeds do not shift the `params` draws, so A matches.
  plain = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(params=1))
  model = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, dropout=0.5,
                          rngs=nnx.Rngs(params=1, dropout=2))
  for m in (plain, model):
    _randomize_b(m)
  ref = _logits(plain, images=False)
  # Built in eval mode: dropout off, same adapters (same seeds) -> same logits as without dropout.
  layer = model.language_model.layers.mlp.up_proj
  assert layer.lora_dropout.deterministic
  np.testing.assert_allclose(_logits(model, images=False), ref, atol=1e-6, rtol=0)
  # Dropout state is neither a parameter nor trainable.
  _, params, _ = nnx.split(model, lora.trainable_filter(True, lora=True), ...)
  assert not any("lora_dropout" in p for p, _ in nnx.to_flat_state(params))

  model.train()
  assert not layer.lora_dropout.deterministic
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, key):  # A train step's pattern: fresh keys on the split state, then merge.
    return nnx.merge(graphdef, lora.with_dropout_key(state, key))(IDS)

  a, b, c = (np.asarray(fwd(state, jax.random.key(k))) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - ref).max() > 1e-3
  lora.reseed_dropout(model, 1)  # The in-place form sets the same keys, one per layer.
  # Each adapted Linear holds one key per (stacked) layer: 7 Linears x 2 layers, all distinct.
  key_data = lambda state: [k for _, v in nnx.to_flat_state(nnx.state(state, lora.LoRADropoutKey))
                            for k in np.asarray(jax.random.key_data(v.get_value()))]
  keys = key_data(model)
  assert len(keys) == 7 * 2 and len({k.tobytes() for k in keys}) == 7 * 2
  for k, want in zip(keys, key_data(lora.with_dropout_key(state, 1))):
    np.testing.assert_array_equal(k, want)
  model.eval()
  np.testing.assert_allclose(_logits(model, images=False), ref, atol=1e-6, rtol=0)
  lora.merge_lora(model)
  assert all(type(v) is nnx.Param for v in _flat(model).values())  # No RNG state left.
  np.testing.assert_allclose(_logits(model, images=False), ref, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_remat_with_dropout_gradients():
  """Rematerialised layers (pure split/merge under jax.checkpoint) work with adapter dropout."""
  grads = []
  for remat in (False, True):
    model = lora.apply_lora(_model(remat=remat), rank=RANK, alpha=ALPHA, dropout=0.25,
                            rngs=nnx.Rngs(1))
    _randomize_b(model)
    model.train()
    graphdef, params, rest = nnx.split(model, lora.lora_filter, ...)

    @jax.jit
    def grad(params, rest, graphdef=graphdef):
      rest = lora.with_dropout_key(rest, jax.random.key(3))

      def loss(params):  # `rest` closed over, as train._loss_sums does with `frozen`.
        return jnp.mean(nnx.merge(graphdef, params, rest)(IDS) ** 2)
      return jax.grad(loss)(params)

    grads.append(grad(params, rest))
  for g, h in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-4)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 0


def test_train_loop_updates_only_adapters_and_projector(tmp_path):
  """train.train on a LoRA model: the split picks the adapters, the base stays as loaded."""
  model = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  before = {p: np.asarray(v.get_value()) for p, v in _flat(model).items()}
  _, trainable, _ = train.split_model(model)
  assert sum(x.size for x in jax.tree.leaves(trainable)) == (
      2 * sum(LORA_SIZES.values()) + PROJECTOR_SIZE)
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((4, P), IMG), rng.integers(4, 64, (4, 12))], axis=1)

  def batch(step):
    del step
    mask = np.zeros(ids.shape, np.float32)
    mask[:, P:-1] = 1.0
    return {"input_ids": ids.astype(np.int32), "targets": np.roll(ids, -1, 1).astype(np.int32),
            "loss_mask": mask, "task_ids": np.where(mask > 0, 0, -1).astype(np.int32),
            "images": rng.normal(size=(4, 1, 16, 16, 3)).astype(np.float32)}

  cfg = {"steps": 3, "lr": 1e-2, "checkpoint_every": 3, "log_every": 1}
  trained = train.train(model, batch, np.ones(1, np.float32), cfg, tmp_path,
                        mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  changed = {p for p, v in _flat(trained).items()
             if not np.array_equal(np.asarray(v.get_value()), before[p])}
  assert changed and all("lora" in map(str, p) or "multi_modal_projector" in p for p in changed)
  assert any("lora_b" in p for p in changed)


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_train_loop_draws_fresh_dropout_masks_per_step_reproducibly(tmp_path):
  """LoRA dropout in training: masks from (seed, step, micro-batch), so two runs are equal and a
  run differs from the same run without dropout; the model comes back in eval mode."""
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((4, P), IMG), rng.integers(4, 64, (4, 12))], axis=1)
  mask = np.zeros(ids.shape, np.float32)
  mask[:, P:-1] = 1.0
  batch = {"input_ids": ids.astype(np.int32), "targets": np.roll(ids, -1, 1).astype(np.int32),
           "loss_mask": mask, "task_ids": np.where(mask > 0, 0, -1).astype(np.int32),
           "images": rng.normal(size=(4, 1, 16, 16, 3)).astype(np.float32)}
  cfg = {"steps": 3, "lr": 1e-2, "checkpoint_every": 3, "log_every": 1, "accum_steps": 2}

  def run(name, dropout):
    model = lora.apply_lora(_model(), rank=RANK, alpha=ALPHA, dropout=dropout, rngs=nnx.Rngs(1))
    trained = train.train(model, lambda step: batch, np.ones(1, np.float32), cfg, tmp_path / name,
                          mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    losses = [r["loss"] for r in metrics_log.read_metrics(tmp_path / name / "metrics.jsonl")]
    return trained, losses

  a, losses_a = run("a", 0.5)
  b, losses_b = run("b", 0.5)
  _, losses_c = run("c", 0.0)
  assert losses_a == losses_b and losses_a != losses_c
  assert all(np.isfinite(losses_a))
  np.testing.assert_array_equal(_logits(a, images=False), _logits(b, images=False))
  # Back in eval mode: no dropout in the returned model's forward.
  np.testing.assert_array_equal(_logits(a, images=False), _logits(a, images=False))
