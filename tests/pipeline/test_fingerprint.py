"""Input-file fingerprints: the user files the data stage reads are part of its hash.

No stage runs here: the files are written by hand and the manifest is filled in, so that the
checks the runner makes before any stage (stale inputs, another config's run directory) take
a second.
"""

import builtins
import json
import os

import pytest

from visatb_jax import pipeline
from visatb_jax.data import image_digest
from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import data as data_lib
from visatb_jax.pipeline import runner
from visatb_jax.pipeline.run_dir import Manifest, config_hash
from visatb_jax.runtime import fileio

from conftest import micro_config

TASKS = ("caption", "vqa", "count", "grounding", "chat")


def _sample(i, image=True):
  row = {"id": f"s{i}", "conversations": [{"from": "human", "value": "What is it?"},
                                          {"from": "gpt", "value": "a square"}]}
  if image:
    row["image"] = f"images/{i}.png"
  return row


@pytest.fixture(autouse=True)
def _image_digest_cache(tmp_path, monkeypatch):
  """A cache of image digests private to the test (never the user's)."""
  monkeypatch.setenv(image_digest.ENV_CACHE_DIR, str(tmp_path / "cache"))


@pytest.fixture
def user_files(tmp_path):
  """Task files of every split (one image per sample, chat text-only) and a tokenizer directory
  holding other files too; the config that reads them."""
  root = tmp_path / "data"
  (root / "images").mkdir(parents=True)
  for i in range(3):
    (root / "images" / f"{i}.png").write_bytes(b"not decoded by the fingerprint")
  for split in ("train", "val", "test"):
    for task in TASKS:
      rows = [_sample(i, image=task != "chat") for i in range(3)]
      (root / f"{task}_{split}.json").write_text(json.dumps(rows))
  ckpt = tmp_path / "tokenizer"
  ckpt.mkdir()
  (ckpt / "tokenizer.json").write_text("{}")
  (ckpt / "special_tokens_map.json").write_text("{}")
  (ckpt / "model.safetensors").write_bytes(b"weights")
  config = micro_config()
  config.data.source = "llava_json"
  config.data.root = str(root)
  config.data.files = {"train": "{task}_train.json", "val": "{task}_val.json",
                       "test": "{task}_test.json"}
  config.data.tokenizer = str(ckpt)
  return root, ckpt, config


def _fingerprints(config):
  return data_lib.input_fingerprints(config_lib.build(config))


def test_the_data_stage_reads_task_files_and_tokenizer_files(user_files):
  root, ckpt, config = user_files
  fp = _fingerprints(config)
  assert set(fp) == {"data"}  # no pretrain stage
  want = {str(root / f"{t}_{s}.json") for t in TASKS for s in ("train", "val", "test")}
  want |= {str(ckpt / "tokenizer.json"), str(ckpt / "special_tokens_map.json")}
  assert set(fp["data"]) == want  # never the weights


def test_a_content_edit_changes_the_data_hash_and_every_later_one(user_files):
  root, _, config = user_files
  run_config = config_lib.build(config)
  before = data_lib.input_fingerprints(run_config)
  path = root / "count_val.json"
  path.write_text(path.read_text().replace("a square", "a circle"))
  after = data_lib.input_fingerprints(run_config)
  assert data_lib.input_changes(before["data"], after["data"]) == [f"input file {path} changed"]
  old, new = (runner.stage_hashes(run_config, fp) for fp in (before, after))
  assert all(old[s] != new[s] for s in pipeline.STAGES)


def _files_listing_images(root):
  return [root / f"{t}_{s}.json" for t in TASKS if t != "chat" for s in ("train", "val", "test")]


def test_touching_an_image_keeps_the_fingerprint_and_editing_it_changes_it(user_files):
  root, _, config = user_files
  before = _fingerprints(config)
  image = root / "images" / "1.png"
  st = os.stat(image)
  os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  assert _fingerprints(config) == before  # the same bytes: nothing to re-run
  image.write_bytes(b"not decoded by the fingerprinT")  # same size
  after = _fingerprints(config)
  changes = data_lib.input_changes(before["data"], after["data"])
  # Every file that lists the image, named as such; the text-only chat files are unchanged.
  assert changes == sorted(f"an image listed in {p} changed" for p in _files_listing_images(root))
  assert _fingerprints(config) == after  # stable while nothing changes


def _edit_in_place_keeping_size_and_mtime(path):
  """Other bytes of the same length, the mtime put back (the ctime moves on: see
  tests/data/test_image_digest.py, which waits for it)."""
  st = os.stat(path)
  with open(path, "r+b") as f:
    f.write(b"N")  # "not decoded..." -> "Not decoded..."
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  after = os.stat(path)
  assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_an_image_edited_in_place_with_its_mtime_restored_is_seen(user_files):
  root, _, config = user_files
  run_config = config_lib.build(config)
  before = data_lib.input_fingerprints(run_config)
  _edit_in_place_keeping_size_and_mtime(root / "images" / "2.png")
  after = data_lib.input_fingerprints(run_config)
  assert data_lib.input_changes(before["data"], after["data"]) == sorted(
      f"an image listed in {p} changed" for p in _files_listing_images(root))
  old, new = (runner.stage_hashes(run_config, fp) for fp in (before, after))
  assert all(old[s] != new[s] for s in pipeline.STAGES)


def test_an_unchanged_tree_is_fingerprinted_without_reading_an_image(user_files, monkeypatch):
  root, _, config = user_files
  # Images written a moment ago are hashed again on every call (image_digest._RACY_NS); these
  # stand for a data set written long before the run.
  monkeypatch.setattr(image_digest, "_RACY_NS", 0)
  first = _fingerprints(config)
  opened = []
  real = builtins.open

  def counting(file, *args, **kwargs):
    opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else str(file))
    return real(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", counting)
  image_digest._LOADED.clear()  # pylint: disable=protected-access  (as in a new process)
  assert _fingerprints(config) == first
  assert str(root / "vqa_train.json") in opened  # the counting sees the task files being read
  assert not [p for p in opened if p.endswith(".png")], opened


def test_a_run_made_before_images_were_hashed_is_told_apart(user_files):
  """A manifest's old entry fingerprints images by size and mtime: the data stage re-runs once,
  and says why without claiming that an image changed."""
  root, _, config = user_files
  now = _fingerprints(config)["data"]
  path = str(root / "vqa_train.json")
  old = {**now, path: {"sha256": now[path]["sha256"], "images": "a digest of sizes and mtimes"}}
  assert data_lib.input_changes(old, now) == [
      f"the fingerprint of the images listed in {path} changed from size and mtime to content"]


def test_the_tokenizer_and_pretrain_files_are_fingerprinted(user_files, tmp_path):
  root, ckpt, config = user_files
  before = _fingerprints(config)
  (ckpt / "model.safetensors").write_bytes(b"other weights")
  assert _fingerprints(config) == before
  (ckpt / "tokenizer.json").write_text('{"changed": 1}')
  assert data_lib.input_changes(before["data"], _fingerprints(config)["data"]) == [
      f"input file {ckpt / 'tokenizer.json'} changed"]
  with config.unlocked():
    config.pretrain = {"files": [str(root / "caption_train.json")], "lr": 1e-3}
  fp = _fingerprints(config)
  assert list(fp["pretrain"]) == [str(root / "caption_train.json")]


def test_missing_and_malformed_files_are_left_to_the_data_stage(user_files):
  root, _, config = user_files
  (root / "vqa_test.json").unlink()
  (root / "count_train.json").write_text("[{")
  fp = _fingerprints(config)["data"]
  assert fp[str(root / "vqa_test.json")] == {"sha256": None, "image_bytes": None}
  assert fp[str(root / "count_train.json")]["image_bytes"] is None
  with pytest.raises(pipeline.PipelineError, match=r"task 'vqa': test file .*vqa_test\.json does not exist"):
    pipeline.run(config, str(root.parent / "run"), stages=["data"])


def test_the_shapes_source_reads_no_user_file():
  run_config = config_lib.build(micro_config())
  assert data_lib.input_fingerprints(run_config) == {}
  assert runner.stage_hashes(run_config, {}) == runner.stage_hashes(run_config)


# ------------------------------------------------------------------ the checks before any stage


def _finish(workdir, config, stages):
  """A manifest that records `stages` as finished under `config` and today's files."""
  run_config = config_lib.build(config)
  h = runner._hashes(run_config)  # pylint: disable=protected-access
  man = Manifest(str(workdir), config_hash(run_config.sections))
  for name in stages:
    man.mark(name, "done", h.stage[name], **runner._record(name, h))  # pylint: disable=protected-access


def test_a_stage_selected_after_a_task_file_changed_names_it(user_files, tmp_path):
  root, _, config = user_files
  workdir = tmp_path / "run"
  _finish(workdir, config, ["data", "prep", "validate", "lambda", "final"])
  before = (workdir / "manifest.json").read_bytes()
  path = root / "vqa_train.json"
  path.write_text(path.read_text().replace("What is it?", "What is this?"))
  with pytest.raises(pipeline.PipelineError) as info:
    pipeline.run(config, str(workdir), stages=["test"])
  message = str(info.value)
  assert "\n" not in message
  # test reads the data stage's output itself (its samples), the first stale input it names.
  assert (f"stage test needs {workdir / 'data'}/ from stage data, which is stale: input file "
          f"{path} changed since it ran; run --stages data,prep,validate,lambda,final,test "
          in message), message
  # Not a config change: no --overwrite is asked for, and nothing was written.
  assert "--overwrite" not in message
  assert (workdir / "manifest.json").read_bytes() == before
  assert sorted(os.listdir(workdir)) == ["manifest.json"]


def test_another_configs_run_directory_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  _finish(workdir, micro_config(), ["data", "prep", "validate", "lambda"])
  before = (workdir / "manifest.json").read_bytes()
  config = micro_config()
  config.balance.temperature = 2.0
  with pytest.raises(pipeline.PipelineError) as info:
    pipeline.run(config, str(workdir))
  message = str(info.value)
  assert message == (f"run directory {workdir} was made by another config: this one would "
                     "replace the outputs of stage(s) lambda; run with --overwrite to replace "
                     "them, or choose a new --workdir")
  assert (workdir / "manifest.json").read_bytes() == before
  assert sorted(os.listdir(workdir)) == ["manifest.json"]
  # A selection without a config-changed stage among those it runs is not refused.
  with pytest.raises(pipeline.PipelineError, match="stage final needs .*lambda.json"):
    pipeline.run(config, str(workdir), stages=["final"])
  # Legacy entries (before fingerprints: the hash alone) of the same config are still done.
  manifest = fileio.read_json(workdir / "manifest.json")
  for entry in manifest["stages"].values():
    del entry["config_hash"]
  fileio.atomic_write_json(workdir / "manifest.json", manifest)
  with pytest.raises(pipeline.PipelineError, match="outputs of stage.s. lambda;"):
    pipeline.run(config, str(workdir))


def test_a_rerun_data_stage_never_keeps_another_configs_tokenizer(tmp_path):
  """The built-in benchmark's tokenizer is trained from the config (vocab_size): a data stage
  redone under another one replaces it rather than keeping the old file."""
  config = micro_config()
  pipeline.run(config, str(tmp_path), stages=["data"])
  first = json.loads((tmp_path / "data" / "tokenizer" / "tokenizer.json").read_text())
  config.data.vocab_size = 290
  pipeline.run(config, str(tmp_path), stages=["data"], overwrite=True)
  second = json.loads((tmp_path / "data" / "tokenizer" / "tokenizer.json").read_text())
  assert len(first["model"]["vocab"]) == 300 and len(second["model"]["vocab"]) == 290
