"""The run directory: stage hashes and the sections they cover, the manifest, claims, caches."""

import dataclasses
import json
import shutil

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.pipeline import config as config_lib
from visatb_jax.pipeline import run_dir as run_dir_lib
from visatb_jax.pipeline import runner
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.pipeline.run_dir import Manifest, RunDir, config_hash
from visatb_jax.runtime import fileio

from conftest import micro_config


def _hashes(**overrides):
  config = micro_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return runner.stage_hashes(config_lib.build(config))


def test_a_new_hash_format_makes_every_stage_of_an_older_run_stale(monkeypatch):
  """A run directory made when the same config meant other work (batch_size in rows, format 1)
  must not pass for done: every stage's hash, and so every model's key, changes."""
  now = _hashes()
  monkeypatch.setattr(runner, "HASH_FORMAT", 1)
  before = _hashes()
  assert set(now) == set(before) and all(now[s] != before[s] for s in now)


def test_stage_hashes_chain_only_downstream():
  base = _hashes()
  t = _hashes(**{"balance.temperature": 1.0})
  assert all(t[s] == base[s] for s in ("data", "prep", "validate"))
  assert all(t[s] != base[s] for s in ("lambda", "final", "test", "report"))
  f = _hashes(**{"balance.form": "precise"})  # it decides which preparation models exist
  assert f["data"] == base["data"] and f["prep"] != base["prep"]
  d = _hashes(**{"data.max_len": 100})
  assert all(d[s] != base[s] for s in base)
  e = _hashes(**{"eval.max_new_tokens": 4})
  assert e["prep"] == base["prep"] and e["validate"] != base["validate"]


def test_every_stage_reads_its_own_and_earlier_sections():
  allowed = runner.allowed_sections()
  assert allowed["data"] == ("seed", "tasks", "data", "model")
  assert "balance.form" in allowed["prep"] and "balance" not in allowed["prep"]
  assert set(allowed["data"]) <= set(allowed["report"])


def test_hash_ignores_key_order():
  a = ml_collections.ConfigDict({"x": 1, "y": {"a": 1, "b": 2}})
  b = ml_collections.ConfigDict({"y": {"b": 2, "a": 1}, "x": 1})
  assert config_hash(a) == config_hash(b)


def test_manifest_roundtrip(tmp_path):
  m = Manifest(str(tmp_path), "c1")
  assert not m.is_done("data", "h1")
  m.mark("data", "running", "h1")
  assert not m.is_done("data", "h1")
  m.mark("data", "done", "h1", seconds=1.5)
  again = Manifest(str(tmp_path), "c1")
  assert again.is_done("data", "h1") and not again.is_done("data", "h2")
  on_disk = fileio.read_json(tmp_path / "manifest.json")
  assert on_disk["stages"]["data"]["seconds"] == 1.5
  assert on_disk["config_hash"] == "c1"
  m.mark("prep", "done", "h2")
  m.mark("lambda", "running", "h3")
  assert list(fileio.read_json(tmp_path / "manifest.json")["stages"]) == ["data", "prep", "lambda"]
  assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left


def test_claims_and_score_cache(tmp_path):
  run_dir = RunDir(str(tmp_path))
  assert not run_dir.claim("prep/mini", "h1")
  run_dir.finish("prep/mini", {"hash": "h1", "train": {}})
  assert run_dir.claim("prep/mini", "h1")
  assert run_dir.run_info("prep/mini")["done"]
  # Another configuration's directory is removed, never resumed.
  (tmp_path / "prep" / "mini" / "stale.txt").write_text("x")
  assert not run_dir.claim("prep/mini", "h2")
  assert not (tmp_path / "prep" / "mini" / "stale.txt").exists()
  with pytest.raises(PipelineError, match="has no finished training run"):
    run_dir.run_info("prep/mini")
  run_dir.cache_scores("prep/mini", "val", "h2", {"a": 0.5}, {"a": {"s1": 1.0, "s2": 0.0}},
                       {"a": ["x", "y"]})
  assert run_dir.cached_scores("prep/mini", "val", "h2", ["a"]) == (
      {"a": 0.5}, {"a": {"s1": 1.0, "s2": 0.0}})
  assert run_dir.cached_scores("prep/mini", "val", "h3", ["a"]) is None
  assert run_dir.cached_scores("prep/mini", "val", "h2", ["a", "b"]) is None


# ------------------------------------------------------------- what each model's hash covers


def _model_keys(**overrides):
  """{model: the hash it is trained under} of the prep and final stages, and the pretrain stage's
  hash, under the micro config with `overrides` (dotted fields)."""
  from conftest import set_fields  # pylint: disable=g-import-not-at-top
  from visatb_jax.pipeline import stages
  from visatb_jax.pipeline.workspace import Workspace
  run_config = config_lib.build(set_fields(micro_config(), overrides))
  ws = Workspace(run_config, "/nonexistent")
  ws.stage_hashes = runner.stage_hashes(run_config)
  allowed = runner.allowed_sections()
  out = {"pretrain stage": ws.stage_hashes["pretrain"]}
  for stage in ("prep", "final"):
    ws.enter_stage(stage, allowed[stage])
    out.update(stages.model_hashes(ws, stage))
  return out


def test_pretrain_hash_covers_only_the_train_fields_it_reads():
  from visatb_jax.pipeline import models
  from visatb_jax.train.state import TrainConfig
  # Every TrainConfig field but those the pretrain stage sets itself.
  assert set(models.PRETRAIN_TRAIN_FIELDS) == (
      {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "lr", "seed", "trainable"})
  base = _model_keys()
  for change in ({"train.lr": 1e-3}, {"train.epochs": 2.0}):
    keys = _model_keys(**change)
    assert keys["pretrain stage"] == base["pretrain stage"], change
    # Every later model reads them.
    assert all(keys[m] != base[m] for m in base if m != "pretrain stage"), change
  assert _model_keys(**{"train.clip_norm": 0.5})["pretrain stage"] != base["pretrain stage"]


@pytest.mark.parametrize("change", [{"balance.temperature": 2.0},
                                    {"balance.alpha": (0.5, 0.3, 0.2)},
                                    {"balance.form": "precise"}])
def test_a_change_of_lambdas_settings_retrains_visatb_alone(change):
  base, keys = _model_keys(), _model_keys(**change)
  changed = sorted(m for m in base if m in keys and keys[m] != base[m])
  assert changed == ["final/visatb"], changed
  # A form change adds preparation models; those both forms have are reused.
  added = sorted(set(keys) - set(base))
  units = ("caption", "count", "grounding", "vqa")
  assert added == ([] if "balance.form" not in change else
                   sorted([f"prep/{u}" for u in units] + [f"prep/mini_{u}" for u in units]))


def test_more_replicates_keep_the_first_ones():
  base, keys = _model_keys(), _model_keys(**{"prep.replicates": 2})
  assert all(keys[m] == base[m] for m in base if m.startswith("prep/"))
  assert "prep/mini.rep1" in keys and keys["final/visatb"] != base["final/visatb"]


# ------------------------------------------------------------------------ recorded outputs


def test_outputs_are_recorded_and_checked(tmp_path):
  (tmp_path / "scores").mkdir()
  (tmp_path / "scores" / "test.json").write_text("{}")
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.png").write_bytes(b"12345")
  (tmp_path / "scores" / f"{fileio.TEMP_PREFIX}abcdefgh.x.json").write_text("")
  recorded = run_dir_lib.output_digests(str(tmp_path), ["scores/*.json", "images", "nothing.json"])
  assert sorted(recorded) == ["images", "scores/test.json"]  # no temporary file, nothing absent
  assert run_dir_lib.output_problems(str(tmp_path), recorded) == []
  (tmp_path / "scores" / "test.json").write_text('{"ew": {}}')
  (tmp_path / "images" / "a.png").write_bytes(b"1234")  # cut short: its size tells
  assert run_dir_lib.output_problems(str(tmp_path), recorded) == [
      ("scores/test.json", "changed since the stage wrote it"),
      ("images", "changed since the stage wrote it")]
  (tmp_path / "scores" / "test.json").unlink()
  assert run_dir_lib.output_problems(str(tmp_path), recorded)[0] == ("scores/test.json",
                                                                     "is missing")
  assert run_dir_lib.model_directory("final/stl/caption/checkpoints") == "final/stl/caption"
  assert run_dir_lib.model_directory("final/ew/run.json") == "final/ew"
  assert run_dir_lib.model_directory("scores/test.json") is None


def test_checkpoints_are_recorded_by_their_latest_finished_step(tmp_path):
  checkpoints = tmp_path / "final" / "ew" / "checkpoints"
  for step in ("6", "8", "10.orbax-checkpoint-tmp-1"):  # the last one never finished
    (checkpoints / step / "state").mkdir(parents=True)
    (checkpoints / step / "state" / "array").write_bytes(b"x" * 10)
  assert run_dir_lib.finished_steps(str(checkpoints)) == [6, 8]
  recorded = run_dir_lib.output_digests(str(tmp_path), ["final/ew/checkpoints"])
  assert recorded["final/ew/checkpoints"].startswith("step 8: 1 files ")
  run_dir = RunDir(str(tmp_path))
  run_dir.finish("final/ew", {"hash": "h", "train": {"steps": 8}})
  assert run_dir.claim("final/ew", "h")
  shutil.rmtree(checkpoints / "8")
  assert run_dir_lib.output_problems(str(tmp_path), recorded) == [
      ("final/ew/checkpoints", "changed since the stage wrote it")]
  # Its last checkpoint gone, a finished model is trained again (resumed from step 6).
  assert not run_dir.claim("final/ew", "h")
  assert fileio.read_json(tmp_path / "final" / "ew" / "run.json") == {"hash": "h", "done": False}


def test_damaged_manifests_read_as_empty_and_say_why(tmp_path):
  path = tmp_path / "manifest.json"
  for content, why in (("", "is empty"), ('{"stages": {"data": {"st', "is not valid JSON"),
                       ("[]", "holds a JSON list, not an object"),
                       ('{"stages": {"data": 3}}', "holds no object of stage entries")):
    path.write_text(content)
    man = Manifest(str(tmp_path), "c1")
    assert man.data["stages"] == {} and man.damaged.startswith(why), (content, man.damaged)
  man.mark("data", "done", "h1")
  assert Manifest(str(tmp_path), "c1").damaged is None


def test_damaged_run_json_and_score_cache(tmp_path):
  run_dir = RunDir(str(tmp_path))
  (tmp_path / "prep" / "mini").mkdir(parents=True)
  (tmp_path / "prep" / "mini" / "run.json").write_text("[1, 2]")
  with pytest.raises(PipelineError, match=r"run.json holds a JSON list, not an object: it is "
                     r"damaged; remove .*prep/mini to train that model again"):
    run_dir.claim("prep/mini", "h")
  (tmp_path / "prep" / "mini" / "scores_val.json").write_text('{"hash": "h", "sco')
  assert run_dir.cached_scores("prep/mini", "val", "h", ["a"]) is None  # made again
  with pytest.raises(PipelineError, match=r"lambda.json is empty; remove it and run the stage"):
    (tmp_path / "lambda.json").write_text("")
    run_dir.read_output("lambda.json")


# ------------------------------------------------------------------------ JSON files, by themselves


def test_read_json_names_the_file_and_stays_a_json_error(tmp_path):
  path = tmp_path / "x.json"
  for content, phrase in ((b"", "is empty"), (b"  \n", "is empty"),
                          (b'{"a": [1, ', "is not valid JSON (Expecting value: line 1, column 11)"),
                          (b"\xff\xfe{}", "is not valid JSON (not UTF-8 text")):
    path.write_bytes(content)
    with pytest.raises(fileio.JSONFileError) as info:
      fileio.read_json(path)
    assert str(info.value).startswith(f"{path} {phrase}"), str(info.value)
    assert isinstance(info.value, json.JSONDecodeError) and info.value.path == str(path)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8),
       st.data())
def test_a_cut_json_file_parses_or_names_itself(tmp_path_factory, value, data):
  """Any prefix of a JSON file (a write cut short) either parses or is an error naming it."""
  text = json.dumps(value, indent=2)
  cut = data.draw(st.integers(0, len(text)))
  path = tmp_path_factory.mktemp("cut") / "f.json"
  path.write_text(text[:cut], encoding="utf-8")
  try:
    fileio.read_json(path)
  except fileio.JSONFileError as e:
    assert str(e).startswith(str(path)) and "\n" not in str(e)
