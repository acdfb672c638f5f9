"""Tests for KV-cache greedy generation against the recompute-everything reference."""

import numpy as np
import pytest
from flax import nnx

from visatb_jax.model import generate
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig
from visatb_jax.model.generate import greedy_generate, greedy_generate_nocache
from visatb_jax.model.llava import LlavaForConditionalGeneration

IMG, PAD, NEVER = 3, 0, -1
CFG = LlavaConfig(
    vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    image_token_id=IMG)
P = CFG.num_image_tokens
NEW = 6


def make_model():
  return LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
  return make_model()


def _left_pad(rows, length):
  ids = np.full((len(rows), length), PAD, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  return ids, mask


def make_prompts():
  rng = np.random.default_rng(0)
  text = lambda n: list(rng.integers(4, 64, n))
  rows = [text(2) + [IMG] * P + text(3),                       # One image, length 9.
          text(5),                                             # Text only, length 5.
          text(1) + [IMG] * P + text(2) + [IMG] * P + text(1)]  # Two images, length 12.
  ids, mask = _left_pad(rows, 13)
  images = rng.normal(size=(3, 2, 16, 16, 3)).astype(np.float32)
  return ids, mask, images


@pytest.fixture(scope="module")
def prompts():
  return make_prompts()


@pytest.fixture(scope="module")
def reference(model, prompts):
  return greedy_generate_nocache(model, *prompts, max_new_tokens=NEW, eos_id=NEVER, pad_id=PAD)


def test_cache_equals_recompute(model, prompts, reference):
  # The reference also runs each step with a different amount of extra left padding, so this
  # checks padding invariance too.
  out = greedy_generate(model, *prompts, max_new_tokens=NEW, eos_id=NEVER, pad_id=PAD)
  assert out.shape == (3, NEW) and out.dtype == np.int32
  np.testing.assert_array_equal(out, reference)
  assert len(set(reference.ravel().tolist())) > 1  # A degenerate model would make this vacuous.


def test_eos_stops_rows_and_is_not_included(model, prompts, reference):
  eos = int(reference[0, 2])
  expected = reference.copy()
  for row in expected:
    hits = np.nonzero(row == eos)[0]
    if hits.size:
      row[hits[0]:] = PAD
  out = greedy_generate(model, *prompts, max_new_tokens=NEW, eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(out, expected)
  assert not (out == eos).any()
  slow = greedy_generate_nocache(model, *prompts, max_new_tokens=NEW, eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(slow, expected)


def test_text_only_and_compiled_once(model, prompts, reference):
  ids, mask, _ = prompts
  kw = dict(max_new_tokens=NEW, pad_id=PAD)
  first = greedy_generate(model, ids[1:2], mask[1:2], None, eos_id=NEVER, **kw)
  run = generate._compiled(nnx.graphdef(model), NEW)
  misses, traces = generate._compiled.cache_info().misses, run._cache_size()
  # Same shapes, another eos_id: no new jitted function and no new trace.
  eos = int(first[0, -1])
  again = greedy_generate(model, ids[1:2], mask[1:2], None, eos_id=eos, **kw)
  assert generate._compiled.cache_info().misses == misses and run._cache_size() == traces
  expected = first[0].copy()
  expected[np.argmax(first[0] == eos):] = PAD
  np.testing.assert_array_equal(again[0], expected)
  # The text-only row generates the same with or without (unused) images.
  np.testing.assert_array_equal(first[0], reference[1])


def test_rejects_right_padded_prompts(model):
  with pytest.raises(ValueError, match="left-padded"):
    greedy_generate(model, np.ones((1, 4), np.int32), np.array([[1, 1, 0, 0]]), None,
                    max_new_tokens=2, eos_id=NEVER, pad_id=PAD)


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 4, "fsdp": 2}, {"data": 2, "tensor": 2}])
def test_generation_split_over_a_mesh_gives_the_same_tokens(model, prompts, reference, axes):
  """Rows over the batch axes, parameters sharded by their logical axes: the same greedy tokens,
  replicated back to the host."""
  import jax
  from visatb_jax.runtime import sharding
  mesh = sharding.make_mesh(axes, jax.devices()[:int(np.prod(list(axes.values())))])
  sharded = nnx.clone(model)
  state = nnx.state(sharded)
  nnx.update(sharded, jax.device_put(state, sharding.param_shardings(state, mesh)))
  ids, mask, images = prompts
  rows = np.arange(8) % 3  # 8 rows: one per data shard on the 8-device mesh
  out = greedy_generate(sharded, ids[rows], mask[rows], images[rows], max_new_tokens=NEW,
                        eos_id=NEVER, pad_id=PAD, mesh=mesh)
  np.testing.assert_array_equal(out, reference[rows])


@pytest.fixture
def transpose_everything(monkeypatch):
  """Thresholds at 0, so the tiny model takes the CPU path with transposed decoding kernels."""
  monkeypatch.setattr(generate, "_TRANSPOSE_MIN_BYTES", 0)
  monkeypatch.setattr(generate, "_TRANSPOSE_MIN_NEW_TOKENS", 0)
  generate._decode_kernels.clear()
  yield
  generate._decode_kernels.clear()


def test_transposed_decoding_kernels_give_the_same_tokens(model, prompts, reference,
                                                          transpose_everything):
  """The CPU decode path with every kernel transposed ([out, in], kernel @ x^T) generates
  exactly the tokens of the reference."""
  kernels = generate._decode_kernels.get(model)
  copy = generate._with_decode_kernels(model, kernels)
  swapped = [m for _, m in nnx.iter_modules(copy) if getattr(m, "dot_general", None)
             is generate._kernel_first_dot]
  assert len(swapped) == len(kernels) > 0
  assert all(m.dot_general is not generate._kernel_first_dot
             for _, m in nnx.iter_modules(model) if hasattr(m, "dot_general"))
  out = greedy_generate(model, *prompts, max_new_tokens=NEW, eos_id=NEVER, pad_id=PAD)
  np.testing.assert_array_equal(out, reference)


def test_transposed_decoding_kernels_on_a_mesh_give_the_same_tokens(model, prompts, reference,
                                                                    transpose_everything):
  """Sharded kernels (fsdp and tensor axes) transposed outside the decoding function keep their
  values: the same tokens as the reference."""
  import jax  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  sharded = nnx.clone(model)
  state = nnx.state(sharded)
  nnx.update(sharded, jax.device_put(state, sharding.param_shardings(state, mesh)))
  ids, mask, images = prompts
  rows = np.arange(8) % 3
  out = greedy_generate(sharded, ids[rows], mask[rows], images[rows], max_new_tokens=NEW,
                        eos_id=NEVER, pad_id=PAD, mesh=mesh)
  np.testing.assert_array_equal(out, reference[rows])
  assert generate._decode_kernels._copies  # the transposed path was taken


def test_transposed_kernels_are_made_once_per_parameters(prompts, transpose_everything):
  """The copies are reused while the model's kernels are the same arrays, remade when they
  change (a training step makes new arrays), and freed with the model."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = make_model()
  first = generate._decode_kernels.get(model)
  assert generate._decode_kernels.get(model) is first
  for path, m in generate._transposable_linears(model):
    # Each layer's kernel transposed: [L, in, out] -> [L, out, in] for the stacked layers.
    np.testing.assert_array_equal(first[path], np.swapaxes(np.asarray(m.kernel[...]), -1, -2))
  # New parameter values (as after an update): new copies, and decoding follows them.
  before = greedy_generate(model, *prompts, max_new_tokens=NEW, eos_id=NEVER, pad_id=PAD)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * 1.5, state))
  second = generate._decode_kernels.get(model)
  assert second is not first
  after = greedy_generate(model, *prompts, max_new_tokens=NEW, eos_id=NEVER, pad_id=PAD)
  np.testing.assert_array_equal(
      after, greedy_generate_nocache(model, *prompts, max_new_tokens=NEW, eos_id=NEVER,
                                     pad_id=PAD))
  assert not np.array_equal(after, before)
  del model, state, second
  gc.collect()
  assert generate._decode_kernels._copies == {}
