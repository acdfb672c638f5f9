"""Tests for hf_io.load_composed: LLaVA from a CLIP tower, a causal LM and a stage-1 projector.

Every part is cut out of one tiny random `transformers.LlavaForConditionalGeneration` and saved the
way the official parts are published (CLIPVisionModel / CLIPModel directory, LlamaForCausalLM
directory, LLaVA's `mm_projector.bin` state dict); the composed model must compute the logits of
the whole. No download; torch on CPU is the reference.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, micro_config
from visatb_jax.model import factory, hf_io
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

IMG, VOCAB, SIZE, P = 3, 64, 16, 4  # image token id, vocab, image side, tokens per image.
PROJECTOR_KEYS = {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"}


def _llava(*, vocab: int = VOCAB, image_token_id: int = IMG, seed: int = 0):
  """A tiny random LLaVA (CLIP tower + Llama) with non-trivial norms and biases."""
  torch.manual_seed(seed)
  eager = dict(attn_implementation="eager")
  vision = transformers.CLIPVisionConfig(
      image_size=SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, **eager)
  text = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, **eager)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_id=image_token_id, **eager)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # A wrong mapping of a norm or bias must not hide behind its init.
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(image_token_id: int = IMG, seed: int = 0):
  """Two rows with two images each: (ids, NHWC images for us, NCHW pixels for transformers)."""
  rng = np.random.default_rng(seed)
  t = lambda n: list(rng.integers(4, 60, n))  # Below every vocabulary used here.
  img = [image_token_id] * P
  ids = np.asarray([t(2) + img + t(1) + img + t(2), img + t(4) + img + t(1)], np.int64)
  nhwc = rng.normal(size=(2, 2, SIZE, SIZE, 3)).astype(np.float32)
  return ids, nhwc, nhwc.reshape(4, SIZE, SIZE, 3).transpose(0, 3, 1, 2)


def _torch_logits(hf, image_token_id: int = IMG) -> np.ndarray:
  ids, _, pixels = _inputs(image_token_id)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
  return out.logits.float().numpy()


@nnx.jit
def _logits(model, ids, images):
  return model(ids, images)


def _ours(model, image_token_id: int = IMG) -> np.ndarray:
  ids, images, _ = _inputs(image_token_id)
  return np.asarray(_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(images)))


def _projector_state(hf) -> dict:
  """The projector under LLaVA's stage-1 names (`model.mm_projector.{0,2}.{weight,bias}`)."""
  proj = hf.model.multi_modal_projector
  return {f"{PROJECTOR_KEYS[linear]}.{leaf}": getattr(getattr(proj, linear), leaf).detach().clone()
          for linear in PROJECTOR_KEYS for leaf in ("weight", "bias")}


def _save_text(hf, path: str) -> None:
  """The language model as a LlamaForCausalLM directory (as Vicuna is published)."""
  lm = transformers.LlamaForCausalLM(hf.config.text_config)
  lm.model.load_state_dict(hf.model.language_model.state_dict())
  lm.lm_head.load_state_dict(hf.lm_head.state_dict())
  lm.save_pretrained(path)


def _save_parts(hf, root) -> dict[str, str]:
  """Every published form of the parts under `root`; {name: path}."""
  out = {k: str(root / k) for k in ("vision", "clip", "text", "text_bin", "projector")}
  tower = transformers.CLIPVisionModel(hf.config.vision_config)
  tower.load_state_dict(hf.model.vision_tower.state_dict())
  tower.save_pretrained(out["vision"])
  # A whole CLIPModel, as openai/clip-vit-large-patch14-336: the tower plus a text side to skip.
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=hf.config.vision_config.to_dict(),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=50, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1)))
  clip.vision_model.load_state_dict(hf.model.vision_tower.state_dict())
  clip.save_pretrained(out["clip"])
  _save_text(hf, out["text"])
  # The same language model as a PyTorch pickle, as older releases ship it.
  os.makedirs(out["text_bin"])
  lm = transformers.LlamaForCausalLM.from_pretrained(out["text"])
  torch.save(lm.state_dict(), os.path.join(out["text_bin"], hf_io.TORCH_WEIGHTS_NAME))
  lm.config.save_pretrained(out["text_bin"])
  os.makedirs(out["projector"])
  state = _projector_state(hf)
  out["bin"] = os.path.join(out["projector"], "mm_projector.bin")
  torch.save(state, out["bin"])
  out["safetensors"] = str(root / "mm_projector.safetensors")
  safetensors_torch.save_file(state, out["safetensors"])
  return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """(reference logits, {part name: path}) of one tiny LLaVA cut into parts."""
  hf = _llava()
  return _torch_logits(hf), _save_parts(hf, tmp_path_factory.mktemp("parts"))


# ---------------------------------------------------------------- parity with the whole model


@pytest.mark.parametrize("vision, text, projector", [
    ("vision", "text", "bin"),  # The official release: mm_projector.bin.
    ("vision", "text", "safetensors"),
    ("clip", "text_bin", "projector"),  # A whole CLIPModel, .bin shards, the projector's dir.
])
def test_composed_logits_match_the_whole_llava(parts, vision, text, projector):
  ref, paths = parts
  model = hf_io.load_composed(paths[vision], paths[text], paths[projector], vocab_size=VOCAB,
                              image_token_id=IMG)
  assert model.config.text.vocab_size == VOCAB and model.config.image_token_id == IMG
  assert (model.config.vision_feature_layer, model.config.projector_hidden_act) == (-2, "gelu")
  np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)


def test_factory_builds_the_composed_model_from_the_config(parts):
  ref, paths = parts
  model_cfg = {"vision_path": paths["vision"], "text_path": paths["text"],
               "projector_path": paths["bin"], "init_seed": 0}
  config = factory.model_config(model_cfg, vocab_size=VOCAB, image_token_id=IMG)
  assert config == hf_io.composed_config(paths["vision"], paths["text"], paths["bin"],
                                         vocab_size=VOCAB, image_token_id=IMG)
  np.testing.assert_allclose(_ours(factory.build_model(model_cfg, config)), ref, atol=1e-4, rtol=0)
  abstract = factory.abstract_model(model_cfg, config)
  assert abstract.lm_head.kernel.shape == (32, VOCAB)
  assert factory.start_description(model_cfg).startswith(f"composed: vision {paths['vision']}")


# ---------------------------------------------------------------- <image> beyond the vocabulary


def test_vocabulary_grows_for_image_token_as_transformers_resizes(tmp_path):
  """Vicuna's 32000 tokens lack <image>: it takes the next id and the embeddings grow to a
  multiple of 64, new rows at the mean, as transformers' resize_token_embeddings."""
  base = 60
  hf = _llava(vocab=base, image_token_id=0)  # Only the parts are used, not this image id.
  paths = _save_parts(hf, tmp_path)
  # The reference: the same language model resized by transformers, <image> = 60.
  lm = transformers.LlamaForCausalLM.from_pretrained(paths["text"])
  lm.resize_token_embeddings(base + 1, pad_to_multiple_of=64)
  config = transformers.LlavaConfig(vision_config=hf.config.vision_config,
                                    text_config=lm.config, image_token_id=base,
                                    attn_implementation="eager")
  ref = transformers.LlavaForConditionalGeneration(config).eval()
  ref.model.vision_tower.load_state_dict(hf.model.vision_tower.state_dict())
  ref.model.multi_modal_projector.load_state_dict(hf.model.multi_modal_projector.state_dict())
  ref.model.language_model.load_state_dict(lm.model.state_dict())
  ref.lm_head.load_state_dict(lm.lm_head.state_dict())

  # No tokenizer given: <image> where adding it to the LM's tokenizer puts it.
  model = hf_io.load_composed(paths["vision"], paths["text"], paths["bin"])
  assert (model.config.image_token_id, model.config.text.vocab_size) == (base, 64)
  np.testing.assert_allclose(_ours(model, base), _torch_logits(ref, base), atol=1e-4, rtol=0)
  embed = np.asarray(model.language_model.embed_tokens.embedding.get_value())
  np.testing.assert_allclose(embed[base:], np.repeat(embed[:base].mean(0, keepdims=True), 4, 0),
                             rtol=0, atol=1e-7)
  # A tokenizer with <image> and <pad> appended (llava-hf's: 32002 ids -> 32064 rows).
  cfg = hf_io.composed_config(paths["vision"], paths["text"], paths["bin"], vocab_size=base + 2,
                              image_token_id=base)
  assert cfg.text.vocab_size == 64
  cfg = hf_io.composed_config(paths["vision"], paths["text"], paths["bin"], vocab_size=65,
                              image_token_id=base)
  assert cfg.text.vocab_size == 128


def test_vocab_with_image_token():
  assert hf_io.vocab_with_image_token(32000, 32002, 32000) == 32064
  assert hf_io.vocab_with_image_token(32000, None, 32000) == 32064
  assert hf_io.vocab_with_image_token(32064, 32002, 32000) == 32064  # llava-hf's: it fits.
  assert hf_io.vocab_with_image_token(300, 300, 4) == 300


# ---------------------------------------------------------------- the projector's config.json


def _with_projector_config(paths, tmp_path, **fields) -> str:
  directory = tmp_path / "pretrain"
  directory.mkdir()
  (directory / "mm_projector.safetensors").write_bytes(open(paths["safetensors"], "rb").read())
  (directory / "config.json").write_text(json.dumps({"model_type": "llava_llama", **fields}))
  return str(directory)


def test_projector_settings_come_from_the_stage1_config(parts, tmp_path):
  _, paths = parts
  pretrain = _with_projector_config(paths, tmp_path, mm_projector_type="mlp2x_gelu",
                                    mm_vision_select_layer=-1, mm_vision_select_feature="patch")
  cfg = hf_io.composed_config(paths["vision"], paths["text"], pretrain)
  assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "default"


def test_linear_projector_is_refused(parts, tmp_path):
  _, paths = parts
  pretrain = _with_projector_config(paths, tmp_path, mm_projector_type="linear")
  with pytest.raises(ValueError, match="mm_projector_type 'linear' is not supported"):
    hf_io.composed_config(paths["vision"], paths["text"], pretrain)


# ---------------------------------------------------------------- errors


def _one_line(e) -> str:
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_bin_without_torch_says_how_to_convert(parts, tmp_path, monkeypatch):
  ref, paths = parts
  projector = tmp_path / "mm_projector.bin"
  projector.write_bytes(open(paths["bin"], "rb").read())
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(hf_io.TorchRequiredError) as e:
    hf_io.load_composed(paths["vision"], paths["text"], str(projector))
  message = _one_line(e)
  assert str(projector) in message and "torch is not installed" in message, message
  with pytest.raises(hf_io.TorchRequiredError, match=re.escape(str(projector))):
    hf_io.check_projector_part(str(projector))
  with pytest.raises(hf_io.TorchRequiredError, match="AutoModelForCausalLM.from_pretrained"):
    hf_io.check_text_part(paths["text_bin"])
  monkeypatch.undo()
  # The command in the message converts the file; the result composes the same model.
  command = re.search(r"installed: (python -c .*) and use (\S+)$", message)
  assert command, message
  argv = shlex.split(command.group(1))
  subprocess.run([sys.executable, *argv[1:]], check=True, cwd=REPO, timeout=300)
  converted = command.group(2)
  assert converted == str(tmp_path / "mm_projector.safetensors")
  model = hf_io.load_composed(paths["vision"], paths["text"], converted, vocab_size=VOCAB,
                              image_token_id=IMG)
  np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)


def test_missing_parts_are_named(parts, tmp_path):
  _, paths = parts
  nowhere = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"vision tower directory {re.escape(nowhere)}"):
    hf_io.load_composed(nowhere, paths["text"], paths["bin"])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"no config.json in language model directory "
                     f"{re.escape(str(empty))}"):
    hf_io.load_composed(paths["vision"], str(empty), paths["bin"])
  with pytest.raises(FileNotFoundError, match=f"projector file {re.escape(nowhere)}"):
    hf_io.load_composed(paths["vision"], paths["text"], nowhere)
  with pytest.raises(FileNotFoundError, match="no mm_projector.safetensors or mm_projector.bin"):
    hf_io.load_composed(paths["vision"], paths["text"], str(empty))


def test_parts_swapped_or_of_another_kind_are_named(parts, tmp_path):
  _, paths = parts
  with pytest.raises(ValueError, match="model_type 'llama' is not a CLIP vision tower"):
    hf_io.load_composed(paths["text"], paths["text"], paths["bin"])
  whole = tmp_path / "llava"
  _llava().save_pretrained(str(whole))
  with pytest.raises(ValueError, match="config of a whole 'llava' model"):
    hf_io.load_composed(paths["vision"], str(whole), paths["bin"])


def test_projector_with_wrong_keys_or_shapes_is_named(parts, tmp_path):
  _, paths = parts
  state = _projector_state(_llava())
  wrong = str(tmp_path / "no_second.safetensors")
  safetensors_torch.save_file({k: v for k, v in state.items() if ".2." not in k}, wrong)
  with pytest.raises(ValueError, match=r"missing weight 'model\.mm_projector\.2\.bias'.*"
                     + re.escape(wrong)):
    hf_io.load_composed(paths["vision"], paths["text"], wrong)
  narrow = str(tmp_path / "narrow.safetensors")
  safetensors_torch.save_file({**state, "model.mm_projector.0.weight": torch.zeros(32, 16)},
                              narrow)
  with pytest.raises(ValueError, match=r"shape mismatch for 'model\.mm_projector\.0\.weight'.*"
                     r"\(32, 16\).*\(32, 32\)"):
    hf_io.load_composed(paths["vision"], paths["text"], narrow)
  extra = str(tmp_path / "extra.safetensors")
  safetensors_torch.save_file({**state, "model.other.weight": torch.zeros(2)}, extra)
  with pytest.raises(ValueError, match=r"unexpected weights .*model\.other\.weight"):
    hf_io.load_composed(paths["vision"], paths["text"], extra)


def test_part_fields_must_come_all_three_and_without_path():
  with pytest.raises(ValueError, match=r"config\.model\.path and config\.model\.\{vision_path,"
                     r"text_path,projector_path\} are both set"):
    factory.model_parts({"path": "/a", "vision_path": "/v", "text_path": "/t",
                         "projector_path": "/p"})
  with pytest.raises(ValueError, match=r"config\.model\.\{vision_path\} set without config\.model"
                     r"\.\{text_path,projector_path\}"):
    factory.model_parts({"vision_path": "/v"})
  assert factory.model_parts({"path": "/a", "vision_path": ""}) is None


# ---------------------------------------------------------------- the run config


def _run_config(**model):
  config = micro_config()
  for key, value in model.items():
    config.model[key] = value
  return config


def test_run_config_checks_the_parts_before_any_stage(parts, tmp_path):
  _, paths = parts
  good = dict(vision_path=paths["vision"], text_path=paths["text"], projector_path=paths["bin"])
  built = config_lib.build(_run_config(**good))
  assert built.section("model")["projector_path"] == paths["bin"]
  # Empty part fields are not hashed: declaring them changes no existing run's hashes.
  plain = config_lib.build(micro_config()).sections["model"]
  assert config_lib.build(_run_config(vision_path="", text_path="", projector_path="")
                          ).sections["model"] == plain
  with pytest.raises(ConfigError, match="are both set"):
    config_lib.build(_run_config(path=paths["text"], **good))
  with pytest.raises(ConfigError, match="set without"):
    config_lib.build(_run_config(text_path=paths["text"]))
  with pytest.raises(ConfigError, match=r"config\.model\.projector_path: projector file .*nowhere"):
    config_lib.build(_run_config(**{**good, "projector_path": str(tmp_path / "nowhere")}))
  with pytest.raises(ConfigError, match=r"config\.model\.vision_path: .*not a CLIP vision tower"):
    config_lib.build(_run_config(**{**good, "vision_path": paths["text"]}))
  config = _run_config(**good)
  config.data.source = "llava_json"
  config.data.root = str(tmp_path)
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer is empty"):
    config_lib.build(config)
