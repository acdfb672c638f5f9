"""Tests for the CLIP vision tower: shapes, feature-layer selection, parity with transformers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visatb_jax.model.clip import CLIPVisionModel, activation
from visatb_jax.model.config import VisionConfig

from test_llama import load_torch_params  # the same HF-name → NNX-path copy

CFG = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4)


@pytest.fixture(scope="module")
def tower():
  return CLIPVisionModel(CFG, rngs=nnx.Rngs(0))


def _images(n=2, seed=0, size=32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


@nnx.jit
def _all_states(model, images):
  return model.hidden_states(images)


@nnx.jit(static_argnums=2)
def _feature(model, images, layer):
  return model.feature_layer(images, layer)


def test_hidden_states_shapes(tower):
  states = _all_states(tower, _images())
  assert len(states) == CFG.num_hidden_layers + 1
  assert all(s.shape == (2, 1 + 16, 32) and s.dtype == jnp.float32 for s in states)
  assert CFG.num_patches == CFG.num_image_tokens == 16


def test_feature_layer_is_second_to_last_without_class_token(tower):
  images = _images()
  states = _all_states(tower, images)
  feats = _feature(tower, images, -2)
  assert feats.shape == (2, 16, 32)
  np.testing.assert_allclose(feats, states[-2][:, 1:], atol=1e-6)
  assert np.abs(np.asarray(feats - states[-1][:, 1:])).max() > 1e-3  # Not the last layer.


def test_feature_layer_skips_unneeded_layers(tower):
  # With up_to=-2 the last encoder layer never runs: one state fewer, and no work after it.
  states = jax.eval_shape(lambda x: tower.hidden_states(x, up_to=-2), _images(1))
  assert len(states) == CFG.num_hidden_layers
  with pytest.raises(ValueError, match="feature layer"):
    tower.feature_layer(_images(1), CFG.num_hidden_layers + 1)


def test_patches_are_local(tower):
  # Patch embedding + position only (hidden_states[0]): changing the top-left 8x8 patch changes
  # token 1 (token 0 is the class token) and no other patch token.
  images = _images(2)
  changed = images.at[0, :8, :8].add(1.0)
  a, b = _all_states(tower, images)[0], _all_states(tower, changed)[0]
  diff = np.abs(np.asarray(a - b)).max(axis=-1)
  assert diff[0, 1] > 1e-3 and diff[0, 0] == 0 and np.all(diff[0, 2:] == 0) and np.all(diff[1] == 0)


def test_quick_gelu_and_gelu():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(activation("quick_gelu")(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)
  # Exact erf GELU, as HF "gelu" (not the tanh approximation, which differs by ~1e-3 here).
  exact = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in np.asarray(x, np.float64)]
  np.testing.assert_allclose(activation("gelu")(x), exact, atol=1e-6)


def test_parity_with_transformers_clip_vision_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu", attn_implementation="eager")
  hf = transformers.CLIPVisionModel(hf_cfg).eval()
  with torch.no_grad():  # Non-trivial norms and biases so that a wrong mapping shows.
    for name, p in hf.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model = CLIPVisionModel(CFG, rngs=nnx.Rngs(1))
  # transformers 5 drops the `vision_model.` level that checkpoints (and this port) keep.
  root = getattr(hf, "vision_model", hf)
  load_torch_params(model.vision_model, root.named_parameters())
  images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.tensor(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  states = _all_states(model, jnp.asarray(images))
  assert len(states) == len(ref.hidden_states)
  for ours, theirs in zip(states, ref.hidden_states):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m.pooled_output(x))(model, jnp.asarray(images)),
                             ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
