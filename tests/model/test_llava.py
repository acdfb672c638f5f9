"""Tests for the LLaVA model: config parsing, shapes, image splicing, packing with images."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from visatb_jax.model.llava import LlavaForConditionalGeneration, splice_image_features

IMG = 3  # image_token_id
CFG = LlavaConfig(
    vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    image_token_id=IMG)
P = CFG.num_image_tokens  # 4 tokens per image.


@pytest.fixture(scope="module")
def model():
  return LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def _fwd(model, ids, images=None, positions=None, segment_ids=None):
  return model(ids, images, positions, segment_ids)


def _images(b, m, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, m, 16, 16, 3)), jnp.float32)


def _row(*parts):
  """Concatenates text token lists and image blocks ("I") into one row of ids."""
  ids = []
  for part in parts:
    ids += [IMG] * P if part == "I" else list(part)
  return ids


def _changed(a, b, tol=1e-5):
  return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1) > tol


# ---------------------------------------------------------------- config


def test_config_from_dict_nested_and_configdict():
  d = {"vision": dataclasses.asdict(CFG.vision), "text": {"vocab_size": 64, "hidden_size": 32},
       "image_token_id": IMG, "dtype": "bfloat16"}
  cfg = LlavaConfig.from_dict(d)
  assert cfg.vision == CFG.vision and cfg.text.hidden_size == 32 and cfg.text.head_dim == 8
  assert cfg.compute_dtype == jnp.bfloat16 and cfg.params_dtype == jnp.float32
  assert LlavaConfig.from_dict(ml_collections.ConfigDict(d)) == cfg
  assert cfg.num_image_tokens == cfg.vision.num_image_tokens == 4
  full = dataclasses.replace(cfg, vision_feature_select_strategy="full")
  assert full.num_image_tokens == 5


def test_config_hf_aliases_and_strictness():
  hf = {"vision_config": {"image_size": 16, "patch_size": 8, "model_type": "clip_vision_model"},
        "text_config": {"vocab_size": 64, "model_type": "llama"}, "image_token_index": IMG,
        "model_type": "llava"}
  cfg = LlavaConfig.from_dict(hf, strict=False)
  assert cfg.image_token_id == IMG and cfg.vision.image_size == 16 and cfg.text.vocab_size == 64
  with pytest.raises(ValueError, match="model_type"):
    LlavaConfig.from_dict(hf)
  # transformers >= 5 nests the rotary base.
  text = TextConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
  assert text.rope_theta == 5e5
  with pytest.raises(ValueError, match="rope_type"):
    TextConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
  with pytest.raises(ValueError, match="image_token_id"):
    LlavaConfig(vision=CFG.vision, text=CFG.text, image_token_id=64)
  with pytest.raises(ValueError, match="num_key_value_heads"):
    TextConfig(num_attention_heads=4, num_key_value_heads=3)
  with pytest.raises(ValueError, match="patch_size"):
    VisionConfig(image_size=20, patch_size=8)


# ---------------------------------------------------------------- model


def test_module_names_follow_hf(model):
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for expected in ("vision_tower.vision_model.embeddings.patch_embedding.kernel",
                   "vision_tower.vision_model.embeddings.class_embedding",
                   "vision_tower.vision_model.pre_layrnorm.scale",
                   "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.kernel",
                   "multi_modal_projector.linear_1.kernel", "multi_modal_projector.linear_2.bias",
                   "language_model.embed_tokens.embedding",
                   # The decoder's layers are stacked: one path for every layer's rows.
                   "language_model.layers.self_attn.o_proj.kernel",
                   "language_model.layers.mlp.gate_proj.kernel", "language_model.norm.scale",
                   "lm_head.kernel"):
    assert expected in paths, expected


def test_shapes_and_dtypes(model):
  ids = jnp.asarray([_row([5, 6], "I", [7, 8], "I", [9, 10])] * 2, jnp.int32)
  logits = _fwd(model, ids, _images(2, 2))
  assert logits.shape == (2, 2 + P + 2 + P + 2, 64) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert model.num_image_tokens == P


def test_bf16_compute_keeps_f32_params_and_logits(model):
  m = LlavaForConditionalGeneration(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert m.language_model.layers.mlp.up_proj.kernel.dtype == jnp.float32
  ids = jnp.asarray([_row([5, 6], "I", [7, 8], "I", [9, 10])] * 2, jnp.int32)
  images = _images(2, 2)
  hidden = jax.eval_shape(lambda: m.hidden_states(ids, images))
  assert hidden.dtype == jnp.bfloat16
  logits = _fwd(m, ids, images)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  # Same seed, same float32 weights: bf16 compute only adds rounding.
  np.testing.assert_allclose(logits, _fwd(model, ids, images), atol=0.1)


def test_rows_without_image_tokens_ignore_images(model):
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 64, (2, 14)), jnp.int32)
  text_only = _fwd(model, ids)
  np.testing.assert_allclose(_fwd(model, ids, _images(2, 2, seed=1)), text_only, atol=1e-6)
  np.testing.assert_allclose(_fwd(model, ids, _images(2, 2, seed=2)), text_only, atol=1e-6)


def test_splice_image_features_in_order():
  emb = jnp.zeros((2, 7, 2))
  ids = jnp.asarray([[9, IMG, IMG, 9, IMG, IMG, 9], [9, 9, 9, 9, 9, 9, 9]])
  feats = jnp.arange(2 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 2) + 1
  out = np.asarray(splice_image_features(emb, ids, feats, IMG))
  np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], np.asarray(feats[0]))
  assert not out[0, [0, 3, 6]].any() and not out[1].any()


def test_image_features_come_from_layer_minus_2_without_cls(model):
  images = _images(2, 2, seed=3)

  @nnx.jit
  def both(m, images):
    flat = images.reshape((-1,) + images.shape[2:])
    states = m.vision_tower.hidden_states(flat)
    expected = m.multi_modal_projector(states[-2][:, 1:]).reshape(2, 2 * P, -1)
    return m.image_features(images), expected, m.multi_modal_projector(states[-1][:, 1:])

  got, expected, last = both(model, images)
  assert got.shape == (2, 2 * P, 32)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert np.abs(np.asarray(got).reshape(4, P, -1) - np.asarray(last)).max() > 1e-3


def test_changing_an_image_changes_logits_only_from_its_block(model):
  # Row 0: text, image 1 at [2, 6), text, image 2 at [8, 12), text. Row 1: text only.
  ids = jnp.asarray([_row([5, 6], "I", [7, 8], "I", [9, 10]), _row([5, 6, 7, 8, 9, 10] + [11] * 8)],
                    jnp.int32)
  images = _images(2, 2, seed=4)
  base = _fwd(model, ids, images)
  new_first = _fwd(model, ids, images.at[:, 0].set(_images(2, 1, seed=5)[:, 0]))
  new_second = _fwd(model, ids, images.at[:, 1].set(_images(2, 1, seed=6)[:, 0]))
  ch1, ch2 = _changed(base, new_first), _changed(base, new_second)
  assert not ch1[0, :2].any() and ch1[0, 2:].all()
  # Slot 2 feeds the second image block: nothing before position 8 moves.
  assert not ch2[0, :8].any() and ch2[0, 8:].all()
  assert not ch1[1].any() and not ch2[1].any()


def test_packed_samples_with_images_equal_each_alone(model):
  a = _row([5], "I", [6, 7])            # Sample 1 uses image slot 0.
  b = _row([8, 9], "I", [10])           # Sample 2 uses image slot 1.
  n = len(a) + len(b)
  img_a, img_b = _images(1, 1, seed=7)[0, 0], _images(1, 1, seed=8)[0, 0]
  zero = jnp.zeros_like(img_a)
  # Row 0: a and b packed. Row 1: b alone, right-padded (segment 0), its image in slot 0.
  ids = jnp.asarray([a + b, b + [0] * len(a)], jnp.int32)
  positions = jnp.asarray([list(range(len(a))) + list(range(len(b))), list(range(len(b))) + [0] * len(a)])
  segments = jnp.asarray([[1] * len(a) + [2] * len(b), [1] * len(b) + [0] * len(a)])
  images = jnp.stack([jnp.stack([img_a, img_b]), jnp.stack([img_b, zero])])
  out = _fwd(model, ids, images, positions, segments)
  # a alone in row 0 (right-padded), with its image in slot 0.
  alone_ids = ids.at[0, len(a):].set(0)
  alone_seg = segments.at[0, len(a):].set(0)
  alone = _fwd(model, alone_ids, images.at[0, 1].set(zero), positions, alone_seg)
  assert out.shape == (2, n, 64)
  np.testing.assert_allclose(out[0, :len(a)], alone[0, :len(a)], atol=1e-5)
  np.testing.assert_allclose(out[0, len(a):], out[1, :len(b)], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(alone)).all()
