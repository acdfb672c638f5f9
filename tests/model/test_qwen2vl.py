"""Qwen2-VL in NNX against transformers: vision tower, M-RoPE, logits, checkpoints, generation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from visatb_jax.data import qwen2vl_image
from visatb_jax.model import qwen2vl, qwen2vl_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMG, VIDEO, V_START, V_END, VOCAB = 3, 4, 5, 6, 64
MERGE, PATCH, TEMPORAL = 2, 14, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
# Grids in patches (t, h, w): one wide image, then a smaller one of another shape.
GRID_A, GRID_B = (1, 4, 6), (1, 2, 4)


def _hf_model(*, seed: int = 0, tied: bool = False):
  """A tiny random Qwen2VLForConditionalGeneration (eager attention, non-trivial norms/biases)."""
  torch.manual_seed(seed)
  config = transformers.Qwen2VLConfig(
      vision_config=dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2,
                         patch_size=PATCH, spatial_merge_size=MERGE,
                         temporal_patch_size=TEMPORAL),
      # head_dim 12: 6 rotary frequencies, split (t, h, w) = (2, 2, 2).
      text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                        "mrope_section": [2, 2, 2]}),
      image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=V_START,
      vision_end_token_id=V_END, tie_word_embeddings=tied, attn_implementation="eager")
  model = transformers.Qwen2VLForConditionalGeneration(config).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so a wrong mapping cannot hide.
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ours_from(hf) -> qwen2vl.Qwen2VLForConditionalGeneration:
  config = qwen2vl_io.config_from_hf(hf.config.to_dict())
  return qwen2vl_io.from_state_dict(config, {k: v.numpy() for k, v in hf.state_dict().items()})


def _pixels(grids, seed=0):
  n = sum(t * h * w for t, h, w in grids)
  return np.random.default_rng(seed).normal(size=(n, PATCH_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def pair():
  hf = _hf_model()
  return hf, _ours_from(hf)


# ---------------------------------------------------------------- vision tower


@nnx.jit
def _vision(visual, batch):
  return visual.hidden_states(batch)[-1], visual(batch)


@pytest.mark.parametrize("grids", [[GRID_A], [GRID_A, GRID_B]], ids=["one", "two_sizes"])
def test_vision_tower_matches_transformers(pair, grids):
  hf, ours = pair
  pixels = _pixels(grids)
  with torch.no_grad():
    ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids))
  hidden, merged = _vision(ours.visual, qwen2vl.vision_batch(pixels, grids, MERGE))
  np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(merged), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
  assert merged.shape == (qwen2vl.num_image_tokens(grids, MERGE).sum(), 48)


def test_vision_packing_isolates_images_and_padding(pair):
  _, ours = pair
  pixels = _pixels([GRID_A, GRID_B])
  n_a = int(np.prod(GRID_A))
  _, both = _vision(ours.visual, qwen2vl.vision_batch(pixels, [GRID_A, GRID_B], MERGE))
  _, alone = _vision(ours.visual, qwen2vl.vision_batch(pixels[n_a:], [GRID_B], MERGE))
  # Padded to a fixed patch count: the real tokens are unchanged, padding is never mixed in.
  _, padded = _vision(ours.visual, qwen2vl.vision_batch(pixels, [GRID_A, GRID_B], MERGE,
                                                        pad_to=48))
  k_a = n_a // MERGE**2
  np.testing.assert_allclose(np.asarray(both[k_a:]), np.asarray(alone), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(padded[:both.shape[0]]), np.asarray(both), atol=1e-5,
                             rtol=0)
  assert padded.shape[0] == 12
  with pytest.raises(ValueError, match="pad_to"):
    qwen2vl.vision_batch(pixels, [GRID_A, GRID_B], MERGE, pad_to=34)
  with pytest.raises(ValueError, match="patches"):
    qwen2vl.vision_batch(pixels[:-1], [GRID_A, GRID_B], MERGE)


# ---------------------------------------------------------------- M-RoPE positions and logits


def _tokens(grid):
  return [IMG] * (int(np.prod(grid)) // MERGE**2)


def _row(rng, *parts):
  """Text lengths (ints) and image grids (tuples) -> ids; each image wrapped in start/end."""
  ids = []
  for part in parts:
    ids += (list(rng.integers(7, VOCAB, part)) if isinstance(part, int) else
            [V_START] + _tokens(part) + [V_END])
  return ids


def _left_pad(rows):
  width = max(map(len, rows))
  ids = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return ids, mask


def _hf_rope_index(hf, ids, grids, mask=None):
  kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
  pos, deltas = hf.model.get_rope_index(
      torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
      image_grid_thw=torch.tensor(grids) if grids else None, **kw)
  return pos.numpy(), deltas.numpy().ravel()


@pytest.mark.parametrize("n, cut", [(65, 40), (150, 150), (288, 100), (301, 7)])
def test_tower_attention_in_query_blocks_equals_one_block(n, cut):
  """The tower attends one query block at a time (padded to whole blocks in a lax.map): the same
  output as all queries at once, with two images' patches kept apart by the mask."""
  rng = np.random.default_rng(n)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for _ in range(3))
  image = np.arange(n) < cut
  mask = jnp.asarray(np.broadcast_to(image[:, None] == image[None, :], (2, n, n)))
  assert qwen2vl.query_block_size(n) < n  # more than one block, else this tests nothing
  got = jax.jit(qwen2vl._blocked_attention)(q, k, v, mask)
  np.testing.assert_allclose(got, qwen2vl._attention(q, k, v, mask), atol=1e-5)


def test_rope_index_matches_transformers(pair):
  hf, _ = pair
  rng = np.random.default_rng(1)
  # Several images in a row, an image first, a text-only row; left-padded.
  rows = [_row(rng, 2, GRID_A, 3, GRID_B, 1), _row(rng, GRID_B, 4), _row(rng, 5)]
  grids = [GRID_A, GRID_B, GRID_B]
  ids, mask = _left_pad(rows)
  for m in (None, mask):
    ref_pos, ref_deltas = _hf_rope_index(hf, ids, grids, m)
    pos, deltas = qwen2vl_image.get_rope_index(ids, grids, m, image_token_id=IMG,
                                         spatial_merge_size=MERGE)
    np.testing.assert_array_equal(pos, ref_pos.transpose(1, 0, 2))  # Ours: batch first.
    np.testing.assert_array_equal(deltas, ref_deltas)
  # Packed: each sample's positions as if alone in its row.
  packed = rows[1] + rows[0]
  seg = [1] * len(rows[1]) + [2] * len(rows[0])
  pos, _ = qwen2vl_image.get_rope_index([packed], [GRID_B, GRID_A, GRID_B], segment_ids=[seg],
                                  image_token_id=IMG, spatial_merge_size=MERGE)
  first, _ = qwen2vl_image.get_rope_index([rows[1]], [GRID_B], image_token_id=IMG)
  second, _ = qwen2vl_image.get_rope_index([rows[0]], [GRID_A, GRID_B], image_token_id=IMG)
  np.testing.assert_array_equal(pos, np.concatenate([first, second], axis=2))
  with pytest.raises(ValueError, match="no image tokens"):
    qwen2vl_image.get_rope_index(ids, grids + [GRID_A], mask, image_token_id=IMG)
  with pytest.raises(ValueError, match="needs 6 image tokens"):
    qwen2vl_image.get_rope_index(ids, [GRID_A, GRID_A, GRID_B], mask, image_token_id=IMG)
  with pytest.raises(ValueError, match="more image placeholder runs"):
    qwen2vl_image.get_rope_index(ids, grids[:2], mask, image_token_id=IMG)


@nnx.jit
def _logits(model, ids, vision, positions):
  return model(ids, vision, positions)


def _compare_logits(hf, ours, rows, grids):
  ids = np.asarray(rows, np.int64)
  with torch.no_grad():
    if grids:
      pixels = _pixels(grids, seed=3)
      ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
               image_grid_thw=torch.tensor(grids),
               mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64))).logits.numpy()
      vision = qwen2vl.vision_batch(pixels, grids, MERGE)
      positions, _ = qwen2vl_image.get_rope_index(ids, grids, image_token_id=IMG)
      positions = jnp.asarray(positions)
    else:
      ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
      vision = positions = None
  got = np.asarray(_logits(ours, jnp.asarray(ids, jnp.int32), vision, positions))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  return got


@pytest.mark.parametrize("case", ["one_image", "two_sizes", "two_rows", "text_only"])
def test_logits_match_transformers(pair, case):
  hf, ours = pair
  rng = np.random.default_rng(2)
  if case == "one_image":
    rows, grids = [_row(rng, 3, GRID_A, 4)], [GRID_A]
  elif case == "two_sizes":
    rows, grids = [_row(rng, 2, GRID_A, 3, GRID_B, 2)], [GRID_A, GRID_B]
  elif case == "two_rows":  # Images of both rows in one packed vision sequence.
    rows, grids = [_row(rng, 2, GRID_B, 7), _row(rng, 1, GRID_B, 2, GRID_B, 2)], [GRID_B] * 3
  else:
    rows, grids = [_row(rng, 9), _row(rng, 9)], []
  got = _compare_logits(hf, ours, rows, grids)
  assert np.isfinite(got).all() and got.std() > 1e-2  # A vacuous model would match anything.


def _row_images(grids_per_row, pixels, slots, budget):
  """The processor's packed patches laid out as `RowImages` ([B, slots, budget, patch_dim])."""
  values = np.zeros((len(grids_per_row), slots, budget, PATCH_DIM), np.float32)
  grid = np.zeros((len(grids_per_row), slots, 3), np.int32)
  at = 0
  for r, grids in enumerate(grids_per_row):
    for m, g in enumerate(grids):
      n = int(np.prod(g))
      values[r, m, :n], grid[r, m] = pixels[at:at + n], g
      at += n
  return qwen2vl.RowImages(jnp.asarray(values), jnp.asarray(grid))


def test_row_images_match_transformers_and_the_packed_form(pair):
  """The per-row slot layout of training batches: each row splices its own slots' features."""
  hf, ours = pair
  rng = np.random.default_rng(4)
  # Two images of different sizes; one image in the second slot's place of another row; text.
  grids_per_row = [[GRID_A, GRID_B], [GRID_B], []]
  width = 30
  rows = [_row(rng, 2, GRID_A, 3, GRID_B, 2), _row(rng, 4, GRID_B, 5), _row(rng, 9)]
  rows = [r + list(rng.integers(7, VOCAB, width - len(r))) for r in rows]
  grids = [g for gs in grids_per_row for g in gs]
  ids = np.asarray(rows, np.int64)
  pixels = _pixels(grids, seed=9)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
             image_grid_thw=torch.tensor(grids),
             mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64))).logits.numpy()
  positions, _ = qwen2vl_image.get_rope_index(ids, grids, image_token_id=IMG)
  # A budget above the largest image: padding patches must not reach any real token.
  images = _row_images(grids_per_row, pixels, slots=2, budget=32)
  got = np.asarray(_logits(ours, jnp.asarray(ids, jnp.int32), images, jnp.asarray(positions)))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "images": images.pixel_values,
           "image_grid": images.grid, "positions": jnp.asarray(positions),
           "segment_ids": jnp.ones(ids.shape, jnp.int32)}
  inputs = ours.batch_inputs(batch)
  hidden = nnx.jit(lambda m, i, kw: m.hidden_states(i, **kw))(ours, batch["input_ids"], inputs)
  np.testing.assert_allclose(np.asarray(ours.logits(hidden)), ref, atol=1e-4, rtol=0)


def test_slot_layout_is_vision_positions_per_slot():
  grids = np.asarray([[GRID_A, GRID_B], [(1, 2, 2), (0, 0, 0)]], np.int32)
  segments, positions = qwen2vl.slot_layout(jnp.asarray(grids), 28, MERGE)
  for r in range(2):
    for m in range(2):
      n = int(np.prod(grids[r, m]))
      want_seg, want_pos = qwen2vl.vision_positions(grids[r, m][None], MERGE) if n else (
          np.zeros(0, np.int32), np.zeros((0, 2), np.int32))
      np.testing.assert_array_equal(np.asarray(segments[r, m, :n]), want_seg)
      np.testing.assert_array_equal(np.asarray(positions[r, m, :n]), want_pos)
      assert (np.asarray(segments[r, m, n:]) == 0).all()  # Padding: its own segment 0.


def test_splice_row_features_fills_each_row_from_its_slots():
  # Row 0: slots of 2 and 1 real tokens (budget 3); row 1: one slot of 3, one unused.
  feats = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3, 1)
  slot_tokens = jnp.asarray([[2, 1], [3, 0]])
  ids = jnp.asarray([[0, IMG, IMG, 0, IMG, 0], [IMG, IMG, IMG, 0, 0, 0]])
  embeds = jnp.full((2, 6, 1), -1.0)
  out = np.asarray(qwen2vl.splice_row_features(embeds, ids, feats, slot_tokens, IMG))[..., 0]
  np.testing.assert_array_equal(out, [[-1, 0, 1, -1, 3, -1], [6, 7, 8, -1, -1, -1]])


# ---------------------------------------------------------------- checkpoints (qwen2vl_io)

_IO_RNG = np.random.default_rng(2)
IO_ROWS, IO_GRIDS = [_row(_IO_RNG, 2, GRID_A, 3, GRID_B, 2)], [GRID_A, GRID_B]


def _torch_logits(hf) -> np.ndarray:
  ids = np.asarray(IO_ROWS, np.int64)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(_pixels(IO_GRIDS, seed=3)),
              image_grid_thw=torch.tensor(IO_GRIDS),
              mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64))).logits.numpy()


def _ours(model) -> np.ndarray:
  ids = np.asarray(IO_ROWS, np.int64)
  positions, _ = qwen2vl_image.get_rope_index(ids, IO_GRIDS, image_token_id=IMG)
  vision = qwen2vl.vision_batch(_pixels(IO_GRIDS, seed=3), IO_GRIDS, MERGE)
  return np.asarray(_logits(model, jnp.asarray(ids, jnp.int32), vision, jnp.asarray(positions)))


@pytest.fixture(scope="module", params=["untied", "tied"])
def saved(request, tmp_path_factory):
  """(torch model, its logits, single-file dir, sharded dir)."""
  hf = _hf_model(seed=4, tied=request.param == "tied")
  root = tmp_path_factory.mktemp(request.param)
  single, sharded = str(root / "single"), str(root / "sharded")
  hf.save_pretrained(single)
  hf.save_pretrained(sharded, max_shard_size="100KB")
  return hf, _torch_logits(hf), single, sharded


def test_load_matches_transformers_single_and_sharded(saved):
  hf, ref, single, sharded = saved
  assert os.path.isfile(os.path.join(sharded, qwen2vl_io.SAFE_WEIGHTS_INDEX_NAME))
  for path in (single, sharded):
    model = qwen2vl_io.load_pretrained(path)
    np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)
  cfg = model.config
  tied = hf.config.tie_word_embeddings
  assert cfg.text.tie_word_embeddings == tied and (model.lm_head is None) == tied
  assert cfg.mrope_section == (2, 2, 2) and cfg.text.rope_theta == 500.0
  assert cfg.image_token_id == IMG and cfg.vision_start_token_id == V_START
  assert cfg.vision.embed_dim == 32 and cfg.vision.mlp_dim == 64


def test_save_then_transformers_and_ours_load_same_logits(saved, tmp_path):
  _, ref, single, _ = saved
  model = qwen2vl_io.load_pretrained(single)
  for name, kw in (("one", {}), ("shards", {"max_shard_size": "100KB"})):
    out = str(tmp_path / name)
    qwen2vl_io.save_pretrained(model, out, **kw)
    assert os.path.isfile(os.path.join(out, qwen2vl_io.SAFE_WEIGHTS_INDEX_NAME)) == (
        name == "shards")
    hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    np.testing.assert_allclose(_torch_logits(hf.eval()), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(_ours(qwen2vl_io.load_pretrained(out)), _ours(model))
  qwen2vl_io.save_pretrained(model, out)  # A smaller save over a sharded one: no stale shards.
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_save_lora_model_writes_merged_weights(saved, tmp_path):
  from visatb_jax.model import lora
  _, ref, single, _ = saved
  model = qwen2vl_io.load_pretrained(single)
  lora.apply_lora(model, rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"),
                  rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for layer in lora.lora_layers(model).values():  # Zero B would make the merge invisible.
    layer.lora.lora_b.set_value(0.2 * jax.random.normal(next(keys), layer.lora.lora_b.shape))
  adapted = _ours(model)
  assert np.abs(adapted - ref).max() > 1e-2
  out = str(tmp_path / "lora")
  qwen2vl_io.save_pretrained(model, out)
  hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  np.testing.assert_allclose(_torch_logits(hf.eval()), adapted, atol=1e-4, rtol=0)
  assert lora.has_lora(model)  # Merged on the fly: the model keeps its adapters.


def _rewrite(src: str, dst: str, rename=lambda k: k, drop=(), config=None) -> str:
  """Copies a single-file checkpoint with keys renamed / dropped and the config edited."""
  import json
  from safetensors import numpy as st_numpy
  os.makedirs(dst)
  tensors = st_numpy.load_file(os.path.join(src, "model.safetensors"))
  st_numpy.save_file({rename(k): v for k, v in tensors.items() if k not in drop},
                     os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  if config:
    cfg = config(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


def _module_layout(key: str) -> str:
  """transformers 5's in-memory names: `model.visual.*`, `model.language_model.*`."""
  for old, new in (("visual.", "model.visual."), ("model.", "model.language_model.")):
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _published_config(cfg):
  """Flat text fields, `rope_scaling: {type: mrope}`, `in_chans`: the published config.json."""
  text = cfg.pop("text_config")
  rope = text.pop("rope_parameters")
  cfg.update({k: v for k, v in text.items() if k not in ("model_type", "dtype")})
  cfg["rope_theta"] = rope["rope_theta"]
  cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
  vision = cfg["vision_config"]
  vision["in_chans"] = vision.pop("in_channels")
  vision.pop("rope_parameters", None)
  vision["model_type"] = "qwen2_vl"  # Sic: older checkpoints.
  return cfg


def test_other_key_and_config_layouts_load_the_same(saved, tmp_path):
  _, ref, single, _ = saved
  # transformers writes the published key layout (`visual.*`, `model.layers.*`), and so do we.
  with safe_open(os.path.join(single, "model.safetensors"), "numpy") as f:
    keys = set(f.keys())
  assert "visual.patch_embed.proj.weight" in keys and "model.embed_tokens.weight" in keys
  model = qwen2vl_io.load_pretrained(single)
  ours = str(tmp_path / "ours")
  qwen2vl_io.save_pretrained(model, ours)
  with safe_open(os.path.join(ours, "model.safetensors"), "numpy") as f:
    assert set(f.keys()) == keys
  other = _rewrite(single, str(tmp_path / "other"), _module_layout, config=_published_config)
  loaded = qwen2vl_io.load_pretrained(other)
  assert loaded.config == model.config
  np.testing.assert_allclose(_ours(loaded), ref, atol=1e-4, rtol=0)


def test_load_errors_are_named(saved, tmp_path):
  _, _, single, _ = saved
  key = "visual.blocks.1.attn.qkv.bias"
  with pytest.raises(ValueError, match=f"missing weight '{key}'"):
    qwen2vl_io.load_pretrained(_rewrite(single, str(tmp_path / "missing"), drop=(key,)))

  def deeper(cfg):
    cfg["vision_config"]["depth"] = 3
    return cfg

  with pytest.raises(ValueError, match="missing weight 'visual.blocks.2"):
    qwen2vl_io.load_pretrained(_rewrite(single, str(tmp_path / "deeper"), config=deeper))

  def wider(cfg):
    cfg["vision_config"]["mlp_ratio"] = 3
    return cfg

  with pytest.raises(ValueError, match="shape mismatch for 'visual.blocks.0.mlp.fc1"):
    qwen2vl_io.load_pretrained(_rewrite(single, str(tmp_path / "wider"), config=wider))

  def sliding(cfg):
    cfg["text_config"]["use_sliding_window"] = True
    return cfg

  with pytest.raises(ValueError, match="use_sliding_window"):
    qwen2vl_io.load_pretrained(_rewrite(single, str(tmp_path / "sliding"), config=sliding))
  with pytest.raises(ValueError, match="model_type"):
    qwen2vl_io.config_from_hf({"model_type": "llava"})
  with pytest.raises(FileNotFoundError):
    qwen2vl_io.load_pretrained(str(tmp_path / "nowhere"))


def test_factory_builds_qwen2vl_when_config_json_says_so(saved):
  from visatb_jax.model import factory, lora
  _, ref, single, _ = saved
  model_cfg = {"path": single}
  config = factory.model_config(model_cfg, vocab_size=VOCAB, image_token_id=IMG)
  assert config == qwen2vl_io.load_config(single)
  model = factory.build_model(model_cfg, config)
  assert isinstance(model, qwen2vl.Qwen2VLForConditionalGeneration)
  np.testing.assert_allclose(_ours(model), ref, atol=1e-4, rtol=0)

  def shapes(m):
    return {p: (v.get_value().shape, v.get_value().dtype)
            for p, v in nnx.to_flat_state(nnx.state(m))}

  abstract = factory.abstract_model(model_cfg, config)
  assert isinstance(abstract, qwen2vl.Qwen2VLForConditionalGeneration)
  assert shapes(abstract) == shapes(model)
  with pytest.raises(ValueError, match="differs from image_token_id 3 in"):
    factory.model_config(model_cfg, image_token_id=IMG + 1)
  assert lora.has_lora(factory.build_model({"path": single, "lora": {"rank": 2}}, config))


# ---------------------------------------------------------------- greedy generation


def test_greedy_generation_matches_transformers_generate(pair):
  hf, ours = pair
  rng = np.random.default_rng(5)
  # Different image counts and sizes per row, a text-only row, left padding.
  rows = [_row(rng, 2, GRID_A, 3), _row(rng, 1, GRID_B, 2, GRID_B, 1), _row(rng, 6)]
  grids = [GRID_A, GRID_B, GRID_B]
  ids, mask = _left_pad(rows)
  pixels = _pixels(grids, seed=6)
  new = 8
  with torch.no_grad():
    # eos None: both sides produce exactly `new` tokens, however the random model behaves.
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
                      do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
  ref = ref[:, ids.shape[1]:].numpy()
  assert ref.shape == (3, new)
  # Patches padded to a fixed count (one compile for any image sizes); eos_id and pad_id are
  # traced, so the second call below reuses this compile.
  positions, _ = qwen2vl_image.get_rope_index(ids, grids, mask, image_token_id=IMG)
  out = qwen2vl.greedy_generate(ours, ids, mask, positions, pixels, grids, max_new_tokens=new,
                                eos_id=-1,
                                pad_id=0, pad_patches_to=64)
  np.testing.assert_array_equal(out, ref)
  assert len(set(ref.ravel().tolist())) > 2  # A degenerate model would make this vacuous.
  # EOS: the row stops there (EOS itself not emitted), the others run on.
  eos = int(ref[0, 2])
  stopped = qwen2vl.greedy_generate(ours, ids, mask, positions, pixels, grids,
                                    max_new_tokens=new,
                                    eos_id=eos, pad_id=-7, pad_patches_to=64)
  for row, want in zip(stopped, ref):
    hit = np.flatnonzero(want == eos)
    cut = hit[0] if hit.size else new
    np.testing.assert_array_equal(row[:cut], want[:cut])
    assert (row[cut:] == -7).all()


# ---------------------------------------------------------------- LoRA on the decoder


@pytest.mark.slow  # ~10 s or more on 2 cores: not in the quick subset (README)
def test_lora_adapts_only_the_decoder_and_trains_only_adapters(pair):
  from visatb_jax.model import lora
  hf, _ = pair
  model = _ours_from(hf)  # Its own copy: `pair` is shared by the other tests.
  rng = np.random.default_rng(7)
  ids = np.asarray([_row(rng, 2, GRID_A, 3, GRID_B, 2)], np.int64)
  grids = [GRID_A, GRID_B]
  positions, _ = qwen2vl_image.get_rope_index(ids, grids, image_token_id=IMG)
  batch = (jnp.asarray(ids, jnp.int32), qwen2vl.vision_batch(_pixels(grids, seed=8), grids, MERGE),
           jnp.asarray(positions))
  before = np.asarray(_logits(model, *batch))

  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
  layers = lora.lora_layers(model)
  # Every projection of the (stacked) decoder layers, nothing in the vision tower or lm_head.
  assert sorted(layers) == sorted(
      ("language_model", "layers", block, name)
      for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names)
  q = layers[("language_model", "layers", "self_attn", "q_proj")]
  assert q.bias is not None and q.lora.lora_a.shape[0] == 2  # One adapter per layer.
  # B = 0: no change. Not bit for bit: with q/k/v biases XLA:CPU may fuse the bias add into the
  # matmul differently once the adapter's (zero) term joins it; the per-layer decoder did the
  # same at other shapes (measured: 7e-8 here, 1.4e-6 on a text-only hidden-48 decoder).
  np.testing.assert_allclose(np.asarray(_logits(model, *batch)), before, atol=1e-6, rtol=0)

  graphdef, adapters, rest = nnx.split(model, lora.lora_filter, ...)

  @jax.jit
  def step(adapters, rest):
    def loss_fn(a):
      logits = nnx.merge(graphdef, a, rest)(*batch)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, batch[0][:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    return loss, jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads)

  flat_before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  loss0, trained = step(adapters, rest)
  loss1, trained = step(trained, rest)  # Step 2: A moves too, once B is no longer zero.
  loss2, trained = step(trained, rest)
  assert float(loss2) < float(loss0)
  nnx.update(model, trained)
  flat_after = dict(nnx.to_flat_state(nnx.state(model)))
  assert flat_after.keys() == flat_before.keys()
  for path, var in flat_after.items():
    moved = not np.array_equal(np.asarray(var.get_value()), flat_before[path])
    assert moved == isinstance(var, nnx.LoRAParam), path
  assert not np.allclose(np.asarray(_logits(model, *batch)), before, atol=1e-4)


def test_lora_trainable_filters_and_sharding_on_qwen2vl(pair):
  from visatb_jax.model import lora
  from visatb_jax.runtime import sharding
  config = pair[1].config

  def build(with_lora):
    model = qwen2vl.Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    return lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1)) if with_lora else model

  def parts(model, filt):
    """The top-level pieces a filter selects: 'adapters', 'decoder', 'tower', 'merger', ..."""
    out = set()
    for path, var in nnx.to_flat_state(nnx.state(model, filt)):
      out.add("adapters" if isinstance(var, nnx.LoRAParam) else
              "merger" if "merger" in path else "tower" if path[0] == "visual" else path[0])
    return out

  plain, adapted = nnx.eval_shape(lambda: build(False)), nnx.eval_shape(lambda: build(True))
  # The merger is Qwen2-VL's projector: trained with the adapters, never frozen with the tower.
  assert parts(adapted, lora.trainable_filter(True, lora=True)) == {"adapters", "merger"}
  assert parts(adapted, lora.trainable_filter(False, lora=True)) == {"adapters", "merger",
                                                                     "tower"}
  assert parts(plain, lora.trainable_filter(True)) == {"language_model", "lm_head", "merger"}
  assert parts(plain, lora.trainable_filter(False)) == {"language_model", "lm_head", "merger",
                                                        "tower"}
  # Every adapter has a sharding rule (it follows the layer it adapts).
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:8])
  shardings = sharding.param_shardings(nnx.state(adapted), mesh, strict=True)
  q = shardings["language_model"]["layers"]["self_attn"]["q_proj"]
  assert q["lora"]["lora_b"].get_value().spec == P(None, None, "tensor")  # [layer, rank, out]


def test_save_writes_the_tokenizer_and_its_chat_template(saved, tmp_path):
  from visatb_jax.data import template  # pylint: disable=g-import-not-at-top
  from visatb_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  _, _, single, _ = saved
  tok = tokenizer_lib.train_tokenizer(["a red square", "two blue circles"], vocab_size=270,
                                      save_dir=None)
  tok.add_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                  "<|vision_end|>"], special_tokens=True)
  tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                       "<|im_end|>\n{% endfor %}")
  out = str(tmp_path / "with_tokenizer")
  qwen2vl_io.save_pretrained(qwen2vl_io.load_pretrained(single), out, tokenizer=tok)
  back = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert back.get_vocab() == tok.get_vocab() and back.chat_template == tok.chat_template
  # The pipeline reads it as a Qwen2-VL tokenizer: the qwen2vl template's image token is there.
  loaded = tokenizer_lib.load_pretrained_tokenizer(out, image_token=template.IMAGE_PAD)
  assert template.image_token_id(loaded, "qwen2vl") == tok.convert_tokens_to_ids("<|image_pad|>")
