"""Tests for visatb_jax.sharding: meshes, logical-axis rules, sharded forward/grad, multi-host init.

Runs on the 8 simulated CPU devices of tests/conftest.py.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from visatb_jax.runtime import sharding
from visatb_jax.data import qwen2vl_image
from visatb_jax.model import qwen2vl
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration

IMG = 3
CFG = LlavaConfig(
    vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4),
    # attention_bias: exercises the bias rules; every sharded dim is divisible by 2.
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    # One layer everywhere keeps the two XLA compilations short; -1 makes the tower run it.
    image_token_id=IMG, vision_feature_layer=-1)
ROWS, LEN = 8, 16
# Less LLVM optimisation: the test programs run once, their compilation is what costs time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _devices():
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
  return devices[:8]


# ------------------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize("config, shape", [
    (None, (8, 1, 1)),
    ({"data": -1}, (8, 1, 1)),
    ({"data": 2, "fsdp": 4}, (2, 4, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 4}, (2, 4, 1)),  # data takes the rest when no axis is -1.
    ({"data": 2, "fsdp": -1}, (2, 4, 1)),
    ({"fsdp": -1, "tensor": 2}, (1, 4, 2)),  # data defaults to 1 when another axis is -1.
    (ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": -1}), (1, 1, 8)),
])
def test_make_mesh_shapes(config, shape):
  mesh = sharding.make_mesh(config, _devices())
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in _devices())


def test_make_mesh_default_uses_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.shape["data"] == len(jax.devices())


@pytest.mark.parametrize("config, match", [
    ({"data": 3}, r"data=3, fsdp=1, tensor=1.*product of the axis sizes is 3.*8 devices"),
    ({"data": 2, "fsdp": 2}, r"product of the axis sizes is 4.*8 devices"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, r"fixed axes' product 3 does not divide the 8 devices"),
    ({"data": 0}, r"data=0 must be a positive integer or -1"),
    ({"data": 2.0, "fsdp": 4}, r"data=2.0"),
    ({"fdsp": 8}, r"unknown field.*fdsp"),
])
def test_make_mesh_errors(config, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(config, _devices())


# --------------------------------------------------------------------------------- logical axes


def test_logical_to_spec_divisibility_and_reuse():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  # Divisible: sharded as the rules say.
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
  # 7 rows: no divisor, replicated; 6 cols: the tuple (data, fsdp) falls back to its prefix.
  assert sharding.logical_to_spec(("embed", "mlp"), (7, 3), mesh) == P()
  assert sharding.logical_to_spec(("batch",), (8,), mesh) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")
  assert sharding.logical_to_spec(("batch",), (3,), mesh) == P()
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_spec(("heads", "vocab"), (4, 4), mesh) == P("tensor")
  rules = sharding.logical_rules({"vocab": None})
  assert sharding.logical_to_spec(("embed", "vocab"), (8, 8), mesh, rules) == P("fsdp")
  with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
    sharding.logical_to_spec(("nope",), (8,), mesh)


def test_param_logical_axes_of_every_parameter(model):
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  axes = {path: sharding.param_logical_axes(path, v[...].shape, strict=True)
          for path, v in flat.items()}
  assert len(axes) == len(flat) > 40
  for path, a in axes.items():
    assert len(a) == flat[path][...].ndim, path
  lm = ("language_model", "layers")  # Stacked layers: the leading layer axis stays unsharded.
  expected = {
      lm + ("self_attn", "q_proj", "kernel"): (None, "embed", "heads"),
      lm + ("self_attn", "q_proj", "bias"): (None, "heads"),
      lm + ("self_attn", "k_proj", "kernel"): (None, "embed", "kv_heads"),
      lm + ("self_attn", "v_proj", "bias"): (None, "kv_heads"),
      lm + ("self_attn", "o_proj", "kernel"): (None, "heads", "embed"),
      lm + ("mlp", "gate_proj", "kernel"): (None, "embed", "mlp"),
      lm + ("mlp", "up_proj", "kernel"): (None, "embed", "mlp"),
      lm + ("mlp", "down_proj", "kernel"): (None, "mlp", "embed"),
      lm + ("input_layernorm", "scale"): (None, "norm"),
      ("language_model", "norm", "scale"): ("norm",),
      ("language_model", "embed_tokens", "embedding"): ("vocab", "embed"),
      ("lm_head", "kernel"): ("embed", "vocab"),
      ("multi_modal_projector", "linear_1", "kernel"): ("embed", "mlp"),
      ("multi_modal_projector", "linear_2", "bias"): ("embed",),
      ("vision_tower", "vision_model", "encoder", "layers", 0, "self_attn", "k_proj", "kernel"):
          ("embed", "heads"),
      ("vision_tower", "vision_model", "encoder", "layers", 0, "mlp", "fc2", "kernel"):
          ("mlp", "embed"),
      ("vision_tower", "vision_model", "pre_layrnorm", "bias"): ("norm",),
      ("vision_tower", "vision_model", "encoder", "layers", 0, "layer_norm2", "scale"): ("norm",),
      ("vision_tower", "vision_model", "embeddings", "patch_embedding", "kernel"):
          (None, None, None, "embed"),
      ("vision_tower", "vision_model", "embeddings", "position_embedding", "embedding"):
          (None, "embed"),
  }
  for path, want in expected.items():
    assert axes[path] == want, path
  # Other path spellings give the same answer; unknown params are replicated unless strict.
  assert sharding.param_logical_axes("lm_head.kernel", (32, 64)) == ("embed", "vocab")
  assert sharding.param_logical_axes(("layers", "q_proj", "kernel"), (3, 32, 32)) == (
      None, "embed", "heads")  # A stacked-layers axis stays unsharded.
  assert sharding.param_logical_axes(("lora", "lora_a"), (32, 4)) == (None, None)
  with pytest.raises(ValueError, match="no sharding rule for parameter lora.lora_a"):
    sharding.param_logical_axes(("lora", "lora_a"), (32, 4), strict=True)
  # A LoRA adapter follows the layer it adapts: A on its input axis, B on its output axis.
  assert sharding.param_logical_axes(("mlp", "down_proj", "lora", "lora_a"), (64, 2),
                                     strict=True) == ("mlp", None)
  assert sharding.param_logical_axes(("self_attn", "q_proj", "lora", "lora_b"), (2, 32),
                                     strict=True) == (None, "heads")


def test_a_parameter_no_rule_covers_is_an_error_naming_it():
  """Replicating an unknown parameter by accident would cost its whole size on every device."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Odd(nnx.Module):
    def __init__(self):
      self.lm_head = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
      self.mystery = nnx.Param(jnp.zeros((4, 4)))
      self.counter = nnx.Variable(jnp.zeros((3,), jnp.int32))  # not a parameter: replicated

  mesh = sharding.make_mesh({"data": -1}, _devices())
  state = nnx.state(Odd())
  with pytest.raises(ValueError, match="no sharding rule for parameter mystery of shape"):
    sharding.param_shardings(state, mesh)
  loose = sharding.param_shardings(state, mesh, strict=False)
  assert loose["mystery"].get_value().is_fully_replicated
  del state["mystery"]
  assert sharding.param_shardings(state, mesh)["counter"].get_value().is_fully_replicated


def test_param_shardings_cover_train_state(model):
  from visatb_jax import train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  _, params, _ = train.split_model(model, freeze_vision_tower=True)
  tx = train.make_optimizer({"clip_norm": 1.0, "weight_decay": 0.0})
  abstract = jax.eval_shape(lambda: train.init_train_state(params, tx))
  shardings = sharding.param_shardings(abstract, mesh)
  assert shardings.step.spec == P()
  q = shardings.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
  assert q == NamedSharding(mesh, P(None, "fsdp", "tensor"))
  # Adam moments follow their parameter.
  mu = shardings.opt_state[1][0].mu
  assert mu["lm_head"]["kernel"].get_value().spec == P("fsdp", "tensor")
  assert mu["language_model"]["embed_tokens"]["embedding"].get_value().spec == P("tensor", "fsdp")
  leaves = jax.tree.leaves(shardings)
  assert leaves and all(isinstance(s, NamedSharding) for s in leaves)


# ------------------------------------------------------------------ sharded == unsharded numerics


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(4, CFG.text.vocab_size, size=(ROWS, LEN)).astype(np.int32)
  ids[:, 2:2 + CFG.num_image_tokens] = IMG  # One image per row.
  images = rng.normal(size=(ROWS, 1, 16, 16, 3)).astype(np.float32)
  # Two packed samples per row: segment ids 1 then 2, positions restart.
  segment_ids = np.where(np.arange(LEN) < 10, 1, 2).astype(np.int32)[None].repeat(ROWS, 0)
  positions = np.concatenate([np.arange(10), np.arange(LEN - 10)]).astype(np.int32)[None]
  return ids, images, np.repeat(positions, ROWS, 0), segment_ids


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def model():
  """The tiny model with random values drawn by numpy.

  The module structure is the real one; only the initialiser is bypassed, because eager NNX
  initialisation compiles one small program per parameter shape (seconds on busy CPUs).
  """
  abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    values = rng.normal(0.0, 0.2, leaf.shape)
    if getattr(path[-1], "key", None) == "scale":  # Norm scales near 1, as initialised.
      values = 1.0 + values
    return jnp.asarray(values.astype(leaf.dtype))

  nnx.update(abstract, jax.tree_util.tree_map_with_path(
      draw, nnx.state(abstract), is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
  return abstract


@pytest.fixture(scope="module")
def runs(model):
  """Logits and grads of mean(logits), once on one device and once on a (2, 2, 2) mesh.

  One jit per placement computes both, so the test pays two compilations rather than four.
  """
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  p_sh = sharding.param_shardings(params, mesh, strict=True)
  r_sh = sharding.param_shardings(rest, mesh)
  b_sh = sharding.batch_sharding(mesh)
  batch = _batch()

  def loss(p, r, *b):
    logits = nnx.merge(graphdef, p, r)(*b)
    return jnp.mean(logits), logits

  def fwd_bwd(p, r, *b):
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p, r, *b)
    return logits, grads

  want = jax.jit(fwd_bwd, compiler_options=_FAST_COMPILE)(params, rest, *batch)
  s_params = jax.device_put(params, p_sh)
  got = jax.jit(fwd_bwd, in_shardings=(p_sh, r_sh) + (b_sh,) * 4, out_shardings=(b_sh, p_sh),
                compiler_options=_FAST_COMPILE)(
      s_params, jax.device_put(rest, r_sh), *jax.device_put(batch, b_sh))
  return {"mesh": mesh, "want": want, "got": got, "params": s_params, "batch_sharding": b_sh}


def test_sharded_placement(runs):
  assert runs["batch_sharding"].spec == P(("data", "fsdp"))
  q = runs["params"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  layers = CFG.text.num_hidden_layers  # Every layer's rows, each really split.
  assert q.addressable_shards[0].data.shape == (layers, 16, 16)
  emb = runs["params"]["language_model"]["embed_tokens"]["embedding"][...]
  assert emb.addressable_shards[0].data.shape == (32, 16)  # [vocab / tensor, embed / fsdp]


def test_sharded_forward_equals_unsharded(runs):
  got, want = runs["got"][0], runs["want"][0]
  assert got.shape == (ROWS, LEN, CFG.text.vocab_size)
  assert got.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_sharded_grad_equals_unsharded(runs):
  flat_got = dict(nnx.to_flat_state(runs["got"][1]))
  flat_want = dict(nnx.to_flat_state(runs["want"][1]))
  assert flat_got.keys() == flat_want.keys()
  scale = max(float(np.max(np.abs(v[...]))) for v in flat_want.values())
  for path, g in flat_got.items():
    g, w = np.asarray(g[...], np.float64), np.asarray(flat_want[path][...], np.float64)
    # Relative to the whole gradient: some leaves are exactly 0 in exact arithmetic (a key bias
    # does not change the softmax) and hold only rounding noise of either summation order.
    assert np.max(np.abs(g - w)) <= 1e-5 * scale, path
    if np.max(np.abs(w)) > 1e-4 * scale:  # Non-negligible leaves: 1e-5 relative on their own.
      assert _rel_err(g, w) <= 1e-5, path
  down = runs["got"][1]["language_model"]["layers"]["mlp"]["down_proj"]["kernel"][...]
  assert down.sharding.spec == P(None, "tensor", "fsdp")


# ------------------------------------------------------------------------ Qwen2-VL (issue #19)

Q_IMG, Q_GRID = 3, (1, 4, 4)  # One 4x4-patch image (4 merged tokens) per row.
Q_CFG = qwen2vl.Qwen2VLConfig(
    # patch_size 2: 24 values per patch keeps the packed pixels small.
    vision=qwen2vl.Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=4,
                                       mlp_ratio=2, patch_size=2),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    image_token_id=Q_IMG, mrope_section=(2, 1, 1))


def _random_params(module_fn):
  """`module_fn()` built abstractly, its parameters drawn by numpy (as the `model` fixture)."""
  abstract = nnx.eval_shape(module_fn)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    values = rng.normal(0.0, 0.2, leaf.shape)
    if getattr(path[-1], "key", None) == "scale":
      values = 1.0 + values
    return jnp.asarray(values.astype(leaf.dtype))

  nnx.update(abstract, jax.tree_util.tree_map_with_path(
      draw, nnx.state(abstract), is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
  return abstract


@pytest.fixture(scope="module")
def qwen():
  return _random_params(lambda: qwen2vl.Qwen2VLForConditionalGeneration(Q_CFG,
                                                                        rngs=nnx.Rngs(0)))


def test_qwen2vl_every_parameter_has_a_rule(qwen):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  params = nnx.state(qwen, nnx.Param)
  shardings = sharding.param_shardings(params, mesh, strict=True)  # Raises on an uncovered one.
  flat = dict(nnx.to_flat_state(params))
  axes = {p: sharding.param_logical_axes(p, v[...].shape, strict=True) for p, v in flat.items()}
  block, merger = ("visual", "blocks", 0), ("visual", "merger")
  expected = {
      block + ("attn", "qkv", "kernel"): ("embed", None),
      block + ("attn", "qkv", "bias"): (None,),
      block + ("attn", "proj", "kernel"): ("heads", "embed"),
      block + ("attn", "proj", "bias"): ("embed",),
      block + ("mlp", "fc1", "kernel"): ("embed", "mlp"),
      block + ("mlp", "fc2", "bias"): ("embed",),
      block + ("norm1", "scale"): ("norm",),
      block + ("norm2", "bias"): ("norm",),
      merger + ("ln_q", "scale"): ("norm",),
      merger + ("mlp", 0, "kernel"): ("embed", "mlp"),
      merger + ("mlp", 0, "bias"): ("mlp",),
      merger + ("mlp", 2, "kernel"): ("mlp", "embed"),
      merger + ("mlp", 2, "bias"): ("embed",),
      ("visual", "patch_embed", "proj", "kernel"): (None, "embed"),
      ("language_model", "layers", "self_attn", "k_proj", "bias"): (None, "kv_heads"),
      ("lm_head", "kernel"): ("embed", "vocab"),
  }
  for path, want in expected.items():
    assert axes[path] == want, path
  # The same rules through a jax tree path and a dotted string (index-aware in both).
  qkv = shardings["visual"]["blocks"][0]["attn"]["qkv"]["kernel"].get_value()
  assert qkv.spec == P("fsdp")  # Never split over the q / k / v thirds of its output.
  assert sharding.param_logical_axes("visual.merger.mlp.2.kernel", (128, 32)) == ("mlp", "embed")
  # Only the merger's Linears have indexed rules: index 1 is its (parameter-free) GELU.
  with pytest.raises(ValueError, match="no sharding rule for parameter visual.merger.mlp.1"):
    sharding.param_logical_axes("visual.merger.mlp.1.kernel", (4, 4), strict=True)


def _qwen_batch():
  """Rows of two packed samples, one image in the first; images in the per-row slot layout."""
  rng = np.random.default_rng(1)
  n_patches = int(np.prod(Q_GRID))
  n_img = n_patches // Q_CFG.vision.merge_unit
  ids = rng.integers(7, Q_CFG.text.vocab_size, size=(ROWS, LEN)).astype(np.int32)
  ids[:, 2:2 + n_img] = Q_IMG
  segment_ids = np.where(np.arange(LEN) < 10, 1, 2).astype(np.int32)[None].repeat(ROWS, 0)
  positions, _ = qwen2vl_image.get_rope_index(ids, [Q_GRID] * ROWS, segment_ids=segment_ids,
                                        image_token_id=Q_IMG)
  pixels = rng.normal(size=(ROWS, 1, n_patches, Q_CFG.vision.patch_dim)).astype(np.float32)
  grid = np.asarray(Q_GRID, np.int32)[None, None].repeat(ROWS, 0)
  return {"input_ids": ids, "images": pixels, "image_grid": grid, "positions": positions,
          "segment_ids": segment_ids}


def test_qwen2vl_sharded_forward_and_gradient_equal_unsharded(qwen):
  """Every batch array (per-row image slots included) splits on its rows, as in training."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  graphdef, params, rest = nnx.split(qwen, nnx.Param, ...)
  p_sh = sharding.param_shardings(params, mesh, strict=True)
  r_sh = sharding.param_shardings(rest, mesh)
  b_sh = sharding.batch_sharding(mesh)
  batch = _qwen_batch()

  def loss_and_logits(p, r, batch):
    model = nnx.merge(graphdef, p, r)
    logits = model(batch["input_ids"], **model.batch_inputs(batch))
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2), logits

  def forward(p, r, batch):
    (_, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(p, r, batch)
    return logits, grads

  want_logits, want_grads = jax.jit(forward, compiler_options=_FAST_COMPILE)(params, rest, batch)
  placed = (jax.device_put(params, p_sh), jax.device_put(rest, r_sh),
            sharding.shard_batch(batch, mesh))
  # Under the mesh, so the decoder's activation constraints apply as in training.
  got_logits, got_grads = jax.jit(sharding.under_mesh(forward, mesh),
                                  out_shardings=(b_sh, p_sh),
                                  compiler_options=_FAST_COMPILE)(*placed)
  assert got_logits.shape == (ROWS, LEN, Q_CFG.text.vocab_size)
  assert got_logits.sharding.spec == P(("data", "fsdp"))
  assert placed[2]["images"].sharding.spec == P(("data", "fsdp"))
  merger_in = placed[0]["visual"]["merger"]["mlp"][0]["kernel"][...]
  assert merger_in.addressable_shards[0].data.shape == (64, 64)  # [width / fsdp, / tensor].
  assert float(np.std(np.asarray(want_logits))) > 1e-2  # A vacuous model would match anything.
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=0)
  flat_want, flat_got = jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)
  assert len(flat_want) == len(flat_got) > 0
  vision_grad = want_grads["visual"]["patch_embed"]["proj"]["kernel"][...]
  assert float(np.abs(np.asarray(vision_grad)).max()) > 0  # The images reach the loss.
  for w, g in zip(flat_want, flat_got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


def test_shard_batch_and_logical_constraint():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  batch = {"input_ids": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
  out = sharding.shard_batch(batch, mesh)
  assert out["input_ids"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
  with pytest.raises(ValueError, match="6 rows is not divisible by the 4 batch shards"):
    sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)

  @jax.jit
  def f(x):
    return sharding.with_logical_constraint(x * 2, ("batch", "length", "embed"), mesh)

  y = f(jnp.ones((8, 4, 6)))
  assert y.sharding.spec == P(("data", "fsdp"))  # embed -> fsdp already used by batch.
  # No mesh anywhere: unchanged.
  assert jax.jit(lambda x: sharding.with_logical_constraint(x, ("batch",)))(jnp.ones(3)).shape == (
      3,)


# ------------------------------------------------------------------------------ distributed init

_DIST_ENV = ("VISATB_DISTRIBUTED", "VISATB_COORDINATOR", "VISATB_COORDINATOR_PORT",
             "VISATB_NUM_PROCESSES", "VISATB_PROCESS_ID", "VISATB_LOCAL_DEVICE_IDS",
             "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID",
             "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NTASKS_PER_NODE",
             "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "JAX_COORDINATOR_PORT",
             "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
             "MEGASCALE_NUM_SLICES")


@pytest.fixture
def dist(monkeypatch):
  """A clean environment, a fresh module flag, and a fake jax.distributed.initialize."""
  for name in _DIST_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(sharding, "_INITIALIZED", False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return monkeypatch, calls


def test_initialize_distributed_noop_without_env(dist):
  monkeypatch, calls = dist
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")  # A one-task SLURM job is a single process.
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # A single-host TPU VM.
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("VISATB_NUM_PROCESSES", "1")
  assert sharding.initialize_distributed() is False
  assert calls == []


def test_initialize_distributed_explicit_env(dist):
  monkeypatch, calls = dist
  monkeypatch.setenv("VISATB_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("VISATB_NUM_PROCESSES", "4")
  monkeypatch.setenv("VISATB_PROCESS_ID", "3")
  monkeypatch.setenv("VISATB_LOCAL_DEVICE_IDS", "1")
  monkeypatch.setenv("SLURM_NTASKS", "8")  # Explicit variables win over SLURM's.
  monkeypatch.setenv("SLURM_PROCID", "5")
  assert sharding.initialize_distributed() is True
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                    "local_device_ids": [1], "cluster_detection_method": "deactivate"}]
  assert sharding.initialize_distributed() is True  # Idempotent: no second call.
  assert len(calls) == 1


def test_initialize_distributed_explicit_env_errors(dist):
  monkeypatch, calls = dist
  monkeypatch.setenv("VISATB_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="needs VISATB_COORDINATOR and VISATB_PROCESS_ID"):
    sharding.initialize_distributed()
  monkeypatch.setenv("VISATB_COORDINATOR", "h:1")
  monkeypatch.setenv("VISATB_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"VISATB_PROCESS_ID=2 outside \[0, 2\)"):
    sharding.initialize_distributed()
  assert calls == []


def test_initialize_distributed_slurm_one_process_per_gpu(dist):
  monkeypatch, calls = dist
  for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
                      "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
                      "SLURM_STEP_NODELIST": "gpu[017-018],gpu020"}.items():
    monkeypatch.setenv(name, value)
  assert sharding.initialize_distributed() is True
  assert calls == [{"coordinator_address": f"gpu017:{61440 + 4242 % 4096}", "num_processes": 16,
                    "process_id": 9, "local_device_ids": [1],
                    "cluster_detection_method": "deactivate"}]


def test_distributed_args_slurm_one_process_per_host(dist):
  monkeypatch, _ = dist
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "node001,node002",
         "VISATB_COORDINATOR_PORT": "5555"}
  args = sharding.distributed_args(env)
  assert args == sharding.DistributedArgs("slurm", "node001:5555", 2, 1, None)
  assert sharding.first_slurm_host("a-b[1-2]") == "a-b1"
  assert sharding.first_slurm_host("node[001,007-015],host2") == "node001"


def test_initialize_distributed_tpu_auto(dist):
  monkeypatch, calls = dist
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert sharding.initialize_distributed() is True
  assert calls == [{}]  # JAX detects the rest (worker list, id) itself.
  assert sharding.distributed_args({"VISATB_DISTRIBUTED": "1"}).source == "auto"
  assert sharding.distributed_args({"VISATB_DISTRIBUTED": "0", "SLURM_NTASKS": "4",
                                    "SLURM_PROCID": "0"}) is None


def test_logical_constraint_under_set_mesh():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, _devices())
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: sharding.with_logical_constraint(x * 2, ("batch", "length", "mlp")))(
        jnp.ones((8, 4, 6)))
  assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
