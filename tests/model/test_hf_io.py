"""Tests for hf_io: transformers LLaVA checkpoints in, out, numerically equal, and clear errors.

Every checkpoint is a tiny random `transformers.LlavaForConditionalGeneration` built and saved here
(no download); torch on CPU is the reference.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from visatb_jax.model import hf_io, lora
from visatb_jax.model.generate import greedy_generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

IMG, VOCAB, SIZE, P = 3, 64, 16, 4  # image token id, vocab, image side, tokens per image.


def _hf_model(family: str, *, seed: int = 0):
  """A tiny random LLaVA: CLIP tower + Llama (untied) or Qwen2 (q/k/v bias, tied, own RoPE base)."""
  torch.manual_seed(seed)
  eager = dict(attn_implementation="eager")
  vision = transformers.CLIPVisionConfig(
      image_size=SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, **eager)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **eager)
  if family == "llama":
    text = transformers.LlamaConfig(rope_theta=500.0, rms_norm_eps=1e-5, **common)
  else:
    text = transformers.Qwen2Config(rope_theta=250.0, tie_word_embeddings=True, **common)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                                    **eager)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so a wrong mapping cannot hide.
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(seed: int = 0):
  """Two rows of 13 tokens with two images each (at different places), NHWC and NCHW pixels."""
  rng = np.random.default_rng(seed)
  t = lambda n: list(rng.integers(4, VOCAB, n))
  rows = [t(2) + [IMG] * P + t(1) + [IMG] * P + t(2), [IMG] * P + t(4) + [IMG] * P + t(1)]
  ids = np.asarray(rows, np.int64)
  nhwc = rng.normal(size=(2, 2, SIZE, SIZE, 3)).astype(np.float32)
  # transformers takes the images of all rows in order, flattened, channels first.
  nchw = nhwc.reshape(4, SIZE, SIZE, 3).transpose(0, 3, 1, 2)
  return ids, nhwc, nchw


IDS, IMAGES, PIXELS = _inputs()


def _torch_logits(hf) -> np.ndarray:
  with torch.no_grad():
    return hf(input_ids=torch.tensor(IDS), pixel_values=torch.tensor(PIXELS)).logits.float().numpy()


@nnx.jit
def _logits(model, ids, images):
  return model(ids, images)


def _ours(model) -> np.ndarray:
  return np.asarray(_logits(model, jnp.asarray(IDS, jnp.int32), jnp.asarray(IMAGES)))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
  """(family, torch model, its reference logits, single-file dir, sharded dir)."""
  hf = _hf_model(request.param)
  root = tmp_path_factory.mktemp(request.param)
  single, sharded = str(root / "single"), str(root / "sharded")
  hf.save_pretrained(single)
  hf.save_pretrained(sharded, max_shard_size="20KB")
  return request.param, hf, _torch_logits(hf), single, sharded


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  hf = _hf_model("llama", seed=1)
  path = str(tmp_path_factory.mktemp("llama1") / "ckpt")
  hf.save_pretrained(path)
  return hf, _torch_logits(hf), path


def _rewrite(src: str, dst: str, rename=lambda k: k, drop=(), extra=None, config=None) -> str:
  """Copies a single-file checkpoint with keys renamed / dropped / added and config edits."""
  os.makedirs(dst)
  tensors = safetensors_numpy.load_file(os.path.join(src, "model.safetensors"))
  out = {rename(k): v for k, v in tensors.items() if k not in drop}
  out.update(extra or {})
  safetensors_numpy.save_file(out, os.path.join(dst, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  if config:
    config(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


# ---------------------------------------------------------------- loading: parity with transformers


def test_logits_match_transformers_single_and_sharded(saved):
  family, _, ref, single, sharded = saved
  assert os.path.isfile(os.path.join(sharded, hf_io.SAFE_WEIGHTS_INDEX_NAME))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
  for path in (single, sharded):
    model = hf_io.load_pretrained(path)
    np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)
  cfg = model.config
  assert cfg.text.attention_bias == (family == "qwen2")
  assert cfg.text.tie_word_embeddings == (family == "qwen2") and (model.lm_head is None) == (
      family == "qwen2")
  assert cfg.text.rope_theta == {"llama": 500.0, "qwen2": 250.0}[family]
  assert cfg.text.rms_norm_eps == {"llama": 1e-5, "qwen2": 1e-6}[family]
  assert cfg.num_image_tokens == P and cfg.image_token_id == IMG


def _current(key: str) -> str:  # transformers 4.52-4.57 layout, CLIP `vision_model.` level kept.
  for old, new in (("language_model.model.", "model.language_model."),
                   ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower.vision_model."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")):
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _legacy(key: str) -> str:  # llava-hf/llava-1.5-7b-hf as published (transformers 4.3x).
  if key.startswith("vision_tower."):
    return "vision_tower.vision_model." + key[len("vision_tower."):]
  return key


def test_key_layouts_all_load_the_same(llama, tmp_path):
  _, ref, path = llama
  keys = safetensors_numpy.load_file(os.path.join(path, "model.safetensors")).keys()
  # transformers 5 writes the older prefixes, without CLIP's `vision_model.` level.
  assert "language_model.lm_head.weight" in keys and "vision_tower.pre_layrnorm.weight" in keys
  for name, rename in (("current", _current), ("legacy", _legacy)):
    new = _rewrite(path, str(tmp_path / name), rename=rename)
    model = hf_io.load_pretrained(new)
    np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)
  extra = {"vision_tower.vision_model.embeddings.position_ids": np.arange(5)[None]}
  model = hf_io.load_pretrained(_rewrite(path, str(tmp_path / "buffers"), rename=_legacy,
                                         extra=extra))  # Old buffers are skipped, even if strict.
  np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)


def test_mesh_placement_and_shardings_hook(llama):
  _, _, path = llama
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("fsdp",))
  n = mesh.size
  plain = nnx.to_flat_state(nnx.state(hf_io.load_pretrained(path)))
  model = hf_io.load_pretrained(path, mesh=mesh)
  kernel = model.language_model.layers.mlp.up_proj.kernel[...]  # Every layer, stacked.
  assert kernel.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  seen = []

  def shard_rows(path, shape):  # Shard the leading axis where it divides, else replicate.
    seen.append(path)
    spec = ("fsdp",) if shape[0] % n == 0 else ()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

  model = hf_io.load_pretrained(path, shardings_fn=shard_rows)
  assert ("language_model", "embed_tokens", "embedding") in seen
  emb = model.language_model.embed_tokens.embedding[...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  assert emb.addressable_shards[0].data.shape == (VOCAB // n, 32)
  # Same values wherever they were placed (the forward itself is covered by the parity tests).
  sharded = nnx.to_flat_state(nnx.state(model))
  assert len(seen) == len(plain) == len(sharded)
  for (p, a), (q, b) in zip(plain, sharded):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_stacked_layers_load_row_by_row_into_their_rule_sharding(llama):
  """Each layer's tensor goes to the devices alone and into its row of the stack in place: the
  stack ends in its logical-axis sharding (layer axis whole), with the plain load's values."""
  import warnings  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  _, _, path = llama
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  plain = hf_io.load_pretrained(path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "donated buffers were not usable": a second copy
    model = hf_io.load_pretrained(path, shardings_fn=factory.shardings_fn(mesh))
  up = model.language_model.layers.mlp.up_proj.kernel[...]
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 2, up.shape[2] // 2)
  for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(plain)),
                            nnx.to_flat_state(nnx.state(model))):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


# ---------------------------------------------------------------- saving: transformers loads ours


def test_save_then_transformers_and_ours_load_same_logits(saved, tmp_path):
  family, _, ref, single, _ = saved
  model = hf_io.load_pretrained(single)
  for name, kw in (("one", {}), ("shards", {"max_shard_size": "20KB"})):
    out = str(tmp_path / name)
    hf_io.save_pretrained(model, out, **kw)
    assert os.path.isfile(os.path.join(out, hf_io.SAFE_WEIGHTS_INDEX_NAME)) == (name == "shards")
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.text_config.model_type == family
    np.testing.assert_allclose(_torch_logits(hf.eval()), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(_ours(hf_io.load_pretrained(out)), _ours(model))
  # A smaller save over a sharded one leaves no stale shards behind.
  hf_io.save_pretrained(model, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def _tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory (any shard), under its canonical name."""
  out = {}
  for file in hf_io.weight_files(path):
    out.update({hf_io.canonical_key(k): v for k, v in safetensors_numpy.load_file(file).items()})
  return out


def test_stacked_layers_round_trip_every_tensor_exactly(saved, tmp_path):
  """Per-layer checkpoint tensors -> rows of the stacked layers -> per-layer tensors again, bit for
  bit, through a checkpoint whose layers are spread over shards."""
  _, _, _, _, sharded = saved
  model = hf_io.load_pretrained(sharded)
  layers = model.language_model.config.num_hidden_layers
  original = _tensors(sharded)
  up = np.asarray(model.language_model.layers.mlp.up_proj.kernel[...])
  assert up.shape[0] == layers
  for i in range(layers):  # Row i is HF's layers.{i} (transposed: NNX kernels are [in, out]).
    np.testing.assert_array_equal(up[i].T,
                                  original[f"language_model.layers.{i}.mlp.up_proj.weight"])
  out = str(tmp_path / "again")
  hf_io.save_pretrained(model, out, max_shard_size="20KB")
  again = _tensors(out)
  assert again.keys() == original.keys()
  per_layer = len(nnx.to_flat_state(nnx.state(model.language_model.layers)))  # 9, or 12 biased
  assert sum(k.startswith(f"language_model.layers.{layers - 1}.") for k in again) == per_layer
  for name, value in original.items():
    assert again[name].dtype == value.dtype, name
    np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_save_lora_model_writes_merged_weights(saved, tmp_path):
  family, _, ref, single, _ = saved
  model = hf_io.load_pretrained(single)
  lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.1, target_modules=("q_proj", "v_proj",
                                                                          "down_proj"),
                  rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for layer in lora.lora_layers(model).values():  # Zero B would make the merge invisible.
    b = layer.lora.lora_b
    b.set_value(0.2 * jax.random.normal(next(keys), b.shape))
  adapted = _ours(model)
  assert np.abs(adapted - ref).max() > 1e-2
  out = str(tmp_path / "lora")
  hf_io.save_pretrained(model, out)
  hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert hf.config.text_config.model_type == family
  np.testing.assert_allclose(_torch_logits(hf.eval()), adapted, atol=1e-4, rtol=0)
  with open(os.path.join(out, "model.safetensors"), "rb") as f:
    assert b"lora" not in f.read(20000)  # Only HF names in the header.
  # Saving merged on the fly: the model still has its adapters, unchanged.
  assert lora.has_lora(model)
  np.testing.assert_array_equal(_ours(model), adapted)
  np.testing.assert_allclose(_ours(hf_io.load_pretrained(out)), adapted, atol=1e-5, rtol=0)


def test_bf16_checkpoints(tmp_path):
  hf16 = _hf_model("llama", seed=1).to(torch.bfloat16)
  path = str(tmp_path / "bf16")
  hf16.save_pretrained(path)
  with open(os.path.join(path, "model.safetensors"), "rb") as f:
    assert b'"BF16"' in f.read(4096)
  weight16 = hf16.lm_head.weight.detach().clone()
  ref = _torch_logits(hf16.float())  # The same bf16 values, computed in float32 (in place).
  model = hf_io.load_pretrained(path)
  assert model.lm_head.kernel.dtype == jnp.float32
  np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)

  low = hf_io.load_pretrained(path, param_dtype="bfloat16")
  assert low.lm_head.kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(low.lm_head.kernel[...], np.float32),
                                np.asarray(model.lm_head.kernel[...]))
  # The raw-bytes reader (for safetensors builds without numpy bfloat16) gives the same bits.
  file = os.path.join(path, "model.safetensors")
  key = "language_model.lm_head.weight"
  raw = hf_io._read_raw(file, key)
  np.testing.assert_array_equal(raw.astype(np.float32), weight16.float().numpy())

  class NoBf16:
    def get_tensor(self, key):
      raise TypeError("bf16 is not supported by the numpy backend")

  np.testing.assert_array_equal(hf_io.read_tensor(NoBf16(), file, key).view(np.uint16),
                                raw.view(np.uint16))
  # Ours saved as bf16: transformers reads the same values back.
  out = str(tmp_path / "ours_bf16")
  hf_io.save_pretrained(model, out, dtype="bfloat16")
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16)
  torch.testing.assert_close(back.lm_head.weight.detach(), weight16, atol=0, rtol=0)


# ---------------------------------------------------------------- greedy generation parity


def test_greedy_generation_matches_transformers_generate(llama):
  hf, _, path = llama
  model = hf_io.load_pretrained(path)
  rng = np.random.default_rng(5)
  t = lambda n: list(rng.integers(4, VOCAB, n))
  rows = [t(2) + [IMG] * P + t(3), t(1) + [IMG] * P + t(1)]  # Lengths 9 and 6: left-padded.
  ids = np.zeros((2, 9), np.int64)
  mask = np.zeros((2, 9), np.int64)
  for i, row in enumerate(rows):
    ids[i, 9 - len(row):] = row
    mask[i, 9 - len(row):] = 1
  images = rng.normal(size=(2, 1, SIZE, SIZE, 3)).astype(np.float32)
  new = 8
  with torch.no_grad():
    # eos None: both sides produce exactly `new` tokens, however the random model behaves.
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(images[:, 0].transpose(0, 3, 1, 2)),
                      do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
  ref = ref[:, ids.shape[1]:].numpy()
  assert ref.shape == (2, new)
  out = greedy_generate(model, ids, mask, images, max_new_tokens=new, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(out, ref)
  assert len(set(ref.ravel().tolist())) > 2  # A degenerate model would make this vacuous.


# ---------------------------------------------------------------- config.json mapping


def test_sparse_llava15_config_gets_transformers_defaults():
  # The published llava-hf/llava-1.5-7b-hf config.json lists only what differs from the defaults.
  hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "ignore_index": -100, "image_token_index": 32000, "pad_token_id": 32001,
        "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                        "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                        "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                          "vocab_size": 32000}}
  cfg = hf_io.config_from_hf(hf, dtype="bfloat16")
  t, v = cfg.text, cfg.vision
  assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
          t.intermediate_size, t.vocab_size, t.head_dim) == (4096, 32, 32, 32, 11008, 32064, 128)
  assert t.rope_theta == 10000.0 and t.rms_norm_eps == 1e-5 and not t.attention_bias
  assert (v.hidden_size, v.image_size, v.patch_size, v.hidden_act) == (1024, 336, 14, "quick_gelu")
  assert cfg.num_image_tokens == 576 and cfg.image_token_id == 32000
  assert cfg.compute_dtype == jnp.bfloat16 and cfg.params_dtype == jnp.float32
  # Our own export maps back to the same config.
  assert hf_io.config_from_hf(hf_io.config_to_hf(cfg), dtype="bfloat16") == cfg


# ---------------------------------------------------------------- bad input


def test_missing_paths_and_files(llama, tmp_path):
  _, _, path = llama
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    hf_io.load_pretrained(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_pretrained(empty)
  shutil.copy(os.path.join(path, "config.json"), empty)
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    hf_io.load_pretrained(empty)


def test_missing_shard_is_named(saved, tmp_path):
  _, _, _, _, sharded = saved
  copy = str(tmp_path / "copy")
  shutil.copytree(sharded, copy)
  victim = sorted(f for f in os.listdir(copy) if f.startswith("model-"))[1]
  os.unlink(os.path.join(copy, victim))
  with pytest.raises(FileNotFoundError, match=re.escape(victim)):
    hf_io.load_pretrained(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llava_next"), "llava_next"),
    (lambda c: c.update(architectures=["Qwen2VLForConditionalGeneration"]),
     "Qwen2VLForConditionalGeneration"),
    (lambda c: c["text_config"].update(model_type="mistral"), "mistral"),
    (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "siglip_vision_model"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}),
     "yarn"),
    (lambda c: c.update(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
])
def test_unsupported_configs_are_named(llama, tmp_path, edit, message):
  _, _, path = llama
  bad = _rewrite(path, str(tmp_path / "bad"), config=edit)
  with pytest.raises(ValueError, match=message):
    hf_io.load_pretrained(bad)


def test_missing_key_shape_mismatch_and_extra_keys(llama, tmp_path):
  _, ref, path = llama
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  bad = _rewrite(path, str(tmp_path / "missing"), drop={key})
  with pytest.raises(ValueError, match=r"missing weight .*layers\.1\.mlp\.up_proj\.weight"):
    hf_io.load_pretrained(bad)

  bad = _rewrite(path, str(tmp_path / "shape"),
                 config=lambda c: c["text_config"].update(intermediate_size=48))
  # The first mismatching tensor (in our parameter order) is named with both shapes.
  with pytest.raises(ValueError, match=r"shape mismatch for 'language_model\.model\.layers\.0\."
                     r"mlp\.down_proj\.weight'.*\(32, 64\).*\(32, 48\)"):
    hf_io.load_pretrained(bad)

  bad = _rewrite(path, str(tmp_path / "extra"),
                 extra={"model.adapter.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected weights.*model\.adapter\.weight"):
    hf_io.load_pretrained(bad)
  np.testing.assert_allclose(_ours(hf_io.load_pretrained(bad, strict=False)), ref, atol=1e-4,
                             rtol=0)


# ---------------------------------------------------------------- check_checkpoint (issue #17)


def _first_line_only(e) -> str:
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_check_checkpoint_accepts_a_checkpoint_without_reading_weights(llama):
  hf, _, path = llama
  assert hf_io.check_checkpoint(path).text.vocab_size == VOCAB


def test_check_checkpoint_names_a_missing_or_empty_directory(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    hf_io.check_checkpoint(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in _first_line_only(e)
  with pytest.raises(FileNotFoundError) as e:
    hf_io.check_checkpoint(tmp_path)
  message = _first_line_only(e)
  assert f"no config.json in checkpoint directory {tmp_path}" in message
  assert "save_pretrained" in message  # What a checkpoint directory must hold.


@pytest.mark.parametrize("content, what", [
    (b'{"model_type": "llava", "text_con', "is not valid JSON"),  # Truncated copy.
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not valid JSON"),  # Binary garbage.
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_corrupt_config_json_is_one_line_naming_the_file(llama, tmp_path, content, what):
  _, _, path = llama
  bad = tmp_path / "ckpt"
  shutil.copytree(path, bad)
  (bad / "config.json").write_bytes(content)
  with pytest.raises(ValueError) as e:
    hf_io.check_checkpoint(bad)
  message = _first_line_only(e)
  assert str(bad / "config.json") in message and what in message, message


def test_config_json_of_another_architecture_is_its_own_error(llama, tmp_path):
  hf, _, path = llama
  bad = tmp_path / "lm"
  shutil.copytree(path, bad)
  (bad / "config.json").write_text(hf.config.text_config.to_json_string())
  with pytest.raises(hf_io.UnsupportedModelError) as e:
    hf_io.check_checkpoint(bad)
  message = _first_line_only(e)
  assert str(bad / "config.json") in message and "'llama'" in message, message


def test_missing_weight_files_are_named_before_any_read(llama, tmp_path):
  _, _, path = llama
  bad = tmp_path / "ckpt"
  bad.mkdir()
  shutil.copy(os.path.join(path, "config.json"), bad)
  (bad / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:
    hf_io.check_checkpoint(bad)
  message = _first_line_only(e)
  assert f"no model.safetensors or model.safetensors.index.json in {bad}" in message
  assert "pytorch_model.bin" in message, message
